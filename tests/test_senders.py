"""Who wrote it: every sender a real client or MTA names becomes the requester, as written.

Real daemon, real clients (swaks, aiosmtplib, smtplib, a raw socket), real SQLite; mail written
the way Outlook, Gmail, Apple Mail, Thunderbird, scripts and swaks write it, and the 2024
"splitting the email atom" payloads, which must never turn into another address.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import smtplib
import uuid
from pathlib import Path

import aiosmtplib
import pytest

from mailgate.addresses import address_key
from mailgate.config import load_config
from mailgate.model import Ticket
from mailgate.store import store_for
from tests.conftest import (
    SUPPORT,
    Running,
    cli_json,
    daemon_running,
    shared_dns,
    write_config,
)
from tests.dns_stub import shared_dns_stub
from tests.test_loop_protection import outbox_drained
from tests.test_trust import send_raw

ENVELOPE = "bounces@relay.example"  # an MTA's bounce address, unlike the From


def message(from_line: str | None, subject: str, *, extra: str = "", body: str = "Hi.") -> bytes:
    """A plain message as a client writes it; `from_line` None: no From field at all."""
    lines = [f"From: {from_line}"] if from_line is not None else []
    lines += [
        f"To: {SUPPORT}",
        f"Subject: {subject}",
        "Date: Tue, 02 Dec 2025 10:00:00 +0100",
        f"Message-ID: <{uuid.uuid4().hex}@client.example>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
    ]
    head = "\r\n".join(lines) + "\r\n" + extra
    return f"{head}\r\n{body}\r\n".encode()


async def send(
    running: Running, raw: bytes, *, sender: str = ENVELOPE, smtputf8: bool = False
) -> str:
    """Send `raw` with aiosmtplib's client (the null sender allowed); return the queue id."""
    options = ["SMTPUTF8"] if smtputf8 else []
    async with aiosmtplib.SMTP(hostname=running.host, port=running.port) as client:
        errors, reply = await client.sendmail(sender, [SUPPORT], raw, mail_options=options)
    assert not errors, errors
    assert reply.startswith("2.0.0 Queued as "), reply
    return reply.rsplit(" ", 1)[1]


def by_subject(tickets: list[Ticket]) -> dict[str, Ticket]:
    return {t.subject: t for t in tickets}


async def outbox_recipients(running: Running) -> list[tuple[str, str]]:
    """(kind, recipient) of every outgoing mail, once the outbox is drained; each was sent."""
    await outbox_drained(running)
    async with store_for(running.config) as store:
        rows = await store.list_outbox()
    assert [r.state for r in rows] == ["sent"] * len(rows), [r.last_error for r in rows]
    return [(r.item.kind, r.item.to.email) for r in rows]


async def participants(running: Running, ticket_id: int) -> list[str]:
    async with store_for(running.config) as store:
        return await store.ingest(lambda tx: tx.participants(ticket_id))


# -- swaks, exactly as the README's "Try it" says ---------------------------------------------


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed (.ci/run does)")
async def test_swaks_with_its_defaults_becomes_a_ticket(daemon: Running) -> None:
    """`swaks --server HOST:PORT --to support@example.com`: From and MAIL FROM are
    `<user>@<host name>`, a dotless name on most machines. It is a ticket, and its sender gets
    the verification mail and the acknowledgement."""
    swaks = await asyncio.create_subprocess_exec(
        "swaks",
        "--server",
        f"{daemon.host}:{daemon.port}",
        "--to",
        SUPPORT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    transcript, _ = await asyncio.wait_for(swaks.communicate(), 60)
    text = transcript.decode("utf-8", "replace")
    assert swaks.returncode == 0, text
    found = re.search(r"-> MAIL FROM:<([^>]+)>", text)
    assert found, text
    sender = found.group(1)
    [ticket] = await daemon.tickets()
    assert address_key(ticket.requester.email) == address_key(sender)
    assert ticket.messages[0].flags == ("unauthenticated",)
    sent = await outbox_recipients(daemon)
    assert sorted(kind for kind, _ in sent) == ["ticket_created", "verification"]
    assert {address_key(to) for _, to in sent} == {address_key(sender)}
    assert len(list(daemon.config.outbound.directory.glob("*.eml"))) == 2


# -- addresses that are syntax, whatever the DNS says -----------------------------------------

SENDER_FORMS = [
    # From as written, the requester it names, its display name
    ("root@vm", "root@vm", None),  # swaks on a host without a domain
    ("Guest <guest@localhost>", "guest@localhost", "Guest"),
    ("bob@host.local", "bob@host.local", None),
    ("Alice <alice@customer.test>", "alice@customer.test", "Alice"),
    ("Build Bot <ci@build.internal>", "ci@build.internal", "Build Bot"),
    ("shop@store.example", "shop@store.example", None),
    ("nobody@nowhere.invalid", "nobody@nowhere.invalid", None),
    ("john(comment)@example.org", "john@example.org", None),
    ('"john doe"@example.org', '"john doe"@example.org', None),
    ("Trailing <x@example.org.>", "x@example.org", "Trailing"),
    ("jsmith@example.net (John Smith)", "jsmith@example.net", "John Smith"),  # RFC 822 style
    ("Printer <printer@[192.0.2.10]>", "printer@[192.0.2.10]", "Printer"),
]


async def test_every_sender_form_is_a_requester(daemon: Running) -> None:
    """Dotless, special-use and reserved domains, comments, quoted local parts, a trailing
    dot, an address literal: each is a ticket for that address, which gets its mail."""
    for n, (from_line, _email, _name) in enumerate(SENDER_FORMS):
        await send(daemon, message(from_line, f"Form {n}"))
    tickets = by_subject(await daemon.tickets())
    sent = await outbox_recipients(daemon)
    async with store_for(daemon.config) as store:
        assert await store.list_inbound("quarantined") == []
    for n, (from_line, email, name) in enumerate(SENDER_FORMS):
        ticket = tickets[f"Form {n}"]
        assert (ticket.requester.email, ticket.requester.name) == (email, name), from_line
        assert "from_missing" not in ticket.messages[0].flags, from_line
        assert ("verification", email) in sent and ("ticket_created", email) in sent, from_line


async def test_outlook_gmail_apple_mail_and_thunderbird_names(daemon: Running) -> None:
    """Display names as each client writes them, an encoded word holding a comma included
    (Outlook), decoded as the clients show them."""
    outlook = (
        "Thread-Index: AdlR5xGq2l8yZ0RkSxm6QlGmx3a4Vw==\r\n"
        "X-Mailer: Microsoft Outlook 16.0\r\n"
        "Content-Language: de-de\r\n"
    )
    clients = [
        ("=?iso-8859-1?Q?M=FCller,=20Hans?= <hm@example.net>", outlook, "Müller, Hans"),
        ('"=?utf-8?Q?M=C3=BCller,_Hans?=" <hm2@example.net>', outlook, "Müller, Hans"),
        ('"Müller, Hans" <hm3@example.net>', "User-Agent: Thunderbird/128.0\r\n", "Müller, Hans"),
        (
            "=?UTF-8?B?SsO8cmdlbiBNw7xsbGVy?= <juergen.mueller@gmail.example>",
            "X-Gm-Message-State: AOJu0Yx\r\n",
            "Jürgen Müller",
        ),
        (
            "=?utf-8?Q?Ren=C3=A9e_Dupont?= <renee@icloud.example>",
            "X-Mailer: Apple Mail (2.3774.600.62)\r\n",
            "Renée Dupont",
        ),
        ('"Doe, Jane" <jane@example.net>', "", "Doe, Jane"),
    ]
    for n, (from_line, extra, _name) in enumerate(clients):
        await send(daemon, message(from_line, f"Client {n}", extra=extra))
    tickets = by_subject(await daemon.tickets())
    for n, (from_line, _extra, name) in enumerate(clients):
        assert tickets[f"Client {n}"].requester.name == name, from_line
    shown = cli_json(daemon, "requesters", "show", "HM@example.net")
    assert (shown["email"], shown["name"]) == ("hm@example.net", "Müller, Hans")


# -- no From, or none usable -----------------------------------------------------------------


async def test_a_mail_without_from_is_the_envelope_senders(daemon: Running) -> None:
    """A script's mail with no From at all (sent byte for byte over a raw socket): its
    envelope sender is the requester, flagged from_missing, and never authenticated, though
    SPF passes for it; it gets the acknowledgement, and its next From-less mail threads."""
    customer = "customer@example.org"  # SPF passes for loopback
    await send_raw(daemon, message(None, "Cron: backup failed"), sender=customer)
    await send_raw(
        daemon, message(None, "Re: [#1] Cron: backup failed", body="Again."), sender=customer
    )
    [ticket] = await daemon.tickets()
    sent = await outbox_recipients(daemon)
    assert ticket.requester.email == customer
    assert [m.flags for m in ticket.messages] == [("unauthenticated", "from_missing")] * 2
    assert [m.auth["trust"] for m in ticket.messages if m.auth] == ["unauthenticated"] * 2
    assert sorted(sent) == [("ticket_created", customer), ("verification", customer)]


async def test_an_unusable_from_falls_back_to_the_envelope_a_null_sender_to_quarantine(
    daemon: Running,
) -> None:
    await send(daemon, message("not an address at all", "Garbage"), sender="ann@example.org")
    queue_id = await send(daemon, message("not an address at all", "Garbage again"), sender="")
    await send(daemon, message(None, "Nothing at all"), sender="")
    [ticket] = await daemon.tickets()
    async with store_for(daemon.config) as store:
        quarantined = await store.list_inbound("quarantined")
    assert (ticket.requester.email, ticket.messages[0].flags) == (
        "ann@example.org",
        ("unauthenticated", "from_missing"),
    )
    assert queue_id in [row.id for row in quarantined]
    assert {row.reason for row in quarantined} == {"no usable From and a null envelope sender"}


async def test_several_from_mailboxes_name_the_first_valid_one(tmp_path: Path) -> None:
    """The first valid mailbox is the requester and the message is flagged multiple_from,
    once; with authentication on it is failed (no DMARC trust), with it off still flagged."""
    forms = [
        "Ann <ann@example.org>, Bob <bob@example.org>",
        '"Broken" <broken@@example.org>, Bob <bob@example.org>',
    ]
    flags = {}
    for auth in ("on", "off"):
        path = write_config(tmp_path / auth)
        if auth == "off":
            path.write_text(path.read_text().replace("enabled = true", "enabled = false"))
        async with daemon_running(load_config(path)) as running:
            for n, from_line in enumerate(forms):
                await send(running, message(from_line, f"Several {n}"), sender="ann@example.org")
            tickets = by_subject(await running.tickets())
        assert [tickets[f"Several {n}"].requester.email for n in range(2)] == [
            "ann@example.org",
            "bob@example.org",
        ]
        flags[auth] = {tickets[f"Several {n}"].messages[0].flags for n in range(2)}
    assert flags == {
        "on": {("unverified_sender", "multiple_from")},
        "off": {("unauthenticated", "multiple_from")},
    }


# -- the atom-splitting payloads ------------------------------------------------------------

VICTIM = "victim@customer.example"
MALLORY = "mallory@attacker.example"
SMUGGLED_FROM = [
    "=?x?q?victim=40customer.example=3e=00?=@attacker.example",
    "=?utf-7?q?victim+AEA-customer.example+AD4-?=@attacker.example",
    "=?x?b?dmljdGltQGN1c3RvbWVyLmV4YW1wbGU+AA==?=@attacker.example",
    "=?x?q?collab=40customer.example=3e=20?=foo@attacker.example",
    "Agent <=?x?q?agent=40example.com=3e=00?=@attacker.example>",
    '"victim@customer.example>"@attacker.example',
    '"agent@example.com>" <"agent@example.com>"@attacker.example>',
]


async def test_atom_splitting_payloads_never_turn_into_another_address(daemon: Running) -> None:
    """Encoded words in a local part, and quoted local parts that close an address: taken
    literally, they are refused, so the message is the envelope sender's. No requester,
    participant, agent or automatic mail for the smuggled address, and the victim's ticket
    gets nothing."""
    stub, _port = shared_dns_stub()
    shared_dns()
    stub.txt("attacker.example", "v=spf1 ip4:127.0.0.0/8 -all")  # Mallory's own mail passes SPF
    await send(daemon, message(f"Victim <{VICTIM}>", "Printer on fire"), sender=VICTIM)
    for n, from_line in enumerate(SMUGGLED_FROM):
        await send(daemon, message(from_line, f"Re: [#1] Printer on fire {n}"), sender=MALLORY)
    cc = (
        "Cc: =?x?q?victim=40customer.example=3e=00?=@attacker.example,\r\n"
        ' "agent@example.com>"@attacker.example, friend@attacker.example\r\n'
    )
    await send(daemon, message(f"Mallory <{MALLORY}>", "Cc", extra=cc), sender=MALLORY)
    tickets = await daemon.tickets()
    sent = await outbox_recipients(daemon)
    victim_ticket, *others = tickets
    assert [m.sender.email for m in victim_ticket.messages] == [VICTIM]
    assert {t.requester.email for t in others} == {MALLORY}
    smuggled = [m for t in others for m in t.messages if m.subject.startswith("Re:")]
    assert len(smuggled) == len(SMUGGLED_FROM)
    assert all(m.author == "customer" and "from_missing" in m.flags for m in smuggled)
    assert {to for _kind, to in sent} == {VICTIM, MALLORY}
    assert sum(1 for _kind, to in sent if to == VICTIM) == 2  # its own two, nothing since
    [cc_ticket] = [t for t in others if t.subject == "Cc"]
    assert cc_ticket.messages[0].auth is not None
    assert cc_ticket.messages[0].auth["trust"] == "authenticated"
    assert await participants(daemon, cc_ticket.id) == ["friend@attacker.example"]
    for ticket in tickets:
        assert await participants(daemon, ticket.id) in ([], ["friend@attacker.example"])


# -- one mailbox, many spellings --------------------------------------------------------------


async def test_case_variants_thread_as_one_requester_in_their_own_spelling(
    daemon: Running,
) -> None:
    """`Anna@Example.ORG` and `anna@example.org` are one requester; `STRASSE@` and `straße@`
    too (full Unicode case folding, which SQLite's NOCASE lacks). Each message keeps the
    spelling it came with, and mail goes to the spelling the requester first wrote."""
    await send(daemon, message("Anna <Anna@Example.ORG>", "Invoice"), sender="Anna@Example.ORG")
    follow = message("anna@example.org", "Re: [#1] Invoice", body="Any news?")
    await send(daemon, follow, sender="anna@example.org")
    await send(daemon, message("STRASSE@example.net", "Adresse"), sender="STRASSE@example.net")
    strasse = message("Straße <straße@example.net>", "Re: [#2] Adresse", body="Noch da?")
    await send(daemon, strasse, sender="straße@example.net", smtputf8=True)
    anna, street = await daemon.tickets()
    sent = await outbox_recipients(daemon)
    requesters = cli_json(daemon, "requesters", "list")
    assert [m.sender.email for m in anna.messages] == ["Anna@example.org", "anna@example.org"]
    assert [m.sender.email for m in street.messages] == [
        "STRASSE@example.net",
        "straße@example.net",
    ]
    assert [m.thread_reason for m in (*anna.messages, *street.messages)] == [
        "new",
        "subject_tag",
        "new",
        "subject_tag",
    ]
    assert [r["email"] for r in requesters] == ["Anna@example.org", "STRASSE@example.net"]
    assert {to for _kind, to in sent} == {"Anna@example.org", "STRASSE@example.net"}
    shown = cli_json(daemon, "requesters", "show", "strasse@EXAMPLE.net")
    assert shown["email"] == "STRASSE@example.net"


def test_keys_fold_case_as_unicode_does() -> None:
    pairs = [
        ("Anna@Example.ORG", "anna@example.org"),
        ("STRASSE@example.net", "straße@example.net"),  # German: ß folds to ss
        ("DİLEK@example.org", "di\u0307lek@example.org"),  # Turkish capital dotted I
        ("ΣΊΣΥΦΟΣ@example.gr", "σίσυφος@example.gr"),  # Greek: final sigma
        ("anna@BÜCHER.example", "anna@xn--bcher-kva.example"),  # a domain is its A-label
        ("e\u0301mile@example.org", "ÉMILE@example.org"),  # decomposed and precomposed
    ]
    for first, second in pairs:
        assert address_key(first) == address_key(second), (first, second)
    assert address_key("dilek@example.org") != address_key("DİLEK@example.org")


# -- the same Message-ID with another body -------------------------------------------------


async def test_the_same_message_id_with_another_body_is_kept(daemon: Running) -> None:
    """Same Message-ID and sender, two bodies: both are stored, the second flagged
    duplicate_message_id. The exact repeat (an SMTP retry, even through a relay that adds
    its Received field) is stored once."""
    first = (
        b"From: Ann <ann@example.org>\r\nTo: support@example.com\r\nSubject: Order 17\r\n"
        b"Message-ID: <reused@client.example>\r\n\r\nWhere is my order?\r\n"
    )
    second = first.replace(b"Where is my order?", b"Please cancel the order.")
    relayed = b"Received: from mx.example.org by relay.example; Tue, 2 Dec 2025\r\n" + first
    ids = []
    for raw in (first, second, first, relayed):
        ids.append(await send(daemon, raw, sender="ann@example.org"))
    tickets = await daemon.tickets()
    async with store_for(daemon.config) as store:
        rows = [await store.get_inbound(queue_id) for queue_id in ids]
    messages = [m for t in tickets for m in t.messages]
    assert [m.body_text for m in messages] == ["Where is my order?", "Please cancel the order."]
    assert [m.flags for m in messages] == [(), ("duplicate_message_id",)]
    assert [(r.state, r.reason) for r in rows if r] == [
        ("ingested", None),
        ("ingested", None),
        ("ingested", "duplicate"),
        ("ingested", "duplicate"),
    ]


# -- support and agent addresses take the same domains --------------------------------------


async def test_a_support_address_on_a_special_use_domain(tmp_path: Path) -> None:
    """`helpdesk@corp.local` as the support address and `agent@corp.local` as an agent are
    valid config; RCPT to any spelling of it is accepted (smtplib, as a script sends)."""
    path = write_config(tmp_path)
    text = path.read_text()
    text = text.replace('accept = ["support@example.com"', 'accept = ["helpdesk@corp.local"')
    text = text.replace('addresses = ["agent@example.com"', 'addresses = ["agent@corp.local"')
    path.write_text(
        text.replace('sender = "support@example.com"', 'sender = "helpdesk@corp.local"')
    )
    config = load_config(path)
    assert config.smtp.accepts("HelpDesk@CORP.local") and config.agents.includes("Agent@corp.LOCAL")
    raw = message("Ops <ops@corp.local>", "Disk full")

    def send_with_smtplib(host: str, port: int) -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP(host, port) as client:
            return client.sendmail("ops@corp.local", ["HelpDesk@Corp.Local"], raw)

    async with daemon_running(config) as running:
        refused = await asyncio.to_thread(send_with_smtplib, running.host, running.port)
        [ticket] = await running.tickets()
    assert refused == {}
    assert ticket.requester.email == "ops@corp.local"
