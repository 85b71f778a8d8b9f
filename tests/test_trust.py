"""Trust that holds under attack: each attack of the security review against a real daemon, its
DNS a stub on loopback serving real DKIM keys (dkimpy signatures) and DMARC records, able to
stay silent or lose answers."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest

from mailgate.config import Config, load_config
from mailgate.ingest.auth import _affordable
from mailgate.smtp_session import XFORWARD_NOT_PERMITTED
from mailgate.store import store_for
from tests.conftest import (
    SUPPORT,
    Key,
    Relay,
    Running,
    cli_json,
    daemon_running,
    mail,
    run_cli,
    write_config,
)
from tests.dns_stub import DnsStub, dns_stub
from tests.test_auth import raw, signed
from tests.test_hostile_smtp import raw as raw_session
from tests.test_loop_protection import (
    acknowledgement,
    dsn,
    mails_to,
    outbox_drained,
    returned_headers,
    send_null_sender,
    undeliverable,
)

PROVIDER = "bigmail.net"  # a large provider that signs its users' mail and publishes p=reject
VICTIM = f"victim@{PROVIDER}"
MALLORY = f"mallory@{PROVIDER}"  # the attacker has an account at the same provider
SPY = "spy@evil.net"


@pytest.fixture
async def world(key: Key) -> AsyncIterator[tuple[DnsStub, int]]:
    """The provider publishes its key and DMARC p=reject; the agents' domain (example.com)
    publishes p=reject too; every other name is unknown (NXDOMAIN)."""
    async with dns_stub() as (stub, port):
        stub.txt(f"sel._domainkey.{PROVIDER}", key.dns_record)
        stub.txt(f"_dmarc.{PROVIDER}", "v=DMARC1; p=reject")
        stub.txt("sel._domainkey.example.com", key.dns_record)
        stub.txt("_dmarc.example.com", "v=DMARC1; p=reject")
        yield stub, port


def config_for(
    tmp_path: Path, port: int, relay: Relay | None = None, *, auth: str = "", dns_timeout: float = 5
) -> Config:
    return load_config(
        write_config(
            tmp_path,
            relay_port=relay.port if relay else None,
            dns_port=port,
            max_message_size=8 * 1024 * 1024,
            auth_extra=auth,
            dns_timeout=dns_timeout,
        )
    )


async def send_raw(running: Running, message: bytes, *, sender: str) -> str:
    """Send `message` byte for byte (no client rewrites its line endings): the queue id."""
    reader, writer = await asyncio.open_connection(running.host, running.port)

    async def command(line: bytes) -> bytes:
        writer.write(line + b"\r\n")
        await writer.drain()
        while True:
            reply = await reader.readline()
            if reply[3:4] != b"-":
                return reply

    try:
        await reader.readline()
        for line in (
            b"EHLO client.test",
            f"MAIL FROM:<{sender}>".encode(),
            f"RCPT TO:<{SUPPORT}>".encode(),
        ):
            assert (await command(line)).startswith(b"250"), line
        assert (await command(b"DATA")).startswith(b"354")
        body = message if message.endswith(b"\r\n") else message + b"\r\n"
        stuffed = body.replace(b"\r\n.", b"\r\n..")
        reply = await command(stuffed + b".")
        assert reply.startswith(b"250 2.0.0 Queued as "), reply
        return reply.decode().rsplit(" ", 1)[1].strip()
    finally:
        writer.close()


def ticket_of(running: Running, ticket_id: int) -> dict[str, object]:
    shown: dict[str, object] = cli_json(running, "tickets", "show", str(ticket_id))
    return shown


def message_flags(running: Running, ticket_id: int) -> list[list[str]]:
    return [m["flags"] for m in ticket_of(running, ticket_id)["messages"]]  # type: ignore[attr-defined]


async def victim_ticket(running: Running, key: Key) -> None:
    """The victim writes in, signed by the provider: ticket 1, authenticated."""
    first = mail(sender=f"Victim <{VICTIM}>", message_id=f"<v1@{PROVIDER}>")
    await running.send(signed(key, raw(first), domain=PROVIDER), sender=VICTIM)
    [ticket] = await running.tickets()
    assert ticket.messages[0].auth is not None
    assert ticket.messages[0].auth["trust"] == "authenticated"


async def test_bare_cr_hidden_from_before_a_signed_mail_gains_nothing(
    tmp_path: Path, world: tuple[DnsStub, int], key: Key, relay: Relay
) -> None:
    """One unsigned line in front of the attacker's own signed mail, with bare CRs hiding a
    From, a Cc and a Subject: every reader sees the same fields, the mail gains no trust, joins
    nothing, and the hidden Cc gets none of the agents' answers."""
    _stub, port = world
    async with daemon_running(config_for(tmp_path, port, relay)) as running:
        await victim_ticket(running, key)
        own = signed(key, raw(mail(sender=MALLORY, subject="hello")), domain=PROVIDER)
        hidden = (
            f"X-Note: x\rFrom: {VICTIM}\rCc: {SPY}\rSubject: Re: [#1] Printer on fire\r\n"
        ).encode()
        await send_raw(running, hidden + own, sender=MALLORY)
        tickets = await running.tickets()
        assert [len(t.messages) for t in tickets] == [1, 1]  # ticket 1 untouched
        forged = tickets[1]
        assert forged.flags == ("unverified_sender",)
        assert message_flags(running, 2)[0][:2] == ["unverified_sender", "bare_line_ending"]
        assert forged.messages[0].auth is not None
        assert forged.messages[0].auth["trust"] == "failed"

        reply = tmp_path / "reply.txt"
        reply.write_text("We are on it.\n")
        assert running.cli("reply", "1", "--body-file", str(reply)).returncode == 0
        assert running.cli("reply", "2", "--body-file", str(reply)).returncode == 0
        await outbox_drained(running)
    recipients = {r for received in relay.received for r in received.rcpt_tos}
    assert SPY not in recipients
    assert {r.message["Subject"] for r in relay.received if MALLORY in r.rcpt_tos} == set()


async def test_several_from_fields_or_mailboxes_gain_no_trust(
    tmp_path: Path, world: tuple[DnsStub, int], key: Key
) -> None:
    """A signed mail with a second From field, or a From holding two mailboxes: DMARC is not
    pass for it, whatever the signature says (RFC 7489 6.6.1)."""
    _stub, port = world
    async with daemon_running(config_for(tmp_path, port)) as running:
        await victim_ticket(running, key)
        own = signed(key, raw(mail(sender=MALLORY, subject="Re: [#1]")), domain=PROVIDER)
        await send_raw(running, f"From: {VICTIM}\r\n".encode() + own, sender=MALLORY)
        two = mail(sender=f"{VICTIM}, {MALLORY}", subject="Re: [#1] Printer on fire")
        await running.send(signed(key, raw(two), domain=PROVIDER), sender=MALLORY)
        tickets = await running.tickets()
    assert [len(t.messages) for t in tickets] == [1, 1, 1]
    for forged in tickets[1:]:
        assert forged.flags == ("unverified_sender",)
        assert "multiple_from" in forged.messages[0].flags


async def test_forgery_with_never_answered_signatures_joins_nothing_and_relays_nothing(
    tmp_path: Path, world: tuple[DnsStub, int], key: Key, relay: Relay
) -> None:
    """Five DKIM-Signature fields whose domains' nameservers never answer: they cannot align
    with the From, so they are not even looked up; DMARC fails at once. Neither the forged
    follow-up nor a forged agent answer joins the victim's ticket or relays a word."""
    stub, port = world
    silent = [f"slow{n}.net" for n in range(5)]
    for domain in silent:
        stub.silent.update({f"sel._domainkey.{domain}", f"_dmarc.{domain}", domain})
    signatures = "".join(
        f"DKIM-Signature: v=1; a=rsa-sha256; d={d}; s=sel; h=from; bh=AAAA; b=AAAA\r\n"
        for d in silent
    ).encode()
    async with daemon_running(config_for(tmp_path, port, relay)) as running:
        await victim_ticket(running, key)
        await mails_to(relay, VICTIM, 2)
        forged = mail(
            sender=VICTIM, subject="Re: [#1] Printer on fire", references=f"<v1@{PROVIDER}>"
        )
        await running.send(signatures + raw(forged), sender=VICTIM)
        agent = mail(sender="Agent <agent@example.com>", subject="Re: [#1] Printer on fire")
        await running.send(signatures + raw(agent), sender="agent@example.com")
        tickets = await running.tickets()
        await outbox_drained(running)
    assert [len(t.messages) for t in tickets] == [1, 1, 1]
    assert all(t.flags == ("unverified_sender",) for t in tickets[1:])
    assert all(m.author == "customer" for t in tickets for m in t.messages)
    assert len(relay.received) == 2  # the victim's own verification and acknowledgement
    asked = {name for name, _ in stub.queries}
    assert not [name for name in asked if "slow" in name]


async def test_agent_address_on_a_domain_without_dmarc_is_no_agent(
    tmp_path: Path, key: Key, relay: Relay
) -> None:
    """The agents' domain publishes no DMARC record: a bare From of it proves nothing. Its
    answer on a ticket becomes a note for the agents, never a mail to the customer; a signed
    one from the same address is relayed."""
    async with dns_stub() as (stub, port):
        stub.txt("sel._domainkey.staff.example.com", key.dns_record)
        async with daemon_running(config_for(tmp_path, port, relay)) as running:
            await running.send(mail(sender="ann@customer.net"), sender="ann@customer.net")
            await mails_to(relay, "ann@customer.net", 2)
            forged = mail(
                sender="Helpdesk <helpdesk@staff.example.com>",
                subject="Re: [#1] Printer on fire",
                body="Please pay the invoice to IBAN XX00.\n",
            )
            await running.send(forged, sender="helpdesk@staff.example.com")
            genuine = mail(
                sender="Helpdesk <helpdesk@staff.example.com>",
                subject="Re: [#1] Printer on fire",
                body="We replaced the printer.\n",
            )
            await running.send(
                signed(key, raw(genuine), domain="staff.example.com"),
                sender="helpdesk@staff.example.com",
            )
            await mails_to(relay, "ann@customer.net", 3)
            await outbox_drained(running)
            shown = ticket_of(running, 1)
    messages = shown["messages"]
    assert [(m["author"], m["auth"]["trust"]) for m in messages] == [  # type: ignore[attr-defined]
        ("customer", "unauthenticated"),
        ("system", "unauthenticated"),
        ("agent", "authenticated"),
    ]
    assert messages[1]["flags"] == ["unauthenticated", "not_relayed"]  # type: ignore[index]
    texts = [r.text() for r in relay.received if r.message["Subject"].startswith("Re:")]
    assert len(texts) == 1 and "replaced the printer" in texts[0]
    assert not any("IBAN" in r.raw.decode("utf-8", "replace") for r in relay.received)


async def test_failed_mail_does_not_rename_the_requester(
    tmp_path: Path, world: tuple[DnsStub, int], key: Key, relay: Relay
) -> None:
    """A forged mail in the victim's name opens a flagged ticket but keeps the requester's own
    name: the next genuine answer greets the customer as before."""
    _stub, port = world
    async with daemon_running(config_for(tmp_path, port, relay)) as running:
        await victim_ticket(running, key)
        forged = mail(sender=f"Send BTC to 1Fake <{VICTIM}>", subject="New question")
        await running.send(forged, sender=VICTIM)
        await running.settle()
        reply = tmp_path / "reply.txt"
        reply.write_text("Done.\n")
        assert running.cli("reply", "1", "--body-file", str(reply)).returncode == 0
        [answer] = [r for r in await mails_to(relay, VICTIM, 3) if "Re:" in r.message["Subject"]]
        requester = cli_json(running, "requesters", "show", VICTIM)
    assert requester["name"] == "Victim"
    assert str(answer.message["To"]) == f"Victim <{VICTIM}>"
    assert "BTC" not in answer.raw.decode("utf-8", "replace")


async def test_unauthenticated_mail_adds_no_participants_but_an_agent_can(
    tmp_path: Path, relay: Relay
) -> None:
    """On a domain that publishes nothing the foundation's threading holds, but a Cc on such
    mail does not make anyone a participant; `mailgate participants add` does."""
    path = write_config(tmp_path, relay_port=relay.port)
    async with daemon_running(load_config(path)) as running:
        await running.send(mail(sender="carol@nodmarc.net"), sender="carol@nodmarc.net")
        follow = mail(sender="carol@nodmarc.net", subject="Re: [#1]", cc=SPY)
        await running.send(follow, sender="carol@nodmarc.net")
        [ticket] = await running.tickets()
        assert [m.flags for m in ticket.messages] == [("unauthenticated",)] * 2
        reply = tmp_path / "reply.txt"
        reply.write_text("Hello.\n")
        assert running.cli("reply", "1", "--body-file", str(reply)).returncode == 0
        [first] = [
            r
            for r in await mails_to(relay, "carol@nodmarc.net", 3)
            if "Re:" in str(r.message["Subject"])
        ]
        added = running.cli("participants", "add", "1", "colleague@nodmarc.net")
        assert added.returncode == 0, added.stderr
        assert running.cli("participants", "add", "99", "x@nodmarc.net").returncode == 1
        assert running.cli("participants", "add", "1", "not an address").returncode == 2
        assert running.cli("reply", "1", "--body-file", str(reply)).returncode == 0
        [_, second] = [
            r
            for r in await mails_to(relay, "carol@nodmarc.net", 4)
            if "Re:" in str(r.message["Subject"])
        ]
    assert first.rcpt_tos == ["carol@nodmarc.net"]
    assert second.rcpt_tos == ["carol@nodmarc.net", "colleague@nodmarc.net"]


async def test_a_header_folded_over_a_million_lines_stays_inside_the_parse_budget(
    tmp_path: Path, world: tuple[DnsStub, int], key: Key
) -> None:
    """A field folded over a million continuation lines, carrying an aligned signature so that
    DKIM must be verified: read in the parser process under its limits, it becomes a ticket
    (failed: its signature cannot verify), and a normal signed mail beside it is authenticated."""
    _stub, port = world
    folded = b"X-Folded: a\r\n" + b" b\r\n" * 1_000_000
    signature = signed(key, raw(mail(sender=MALLORY)), domain=PROVIDER).split(b"\r\nFrom:")[0]
    hostile = signature + b"\r\n" + folded + raw(mail(sender=MALLORY, subject="Folded"))
    async with daemon_running(config_for(tmp_path, port)) as running:
        await send_raw(running, hostile, sender=MALLORY)
        normal = signed(key, raw(mail(sender=VICTIM, subject="Normal")), domain=PROVIDER)
        await running.send(normal, sender=VICTIM)
        tickets = await running.tickets()
        async with store_for(running.config) as store:
            quarantined = await store.list_inbound("quarantined")
    assert quarantined == []
    by_subject = {t.subject: t for t in tickets}
    assert set(by_subject) == {"Folded", "Normal"}
    assert by_subject["Normal"].messages[0].auth["trust"] == "authenticated"  # type: ignore[index]
    assert by_subject["Folded"].messages[0].auth["trust"] == "failed"  # type: ignore[index]
    assert "header field over 64 KiB" in by_subject["Folded"].messages[0].body_text


async def test_dns_that_never_answers_defers_the_mail_then_decides(
    tmp_path: Path, key: Key
) -> None:
    """A temperror is no verdict: the mail stays 'received' and is checked again; only when
    `retry_for` has passed is it decided, as unauthenticated for a domain without a known
    policy. Nothing is lost meanwhile."""
    async with dns_stub() as (stub, port):
        stub.silent.update({"_dmarc.slow.net", "slow.net"})
        config = config_for(tmp_path, port, auth="retry_for = 4", dns_timeout=1)
        async with daemon_running(config) as running:
            queue_id = await running.send(mail(sender="dan@slow.net"), sender="dan@slow.net")
            async with store_for(running.config) as store:
                deadline = time.monotonic() + 30
                while (row := await store.get_inbound(queue_id)) and not row.attempts:
                    assert time.monotonic() < deadline, "the mail was never checked"
                    await asyncio.sleep(0.05)
                assert row is not None and row.state == "received"
                assert await store.list_tickets() == []
                deadline = time.monotonic() + 60
                while not await store.list_tickets():
                    assert time.monotonic() < deadline, "the deferred mail was never decided"
                    await asyncio.sleep(0.2)
                row = await store.get_inbound(queue_id)
            [ticket] = await running.tickets()
    assert row is not None and row.state == "ingested" and row.attempts >= 1
    assert ticket.messages[0].flags == ("unauthenticated",)
    assert ticket.messages[0].auth is not None
    assert ticket.messages[0].auth["dmarc"] == "temperror"


async def test_a_reject_policy_that_cannot_be_checked_in_time_fails(
    tmp_path: Path, world: tuple[DnsStub, int], key: Key
) -> None:
    """The provider's key lookups stay unanswered for all of `retry_for`: the From domain asks
    receivers to refuse what it did not sign, so the mail is decided failed, never trusted."""
    stub, port = world
    stub.silent.add(f"sel._domainkey.{PROVIDER}")
    config = config_for(tmp_path, port, auth="retry_for = 3", dns_timeout=1)
    async with daemon_running(config) as running:
        message = signed(key, raw(mail(sender=VICTIM)), domain=PROVIDER)
        await running.send(message, sender=VICTIM)
        async with store_for(running.config) as store:
            deadline = time.monotonic() + 60
            while not await store.list_tickets():
                assert time.monotonic() < deadline, "the deferred mail was never decided"
                await asyncio.sleep(0.2)
        [ticket] = await running.tickets()
    assert ticket.flags == ("unverified_sender",)
    assert "dmarc_temperror" in ticket.messages[0].flags


async def ingest_all(running: Running, count: int, prefix: str) -> float:
    """Send `count` mails from as many domains over 10 connections; seconds until all are
    tickets."""
    started = time.monotonic()
    senders = [f"user@{prefix}{n}.net" for n in range(count)]

    async def send_some(chunk: list[str]) -> None:
        async with aiosmtplib.SMTP(hostname=running.host, port=running.port) as client:
            for sender in chunk:
                await client.sendmail(sender, [SUPPORT], raw(mail(sender=sender)))

    await asyncio.gather(*(send_some(senders[n::10]) for n in range(10)))
    async with store_for(running.config) as store:
        deadline = time.monotonic() + 120
        while len(await store.list_tickets()) < count:
            assert time.monotonic() < deadline, "not every mail became a ticket"
            await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_lost_dns_answers_delay_only_their_own_message(tmp_path: Path) -> None:
    """120 mails, first with every DNS answer, then with one answer in five lost: each lost
    answer is asked again after about a second and holds up only its own message, so the whole
    takes at most twice as long plus a few seconds (not 5-15 s per batch)."""
    async with dns_stub() as (stub, port):
        # The default dns_timeout: room for a query to be sent again after a lost answer.
        config = config_for(tmp_path / "clean", port)
        async with daemon_running(config) as running:
            clean = await ingest_all(running, 120, "clean")
        stub.loss, stub.lose_retries = 0.2, False  # each lost answer costs one resend
        config = config_for(tmp_path / "lossy", port)
        async with daemon_running(config) as running:
            lossy = await ingest_all(running, 120, "lossy")
            tickets = await running.tickets()
    assert stub.lost > 20
    assert all(t.messages[0].flags == ("unauthenticated",) for t in tickets)
    assert lossy <= 2 * clean + 5, (clean, lossy)


async def test_idn_sender_with_an_a_label_signature_passes(tmp_path: Path, key: Key) -> None:
    """From `anna@bücher.example`, signed `d=xn--bcher-kva.example`: one domain, compared as
    A-labels; shown as U-labels."""
    async with dns_stub() as (stub, port):
        stub.txt("sel._domainkey.xn--bcher-kva.example", key.dns_record)
        stub.txt("_dmarc.xn--bcher-kva.example", "v=DMARC1; p=reject")
        message = (
            "From: Anna <anna@bücher.example>\r\n"
            f"To: {SUPPORT}\r\n"
            "Subject: Umlaut\r\n"
            "Message-ID: <idn@xn--bcher-kva.example>\r\n"
            "\r\n"
            "Hallo.\r\n"
        ).encode()
        async with daemon_running(config_for(tmp_path, port)) as running:
            await send_raw(
                running,
                signed(key, message, domain="xn--bcher-kva.example"),
                sender="anna@xn--bcher-kva.example",
            )
            [ticket] = await running.tickets()
            text = running.cli("tickets", "show", "1").stdout
    auth = ticket.messages[0].auth
    assert auth is not None
    assert (auth["dkim"], auth["dmarc"], auth["trust"]) == ("pass", "pass", "authenticated")
    assert "d=bücher.example:pass" in text


async def test_a_planted_message_id_diverts_nothing(
    tmp_path: Path, world: tuple[DnsStub, int], key: Key
) -> None:
    """A stranger copies the victim's Message-ID onto a ticket of their own, with the victim
    on Cc: the victim's reply to their own mail still lands on their own ticket."""
    stub, port = world
    stub.txt("evil.net", "v=spf1 ip4:127.0.0.0/8 -all")  # the stranger's mail is authenticated
    async with daemon_running(config_for(tmp_path, port)) as running:
        await victim_ticket(running, key)
        plant = mail(sender=SPY, cc=VICTIM, subject="Hello", message_id=f"<v1@{PROVIDER}>")
        await running.send(plant, sender=SPY)
        reply = mail(
            sender=VICTIM,
            subject="Re: Printer on fire",
            in_reply_to=f"<v1@{PROVIDER}>",
            references=f"<v1@{PROVIDER}>",
        )
        await running.send(signed(key, raw(reply), domain=PROVIDER), sender=VICTIM)
        tickets = await running.tickets()
    assert [(t.requester.email, len(t.messages)) for t in tickets] == [(VICTIM, 2), (SPY, 1)]


async def test_after_a_bounce_an_unproven_mail_in_that_name_draws_no_automatic_mail(
    tmp_path: Path, relay: Relay
) -> None:
    """A permanent bounce marks the address; a mail claiming to be from it that proves nothing
    (its domain publishes nothing) does not clear the mark, so it gets no automatic mail."""
    customer = "carol@nodmarc.net"
    path = write_config(tmp_path, relay_port=relay.port)
    async with daemon_running(load_config(path)) as running:
        await running.send(mail(sender=customer), sender=customer)
        await mails_to(relay, customer, 2)
        returned = returned_headers(acknowledgement(relay, 1))
        await send_null_sender(running, dsn(returned, recipient=customer))
        await running.settle()
        assert undeliverable(running, customer) == "5.1.1"
        await running.send(mail(sender=customer, subject="Still there?"), sender=customer)
        await outbox_drained(running)
        assert undeliverable(running, customer) == "5.1.1"
    assert len([r for r in relay.received if customer in r.rcpt_tos]) == 2


async def test_check_config_says_what_happens_without_dns(tmp_path: Path) -> None:
    async with dns_stub() as (stub, port):
        stub.silent.add("_dmarc.mailgate-dns-probe.invalid")
        path = write_config(tmp_path / "silent", dns_port=port, dns_timeout=1)
        silent = await asyncio.to_thread(run_cli, "--config", str(path), "check-config")
        stub.silent.clear()
        answers = await asyncio.to_thread(run_cli, "--config", str(path), "check-config")
    assert silent.returncode == 0
    assert "DNS does not answer: mail from a domain in the DNS waits up to 900 s" in silent.stdout
    assert "becomes a ticket as unauthenticated" in silent.stdout
    assert "auth: DNS answers: sender checks run" in answers.stdout


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted-proxy", "untrusted-peer"])
async def test_spf_behind_a_proxy_judges_the_original_client(tmp_path: Path, trusted: bool) -> None:
    """Behind a trusted MTA, SPF is judged for the client it names with XFORWARD (a domain
    with -all, DMARC p=reject and no DKIM then passes); from any other peer XFORWARD is
    refused and SPF is judged for the peer itself."""
    async with dns_stub() as (stub, port):
        stub.txt("strict.net", "v=spf1 ip4:192.0.2.7 -all")
        stub.txt("_dmarc.strict.net", "v=DMARC1; p=reject")
        proxies = '["127.0.0.1"]' if trusted else "[]"
        path = write_config(tmp_path, dns_port=port, smtp_extra=f"trusted_proxies = {proxies}")
        async with daemon_running(load_config(path)) as running, raw_session(running) as conn:
            await conn.greeting()
            assert (await conn.command("EHLO mx.proxy.example")).startswith("250 ")
            reply = await conn.command("XFORWARD ADDR=192.0.2.7 HELO=mail.strict.net")
            assert reply == ("250 2.0.0 Ok" if trusted else XFORWARD_NOT_PERMITTED)
            assert (await conn.command("MAIL FROM:<anna@strict.net>")).startswith("250 ")
            assert (await conn.command(f"RCPT TO:<{SUPPORT}>")).startswith("250 ")
            assert (await conn.command("DATA")).startswith("354 ")
            reply = await conn.command(raw(mail(sender="anna@strict.net")) + b".")
            assert reply.startswith("250 2.0.0 Queued as ")
            [ticket] = await running.tickets()
    auth = ticket.messages[0].auth
    assert auth is not None
    if trusted:
        assert (auth["spf"], auth["dmarc"], auth["trust"]) == ("pass", "pass", "authenticated")
    else:
        assert (auth["spf"], auth["dmarc"], auth["trust"]) == ("fail", "fail", "failed")


# -- found by attacking it ---------------------------------------------------------------------


async def test_a_replayed_signed_mail_with_fields_added_on_top_gains_nothing(
    tmp_path: Path, world: tuple[DnsStub, int], key: Key, relay: Relay
) -> None:
    """dkimpy verifies the last instance of each signed field and readers take the first: an
    old signed mail of the victim with a Subject, Cc and Message-ID added above it is failed
    (`repeated_fields`), joins nothing and makes no one a participant."""
    _stub, port = world
    async with daemon_running(config_for(tmp_path, port, relay)) as running:
        await victim_ticket(running, key)
        old = mail(sender=VICTIM, to="friend@elsewhere.net", subject="lunch?", cc="bob@x.net")
        added = f"Subject: Re: [#1] Printer on fire\r\nCc: {SPY}\r\nMessage-ID: <new@x.net>\r\n"
        await running.send(added.encode() + signed(key, raw(old), domain=PROVIDER), sender=VICTIM)
        tickets = await running.tickets()
        reply = tmp_path / "reply.txt"
        reply.write_text("Your account number is 12345.\n")
        assert running.cli("reply", "1", "--body-file", str(reply)).returncode == 0
        await outbox_drained(running)
    assert [len(t.messages) for t in tickets] == [1, 1]
    assert tickets[1].flags == ("unverified_sender",)
    assert "repeated_fields" in tickets[1].messages[0].flags
    assert all(SPY not in r.rcpt_tos and "bob@x.net" not in r.rcpt_tos for r in relay.received)


async def test_fields_a_signature_does_not_cover_add_no_participants(
    tmp_path: Path, world: tuple[DnsStub, int], key: Key, relay: Relay
) -> None:
    """A mail proven by DKIM alone is proven only as far as its signature reaches: a Cc that
    the signature does not cover (added to a replayed mail) makes no one a participant, while
    a signed Cc does."""
    _stub, port = world
    async with daemon_running(config_for(tmp_path, port, relay)) as running:
        await victim_ticket(running, key)
        follow = raw(mail(sender=VICTIM, subject="Re: [#1] Printer on fire"))
        signature = dkim_sign(follow, key, [b"from", b"to", b"subject", b"date", b"message-id"])
        await running.send(signature + f"Cc: {SPY}\r\n".encode() + follow, sender=VICTIM)
        covered = raw(mail(sender=VICTIM, subject="Re: [#1] Printer on fire", cc="colleague@x.net"))
        await running.send(dkim_sign(covered, key, [b"from", b"to", b"cc", b"subject"]) + covered)
        [ticket] = await running.tickets()
        reply = tmp_path / "reply.txt"
        reply.write_text("Fixed.\n")
        assert running.cli("reply", "1", "--body-file", str(reply)).returncode == 0
        await outbox_drained(running)
    assert len(ticket.messages) == 3
    [answer] = [r for r in relay.received if "Re:" in str(r.message["Subject"])]
    assert answer.rcpt_tos == [VICTIM, "colleague@x.net"]


def dkim_sign(message: bytes, key: Key, headers: list[bytes]) -> bytes:
    import dkim

    return bytes(
        dkim.sign(
            message,
            b"sel",
            PROVIDER.encode(),
            key.private_pem,
            include_headers=headers,
            linesep=b"\r\n",
        )
    )


async def test_authentication_results_are_believed_only_from_the_trusted_mta(
    tmp_path: Path, world: tuple[DnsStub, int], relay: Relay
) -> None:
    """With `trusted_authserv_id`, a client that is not the MTA writing that MTA's results
    itself proves nothing: mailgate checks for itself, and the forged agent answer fails."""
    _stub, port = world
    path = write_config(
        tmp_path,
        relay_port=relay.port,
        dns_port=port,
        auth_extra='trusted_authserv_id = "mx.example.com"',
        smtp_extra='trusted_proxies = ["192.0.2.25"]',  # the MTA; the test connects from 127.0.0.1
    )
    async with daemon_running(load_config(path)) as running:
        await running.send(mail(sender="ann@customer.net"), sender="ann@customer.net")
        await mails_to(relay, "ann@customer.net", 2)
        forged = (
            b"Authentication-Results: mx.example.com; dmarc=pass header.from=example.com;"
            b" dkim=pass header.d=example.com\r\n"
        ) + raw(mail(sender="Agent <agent@example.com>", subject="Re: [#1] Printer on fire"))
        await running.send(forged, sender="agent@example.com")
        tickets = await running.tickets()
        await outbox_drained(running)
    assert [len(t.messages) for t in tickets] == [1, 1]
    assert tickets[1].messages[0].auth is not None
    assert tickets[1].messages[0].auth["trust"] == "failed"
    assert "forged_authentication_results" in tickets[1].messages[0].flags
    assert len(relay.received) == 2


def test_trusted_authserv_id_needs_trusted_proxies(tmp_path: Path) -> None:
    path = write_config(tmp_path, auth_extra='trusted_authserv_id = "mx.example.com"')
    result = run_cli("--config", str(path), "check-config")
    assert result.returncode == 78
    assert "auth.trusted_authserv_id" in result.stderr and "trusted_proxies" in result.stderr


async def test_a_failed_bounce_is_no_bounce(
    tmp_path: Path, world: tuple[DnsStub, int], key: Key, relay: Relay
) -> None:
    """A DSN-shaped mail that returns one of our mails but fails (a second From, a bare CR)
    files no note on that ticket and marks no one undeliverable."""
    _stub, port = world
    async with daemon_running(config_for(tmp_path, port, relay)) as running:
        await victim_ticket(running, key)
        await mails_to(relay, VICTIM, 2)
        bounce = dsn(returned_headers(acknowledgement(relay, 1)), recipient=VICTIM)
        forged = f"From: {SPY}\r".encode() + b"\nX-Note: x\r" + bounce
        await send_null_sender(running, forged)
        tickets = await running.tickets()
        assert undeliverable(running, VICTIM) is None
    assert [len(t.messages) for t in tickets] == [1, 1]
    assert tickets[1].flags == ("unverified_sender",)


async def test_a_domain_whose_dns_never_answers_cannot_hold_up_everyone(
    tmp_path: Path, world: tuple[DnsStub, int], key: Key, capsys: pytest.CaptureFixture[str]
) -> None:
    """Many mails from a domain whose nameservers never answer: only a few of them wait on
    DNS at once, the rest wait in the store, and a signed mail from someone else becomes a
    ticket while they are all still undecided."""
    stub, port = world
    stub.silent.update({"_dmarc.slow-evil.net", "slow-evil.net"})
    config = config_for(tmp_path, port)
    async with daemon_running(config) as running:
        async with aiosmtplib.SMTP(hostname=running.host, port=running.port) as client:
            for n in range(200):  # more than its source's share of the checks
                await client.sendmail(
                    f"x{n}@slow-evil.net", [SUPPORT], raw(mail(sender=f"x{n}@slow-evil.net"))
                )
        normal = signed(key, raw(mail(sender=VICTIM, subject="Normal")), domain=PROVIDER)
        await running.send(normal, sender=VICTIM)
        async with store_for(running.config) as store:
            deadline = time.monotonic() + 30
            while not await store.list_tickets():
                assert time.monotonic() < deadline, "the normal mail was held up"
                await asyncio.sleep(0.05)
            tickets = await store.list_tickets()
            waiting = [r for r in await store.list_inbound("received")]
    assert [t.subject for t in tickets] == ["Normal"]
    assert len(waiting) == 200
    assert "authentication_throttled" in capsys.readouterr().out  # past its source's share


def test_keys_too_costly_to_verify_are_not_used() -> None:
    """An RSA key over 4096 bits, or with a huge exponent, would cost the parser process
    seconds per signature (dkimpy's pure-Python pow): it verifies nothing."""
    assert _affordable(rsa_record(2048, 65537))
    assert _affordable(rsa_record(4096, 65537))
    assert not _affordable(rsa_record(8192, 65537))
    assert not _affordable(rsa_record(2048, (1 << 40) + 1))


def rsa_record(bits: int, exponent: int) -> bytes:
    """A DKIM key record of an RSA public key with a modulus of `bits` (DER written here)."""

    def der(tag: int, body: bytes) -> bytes:
        size = len(body)
        length = bytes([size]) if size < 128 else bytes([0x80 | ((size.bit_length() + 7) // 8)])
        if size >= 128:
            length += size.to_bytes((size.bit_length() + 7) // 8, "big")
        return bytes([tag]) + length + body

    def integer(value: int) -> bytes:
        return der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))

    modulus = (1 << (bits - 1)) | 1
    rsa_key = der(0x30, integer(modulus) + integer(exponent))
    algorithm = der(0x30, der(0x06, bytes.fromhex("2a864886f70d010101")) + b"\x05\x00")
    spki = der(0x30, algorithm + der(0x03, b"\x00" + rsa_key))
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(spki)
