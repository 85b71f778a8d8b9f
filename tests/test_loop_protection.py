"""Loop protection, bounces and header injection, as the relay and the CLI see them.

Every test runs the real daemon with outbound mail going to a recording SMTP relay on loopback.
"No mail was sent" is proven with a barrier, not a sleep: after the mail under test, a person
writes in from a fresh address, the test waits for that person's two automatic mails and for
the outbox to hold nothing queued or in flight, and only then counts what else the relay got.
"""

from __future__ import annotations

import asyncio
import base64
import email.policy
import re
import time
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

import aiosmtplib
import pytest

from mailgate.config import Config, load_config
from mailgate.model import Ticket
from mailgate.store import store_for
from tests.conftest import (
    SUPPORT,
    Received,
    Relay,
    Running,
    cli_json,
    daemon_running,
    mail,
    write_config,
)

CUSTOMER = "customer@example.org"
BARRIER = "barrier@example.net"
VERIFY = "Please confirm your email address"
ACK = "We received your request"


# ---------------------------------------------------------------------------------------------
# Helpers


def raw_mail(headers: dict[str, str], body: str = "Hello.\r\n") -> bytes:
    """A minimal message as raw bytes, headers exactly as given (plus Date and Message-ID)."""
    lines = [f"{name}: {value}" for name, value in headers.items()]
    if "Date" not in headers:
        lines.append(f"Date: {formatdate()}")
    if "Message-ID" not in headers:
        lines.append(f"Message-ID: {make_msgid(domain='client.example')}")
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def encoded_word(text: str) -> str:
    """`text` as one RFC 2047 base64 encoded word: how CR/LF can hide in a header."""
    return f"=?utf-8?b?{base64.b64encode(text.encode()).decode()}?="


def header_block(received: Received) -> bytes:
    head, sep, _body = received.raw.partition(b"\r\n\r\n")
    assert sep, received.raw[:500]
    return head


def to(received: Received) -> list[str]:
    return [r.lower() for r in received.rcpt_tos]


async def send_null_sender(running: Running, message: EmailMessage | bytes) -> str:
    """Send with MAIL FROM:<>, as bounces and notifications arrive; return the queue id."""
    if isinstance(message, EmailMessage):
        message = message.as_bytes(policy=email.policy.SMTP)
    async with aiosmtplib.SMTP(hostname=running.host, port=running.port) as client:
        errors, reply = await client.sendmail("", [SUPPORT], message)
    assert not errors, errors
    assert reply.startswith("2.0.0 Queued as "), reply
    return reply.rsplit(" ", 1)[1]


async def outbox_drained(running: Running, *, within: float = 15) -> None:
    """Wait until ingest is done and no outbox row is queued or being sent."""
    await running.settle()
    deadline = time.monotonic() + within
    async with store_for(running.config) as store:
        while True:
            rows = await store.list_outbox()
            busy = [r for r in rows if r.state in ("queued", "sending")]
            if not busy:
                return
            assert time.monotonic() < deadline, f"outbox still busy: {busy}"
            await asyncio.sleep(0.05)


async def mails_to(relay: Relay, address: str, count: int, *, within: float = 15) -> list[Received]:
    """Wait until the relay got at least `count` mails for `address`; return those."""
    deadline = time.monotonic() + within
    while True:
        found = [r for r in relay.received if address.lower() in to(r)]
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, f"relay got {len(found)} of {count} for {address}"
        await asyncio.sleep(0.05)


async def barrier(running: Running, relay: Relay, expect: int = 2) -> list[Received]:
    """A person writes in from a fresh address; once their `expect` automatic mails are out and
    the outbox is idle, return every mail the relay got for anyone else."""
    await running.send(mail(sender=f"Barrier <{BARRIER}>", subject="Barrier"), sender=BARRIER)
    await mails_to(relay, BARRIER, expect)
    await outbox_drained(running)
    return [r for r in relay.received if BARRIER not in to(r)]


async def first_contact(running: Running, relay: Relay, sender: str = CUSTOMER) -> Ticket:
    """A new requester writes in; wait for verification and acknowledgement; return the ticket."""
    await running.send(mail(sender=f"Customer <{sender}>"), sender=sender)
    got = await mails_to(relay, sender, 2)
    subjects = sorted(str(r.message["Subject"]) for r in got)
    [ticket] = [t for t in await running.tickets() if t.requester.email == sender]
    assert subjects == [f"{VERIFY} [#{ticket.id}]", f"{ACK} [#{ticket.id}]"]
    return ticket


def acknowledgement(relay: Relay, ticket_id: int) -> Received:
    """The acknowledgement mailgate sent for a ticket, as the relay got it."""
    [ack] = [r for r in relay.received if r.message["Subject"] == f"{ACK} [#{ticket_id}]"]
    return ack


def acknowledgement_id(relay: Relay, ticket_id: int) -> str:
    """The Message-ID (without brackets) of the acknowledgement mailgate sent for a ticket."""
    return str(acknowledgement(relay, ticket_id).message["Message-ID"]).strip().strip("<>")


def dsn(
    returned: bytes,
    *,
    recipient: str,
    status: str = "5.1.1",
    action: str = "failed",
    returned_type: str = "text/rfc822-headers",
) -> bytes:
    """An RFC 3464 delivery status notification, as Postfix writes one, returning `returned`
    (a header block for text/rfc822-headers, a whole message for message/rfc822)."""
    head = (
        "From: Mail Delivery System <MAILER-DAEMON@mx.example.org>\r\n"
        f"To: <{SUPPORT}>\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {formatdate()}\r\n"
        f"Message-ID: {make_msgid(domain='mx.example.org')}\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B0UND"\r\n'
        "\r\n"
        "--B0UND\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
        "I'm sorry to have to inform you that your message could not be delivered.\r\n"
        "\r\n"
        "--B0UND\r\n"
        "Content-Type: message/delivery-status\r\n"
        "\r\n"
        "Reporting-MTA: dns; mx.example.org\r\n"
        f"Arrival-Date: {formatdate()}\r\n"
        "\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\n"
        f"Original-Recipient: rfc822;{recipient}\r\n"
        f"Action: {action}\r\n"
        f"Status: {status}\r\n"
        f"Diagnostic-Code: smtp; 550 {status} <{recipient}>: Recipient address rejected\r\n"
        "\r\n"
        "--B0UND\r\n"
        f"Content-Type: {returned_type}\r\n"
        "\r\n"
    )
    return head.encode() + returned.rstrip(b"\r\n") + b"\r\n\r\n--B0UND--\r\n"


def returned_headers(received: Received, *, replace: tuple[str, str] = ("", "")) -> bytes:
    """The header block of a mail of ours, as a bounce returns it; `replace` forges an ID."""
    old, new = replace
    return header_block(received).replace(old.encode(), new.encode())


def undeliverable(running: Running, email: str) -> object:
    return cli_json(running, "requesters", "show", email)["undeliverable"]


# ---------------------------------------------------------------------------------------------
# Automatic mail is stored but never answered


async def test_auto_submitted_mail_is_stored_and_gets_no_automatic_mail(
    relay_config: Config, relay: Relay
) -> None:
    """An auto-replied mail from a new address becomes a ticket, and nothing is sent to it."""
    async with daemon_running(relay_config) as running:
        message = mail(sender="Robot <robot@example.org>", subject="Your order has shipped")
        message["Auto-Submitted"] = "auto-replied"
        await running.send(message, sender="robot@example.org")
        others = await barrier(running, relay)
        tickets = await running.tickets()
    assert others == []
    [robot] = [t for t in tickets if t.requester.email == "robot@example.org"]
    assert robot.subject == "Your order has shipped"
    assert [m.author for m in robot.messages] == ["customer"]


@pytest.mark.parametrize(
    ("extra", "sender"),
    [
        pytest.param({"Auto-Submitted": "auto-generated"}, "robot@example.org", id="auto-gen"),
        pytest.param(
            {"Auto-Submitted": "auto-replied; owner-email=x@y.example"},
            "vacation@example.org",
            id="auto-replied-with-params",
        ),
        pytest.param({"Precedence": "list"}, "list@example.org", id="precedence-list"),
        pytest.param({"Precedence": "bulk"}, "news@example.org", id="precedence-bulk"),
        pytest.param({"Precedence": "Junk"}, "junk@example.org", id="precedence-junk"),
        pytest.param(
            {"List-Id": "Users <users.lists.example.org>"}, "users@lists.example.org", id="list-id"
        ),
        pytest.param({"X-Auto-Response-Suppress": "OOF"}, "oof@example.org", id="suppress-oof"),
        pytest.param(
            {"X-Auto-Response-Suppress": "DR, AutoReply"}, "crm@example.org", id="suppress-list"
        ),
        pytest.param({"X-Autoreply": "yes"}, "away@example.org", id="x-autoreply"),
        pytest.param({"X-Autorespond": "Out of office"}, "away@example.org", id="x-autorespond"),
        pytest.param({}, "MAILER-DAEMON@mx.example.org", id="mailer-daemon-from"),
        pytest.param({}, "postmaster@example.org", id="postmaster-from"),
        pytest.param({}, SUPPORT, id="own-support-address"),
        pytest.param({}, "helpdesk@help.example.com", id="own-accepted-domain"),
    ],
)
async def test_automatic_or_own_mail_gets_no_automatic_mail(
    relay_config: Config, relay: Relay, extra: dict[str, str], sender: str
) -> None:
    """Lists, bulk mail, auto-replies, mailer daemons and mailgate's own addresses are stored
    on a ticket but never answered."""
    async with daemon_running(relay_config) as running:
        message = mail(sender=sender, subject="Something automatic")
        for name, value in extra.items():
            message[name] = value
        await running.send(message, sender=sender)
        others = await barrier(running, relay)
        tickets = await running.tickets()
    assert others == [], [(r.rcpt_tos, r.message["Subject"]) for r in others]
    stored = [t for t in tickets if t.subject == "Something automatic"]
    assert len(stored) == 1 and stored[0].requester.email.lower() == sender.lower()


async def test_null_envelope_sender_gets_no_automatic_mail(
    relay_config: Config, relay: Relay
) -> None:
    """MAIL FROM:<> (a bounce or other notification) is stored but never answered, even when
    its From header looks like a person's."""
    async with daemon_running(relay_config) as running:
        queue_id = await send_null_sender(running, mail(sender="Ann <ann@example.org>"))
        async with store_for(running.config) as store:
            row = await store.get_inbound(queue_id)
        assert row is not None and row.envelope.mail_from in ("", "<>")  # a null reverse-path
        others = await barrier(running, relay)
        tickets = await running.tickets()
    assert others == []
    assert {t.requester.email for t in tickets} == {"ann@example.org", BARRIER}


async def test_postmaster_envelope_sender_gets_no_automatic_mail(
    relay_config: Config, relay: Relay
) -> None:
    """A role envelope sender (postmaster@) is never answered, whatever the From header says."""
    async with daemon_running(relay_config) as running:
        await running.send(mail(sender="Ann <ann@example.org>"), sender="postmaster@example.org")
        others = await barrier(running, relay)
        assert len(await running.tickets()) == 2
    assert others == []


@pytest.mark.parametrize(
    "extra",
    [
        {"Auto-Submitted": "no"},
        {"X-Auto-Response-Suppress": "DR, RN"},
        {"Precedence": "first-class"},
    ],
    ids=["auto-submitted-no", "suppress-receipts-only", "precedence-first-class"],
)
async def test_headers_that_do_not_mark_automatic_mail_still_get_answered(
    relay_config: Config, relay: Relay, extra: dict[str, str]
) -> None:
    """The suppression is not overbroad: a person's mail with these headers gets its 2 mails."""
    async with daemon_running(relay_config) as running:
        message = mail(sender=f"Customer <{CUSTOMER}>")
        for name, value in extra.items():
            message[name] = value
        await running.send(message, sender=CUSTOMER)
        got = await mails_to(relay, CUSTOMER, 2)
    assert {str(r.message["Subject"]).rsplit(" [", 1)[0] for r in got} == {VERIFY, ACK}


async def test_automatic_mails_carry_rfc3834_headers(relay_config: Config, relay: Relay) -> None:
    """Verification and acknowledgement say they are automatic, so other robots stay quiet."""
    async with daemon_running(relay_config) as running:
        await first_contact(running, relay)
    for received in relay.received:
        assert received.message["Auto-Submitted"] == "auto-replied"
        assert received.message["X-Auto-Response-Suppress"] == "All"
        assert received.mail_from == SUPPORT


# ---------------------------------------------------------------------------------------------
# Bounces


@pytest.mark.parametrize("returned_type", ["text/rfc822-headers", "message/rfc822"])
async def test_bounce_is_filed_on_its_ticket_and_marks_recipient_until_they_write_again(
    relay_config: Config, relay: Relay, returned_type: str
) -> None:
    """A DSN returning our acknowledgement becomes a system note on that ticket, sends nothing,
    marks the address undeliverable; the person writing in again clears it and is answered."""
    async with daemon_running(relay_config) as running:
        ticket = await first_contact(running, relay)
        ack = acknowledgement(relay, ticket.id)
        returned = ack.raw if returned_type == "message/rfc822" else returned_headers(ack)
        await send_null_sender(
            running, dsn(returned, recipient=CUSTOMER, returned_type=returned_type)
        )
        others = await barrier(running, relay)
        tickets = await running.tickets()
        assert undeliverable(running, CUSTOMER) == "5.1.1"

        [bounced] = [t for t in tickets if t.id == ticket.id]
        assert [(m.author, m.thread_reason) for m in bounced.messages] == [
            ("customer", "new"),
            ("system", "bounce"),
        ]
        assert bounced.status == "open"
        assert {t.requester.email for t in tickets} == {CUSTOMER, BARRIER}  # no DSN ticket
        assert [to(r) for r in others] == [[CUSTOMER], [CUSTOMER]]  # only the first contact

        await running.send(mail(subject="Still on fire"), sender=CUSTOMER)
        got = await mails_to(relay, CUSTOMER, 3)
        [again] = [t for t in await running.tickets() if t.subject == "Still on fire"]
        assert got[-1].message["Subject"] == f"{ACK} [#{again.id}]"
        assert undeliverable(running, CUSTOMER) is None


async def test_temporary_failure_is_filed_but_does_not_mark_undeliverable(
    relay_config: Config, relay: Relay
) -> None:
    """A 'delayed' DSN (4.x.x) is a system note on its ticket but the address stays usable."""
    async with daemon_running(relay_config) as running:
        ticket = await first_contact(running, relay)
        returned = returned_headers(acknowledgement(relay, ticket.id))
        await send_null_sender(
            running, dsn(returned, recipient=CUSTOMER, status="4.4.1", action="delayed")
        )
        [after] = await running.tickets()
        assert [m.thread_reason for m in after.messages] == ["new", "bounce"]
        assert undeliverable(running, CUSTOMER) is None


async def test_bounce_into_closed_ticket_keeps_it_closed(
    relay_config: Config, relay: Relay
) -> None:
    """A bounce is automatic mail: filed on the closed ticket, it does not reopen it."""
    async with daemon_running(relay_config) as running:
        ticket = await first_contact(running, relay)
        assert running.cli("close", str(ticket.id)).returncode == 0
        returned = returned_headers(acknowledgement(relay, ticket.id))
        await send_null_sender(running, dsn(returned, recipient=CUSTOMER))
        [after] = await running.tickets()
    assert after.status == "closed"
    assert [m.thread_reason for m in after.messages] == ["new", "bounce"]


def _flip_mac(message_id: str) -> str:
    """The same ID with the last hex digit of its MAC changed."""
    match = re.fullmatch(r"(mg-\d+-[0-9a-f]+-[0-9a-f]*)([0-9a-f])(@.+)", message_id)
    assert match, message_id
    last = "0" if match.group(2) != "0" else "1"
    return match.group(1) + last + match.group(3)


def _renumber(message_id: str, ticket_id: int) -> str:
    return re.sub(r"^mg-\d+-", f"mg-{ticket_id}-", message_id)


@pytest.mark.parametrize("forgery", ["wrong-mac", "other-ticket-number"])
async def test_bounce_with_forged_message_id_is_not_filed_as_bounce(
    relay_config: Config, relay: Relay, forgery: str
) -> None:
    """A DSN naming a Message-ID whose HMAC does not check out (a flipped MAC, or a real ID
    renumbered to another ticket) files no bounce and marks nobody undeliverable."""
    victim = "victim@example.org"
    async with daemon_running(relay_config) as running:
        own = await first_contact(running, relay)
        target = await first_contact(running, relay, sender=victim)
        real = acknowledgement_id(relay, own.id)
        forged = _flip_mac(real) if forgery == "wrong-mac" else _renumber(real, target.id)
        returned = returned_headers(acknowledgement(relay, own.id), replace=(real, forged))
        assert forged.encode() in returned and real.encode() not in returned
        target_email = CUSTOMER if forgery == "wrong-mac" else victim
        await send_null_sender(running, dsn(returned, recipient=target_email))
        others = await barrier(running, relay)
        tickets = await running.tickets()
        assert undeliverable(running, CUSTOMER) is None
        assert undeliverable(running, victim) is None
    for ticket in (t for t in tickets if t.id in (own.id, target.id)):
        assert [(m.author, m.thread_reason) for m in ticket.messages] == [("customer", "new")]
    assert all(m.thread_reason != "bounce" for t in tickets for m in t.messages)
    # Still stored, on a ticket of its own, and never answered.
    [stored] = [t for t in tickets if t.requester.email.lower() == "mailer-daemon@mx.example.org"]
    assert stored.messages[0].author == "customer"
    assert len(others) == 4


async def test_bounce_cannot_mark_someone_the_returned_mail_was_not_sent_to(
    relay_config: Config, relay: Relay
) -> None:
    """A DSN for mail sent to the attacker, claiming a third party failed, must not mark that
    third party: our acknowledgement for ticket 1 only ever went to its requester."""
    attacker, victim = "mallory@example.org", "victim@example.org"
    async with daemon_running(relay_config) as running:
        await first_contact(running, relay, sender=victim)
        mine = await first_contact(running, relay, sender=attacker)
        returned = returned_headers(acknowledgement(relay, mine.id))  # the attacker got this one
        await send_null_sender(running, dsn(returned, recipient=victim))
        await running.settle()
        assert undeliverable(running, victim) is None


# ---------------------------------------------------------------------------------------------
# Closed tickets


@pytest.mark.parametrize(
    ("extra", "envelope"),
    [
        pytest.param({"Auto-Submitted": "auto-replied"}, CUSTOMER, id="auto-submitted"),
        pytest.param({"X-Autoreply": "yes"}, CUSTOMER, id="x-autoreply"),
        pytest.param({"X-Auto-Response-Suppress": "All"}, CUSTOMER, id="suppress-all"),
        pytest.param({}, "", id="null-sender"),
    ],
)
async def test_out_of_office_keeps_closed_ticket_closed_but_a_reply_reopens_it(
    relay_config: Config, relay: Relay, extra: dict[str, str], envelope: str
) -> None:
    """An out-of-office threaded into a closed ticket is stored there, sends nothing and leaves
    it closed; the requester's own reply then reopens it."""
    async with daemon_running(relay_config) as running:
        ticket = await first_contact(running, relay)
        ack_id = f"<{acknowledgement_id(relay, ticket.id)}>"
        assert running.cli("close", str(ticket.id)).returncode == 0

        oof = mail(
            subject=f"Automatic reply: {ACK} [#{ticket.id}]",
            body="I am out of the office until Monday.\n",
            in_reply_to=ack_id,
            references=ack_id,
        )
        for name, value in extra.items():
            oof[name] = value
        if envelope:
            await running.send(oof, sender=envelope)
        else:
            await send_null_sender(running, oof)
        others = await barrier(running, relay)
        [after_oof] = [t for t in await running.tickets() if t.id == ticket.id]
        assert after_oof.status == "closed"
        assert [m.thread_reason for m in after_oof.messages] == ["new", "references"]
        assert len(others) == 2  # the first contact's two, nothing for the out-of-office

        await running.send(
            mail(subject=f"Re: Printer on fire [#{ticket.id}]", in_reply_to=ack_id),
            sender=CUSTOMER,
        )
        [after_reply] = [t for t in await running.tickets() if t.id == ticket.id]
    assert after_reply.status == "open"
    assert after_reply.message_count == 3


# ---------------------------------------------------------------------------------------------
# Rate limit


@pytest.mark.parametrize("case_varied", [False, True], ids=["same-spelling", "case-varied"])
async def test_twenty_mails_in_a_minute_get_at_most_five_automatic_mails(
    relay_config: Config, relay: Relay, case_varied: bool
) -> None:
    """20 new tickets from one address within a minute are all stored, but that address gets
    at most `auto_reply_limit` (5) automatic mails; others are not held back by it. Spelling
    the local part in different cases does not get round the limit."""
    async with daemon_running(relay_config) as running:
        for n in range(20):
            sender = CUSTOMER.upper() if case_varied and n % 2 else CUSTOMER
            await running.send(mail(sender=sender, subject=f"Problem number {n}"), sender=sender)
        await running.settle()
        others = await barrier(running, relay)
        tickets = await running.tickets()
    assert sorted(t.subject for t in tickets if t.requester.email.lower() == CUSTOMER) == sorted(
        f"Problem number {n}" for n in range(20)
    )
    assert all(to(r) == [CUSTOMER] for r in others), [r.rcpt_tos for r in others]
    assert 1 <= len(others) <= 5, [r.message["Subject"] for r in others]


async def test_auto_reply_limit_comes_from_config(
    tmp_path_factory: pytest.TempPathFactory, relay: Relay
) -> None:
    """`[outbound] auto_reply_limit` sets the cap: with 1, a new requester gets 1 automatic mail
    however many tickets they open."""
    folder = tmp_path_factory.mktemp("limit")
    config = load_config(
        write_config(folder, relay_port=relay.port, outbound_extra="auto_reply_limit = 1\n")
    )
    async with daemon_running(config) as running:
        for n in range(3):
            await running.send(mail(subject=f"Problem {n}"), sender=CUSTOMER)
        others = await barrier(running, relay, expect=1)
    assert len(others) == 1 and to(others[0]) == [CUSTOMER]


# ---------------------------------------------------------------------------------------------
# Header injection


INJECTIONS = {
    "crlf": "\r\n",
    "lf": "\n",
    "cr": "\r",
    "nel": "\x85",
    "line-separator": "\u2028",
}


def header_fields(received: Received) -> list[tuple[str, list[bytes]]]:
    """The top-level header fields as (lower-case name, physical lines), folds kept apart."""
    fields: list[tuple[str, list[bytes]]] = []
    for line in header_block(received).split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1].append(line)
        else:
            fields.append((line.split(b":", 1)[0].decode("ascii", "replace").lower(), [line]))
    return fields


def assert_no_injection(received: Received, recipient: str) -> None:
    """No line break but CRLF in the header block, no Bcc, the payload only inside the To or
    Subject field it came in through, To on one line, and only the intended RCPT TO."""
    head = header_block(received)
    assert b"\r" not in head.replace(b"\r\n", b""), head
    assert b"\n" not in head.replace(b"\r\n", b""), head
    fields = header_fields(received)
    names = [name for name, _lines in fields]
    assert "bcc" not in names, names
    assert not re.search(rb"(?im)^bcc:", head), head
    for name, lines in fields:
        if any(b"victim" in line for line in lines):
            assert name in ("to", "subject"), (name, lines)
    [to_lines] = [lines for name, lines in fields if name == "to"]
    assert len(to_lines) == 1, f"To folded over more than one line: {to_lines}"
    assert [a.addr_spec for a in received.message["To"].addresses] == [recipient]
    assert to(received) == [recipient]


@pytest.mark.parametrize("breaker", list(INJECTIONS.values()), ids=list(INJECTIONS))
async def test_injected_display_name_adds_no_header_or_recipient(
    relay_config: Config, relay: Relay, tmp_path_factory: pytest.TempPathFactory, breaker: str
) -> None:
    """A From name that decodes to 'Eve<line break>Bcc: victim@example.net' yields outgoing
    mail (verification, acknowledgement, agent reply) with no Bcc and no extra recipient."""
    eve = "eve@example.org"
    name = encoded_word(f"Eve{breaker}Bcc: victim@example.net")
    raw = raw_mail(
        {"From": f"{name} <{eve}>", "To": SUPPORT, "Subject": "hello", "MIME-Version": "1.0"},
    )
    body = tmp_path_factory.mktemp("reply") / "reply.txt"
    body.write_text("We are on it.\n", encoding="utf-8")
    async with daemon_running(relay_config) as running:
        await running.send(raw, sender=eve)
        await mails_to(relay, eve, 2)
        [ticket] = await running.tickets()
        result = running.cli("reply", str(ticket.id), "--body-file", str(body))
        assert result.returncode == 0, result.stderr
        got = await mails_to(relay, eve, 3)
        await outbox_drained(running)
    assert len(relay.received) == 3
    for received in got:
        assert_no_injection(received, eve)
    # The agent's reply does carry the name (so the test exercises it), cleaned to one line.
    [reply] = [r for r in got if r.message["Auto-Submitted"] is None]
    assert reply.message["To"].addresses[0].display_name == "Eve Bcc: victim@example.net"


@pytest.mark.parametrize("breaker", list(INJECTIONS.values()), ids=list(INJECTIONS))
async def test_injected_subject_adds_no_header_to_agent_reply(
    relay_config: Config, relay: Relay, tmp_path_factory: pytest.TempPathFactory, breaker: str
) -> None:
    """A Subject that decodes to 'Help<line break>Bcc: victim@example.net' reaches the agent's
    reply as one clean 'Re: ... [#N]' line and adds no header or recipient."""
    subject = encoded_word(f"Help{breaker}Bcc: victim@example.net")
    raw = raw_mail({"From": f"Customer <{CUSTOMER}>", "To": SUPPORT, "Subject": subject})
    body = tmp_path_factory.mktemp("reply") / "reply.txt"
    body.write_text("We are on it.\n", encoding="utf-8")
    async with daemon_running(relay_config) as running:
        await running.send(raw, sender=CUSTOMER)
        await mails_to(relay, CUSTOMER, 2)
        [ticket] = await running.tickets()
        assert ticket.subject == "Help Bcc: victim@example.net"
        result = running.cli("reply", str(ticket.id), "--body-file", str(body))
        assert result.returncode == 0, result.stderr
        got = await mails_to(relay, CUSTOMER, 3)
        await outbox_drained(running)
    assert len(relay.received) == 3
    for received in got:
        assert_no_injection(received, CUSTOMER)
    [reply] = [r for r in got if str(r.message["Subject"]).startswith("Re:")]
    assert reply.message["Subject"] == f"Re: Help Bcc: victim@example.net [#{ticket.id}]"
    assert reply.message["Auto-Submitted"] is None  # an agent's reply is not automatic
