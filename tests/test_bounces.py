"""Bounces as real MTAs write them, through the daemon: filed, marking, and revoking links.

Each test runs the real daemon with its outbound mail going to a recording relay; the
bounces are written as Exim, qmail, Exchange, Office 365, Domino, Courier, Sendmail and
Postfix write them (`tests/bounce_formats.py`), returning the mail the relay got, and come
in with the null sender as bounces do. "Nothing was sent" is proven with the barrier of
`test_loop_protection`.
"""

from __future__ import annotations

import base64
import email.policy
from email import message_from_bytes
from email.message import EmailMessage

import pytest

from mailgate.config import Config
from mailgate.model import Ticket
from mailgate.store import store_for
from tests.bounce_formats import FORMATS, STATUS
from tests.conftest import Received, Relay, Running, daemon_running, mail
from tests.test_loop_protection import (
    BARRIER,
    CUSTOMER,
    VERIFY,
    acknowledgement,
    barrier,
    dsn,
    first_contact,
    mails_to,
    returned_headers,
    send_null_sender,
    to,
    undeliverable,
)
from tests.test_outbound import get, link_path


def verification(relay: Relay, ticket_id: int) -> Received:
    [found] = [r for r in relay.received if r.message["Subject"] == f"{VERIFY} [#{ticket_id}]"]
    return found


async def bounce_note(running: Running, ticket_id: int) -> Ticket:
    [ticket] = [t for t in await running.tickets() if t.id == ticket_id]
    assert [(m.author, m.thread_reason) for m in ticket.messages] == [
        ("customer", "new"),
        ("system", "bounce"),
    ]
    return ticket


async def stored_copies(config: Config, ticket: Ticket) -> list[bytes]:
    """What the store keeps of the bounce: its note's text and HTML, and its attachments."""
    note = ticket.messages[-1]
    found = [note.body_text.encode(), (note.body_html or "").encode()]
    async with store_for(config) as store:
        for attachment in note.attachments:
            assert attachment.id is not None
            content = await store.attachment_content(attachment.id, config.storage.attachments)
            assert content is not None
            found.append(content)
    return found


@pytest.mark.parametrize("fmt", list(FORMATS))
async def test_bounce_as_an_mta_writes_it_is_filed_and_marks_the_recipient(
    relay_config: Config, relay: Relay, fmt: str
) -> None:
    """A bounce of our acknowledgement, in each MTA's own format, becomes a system note on its
    ticket, marks the address undeliverable with the status it gives, and gets no mail."""
    async with daemon_running(relay_config) as running:
        ticket = await first_contact(running, relay)
        returned = acknowledgement(relay, ticket.id).raw
        await send_null_sender(running, FORMATS[fmt](CUSTOMER, returned))
        others = await barrier(running, relay)
        await bounce_note(running, ticket.id)
        assert undeliverable(running, CUSTOMER) == STATUS[fmt]
        tickets = await running.tickets()
    assert {t.requester.email for t in tickets} == {CUSTOMER, BARRIER}  # no ticket of its own
    assert [to(r) for r in others] == [[CUSTOMER], [CUSTOMER]]  # only the first contact's


@pytest.mark.parametrize("fmt", ["exim", "qmail", "postfix", "domino"])
async def test_a_bounced_verification_link_answers_410_and_no_stored_copy_holds_it(
    relay_config: Config, relay: Relay, fmt: str
) -> None:
    """A permanent bounce that returns the verification mail (inline or attached) revokes its
    link: it answers 410 and verifies no one; the note and its attachments keep no link."""
    async with daemon_running(relay_config) as running:
        ticket = await first_contact(running, relay)
        sent = verification(relay, ticket.id)
        path = link_path(sent)
        await send_null_sender(running, FORMATS[fmt](CUSTOMER, sent.raw))
        await running.settle()
        bounced = await bounce_note(running, ticket.id)
        token = path.rsplit("/", 1)[1].encode()
        assert not any(token in copy for copy in await stored_copies(relay_config, bounced))
        status, page = await get(running, path)
        assert status == 410, page
        assert "withdrawn" in page
        assert undeliverable(running, CUSTOMER) == STATUS[fmt]
        async with store_for(relay_config) as store:
            requester = await store.get_requester(CUSTOMER)
        assert requester is not None and not requester.verified


async def test_a_delayed_dsn_with_only_the_headers_leaves_the_link_working(
    relay_config: Config, relay: Relay
) -> None:
    """A 'delayed' DSN (4.x.x) returning only the header block is filed, but the mail may
    still arrive: its link keeps working."""
    async with daemon_running(relay_config) as running:
        ticket = await first_contact(running, relay)
        sent = verification(relay, ticket.id)
        bounce = dsn(returned_headers(sent), recipient=CUSTOMER, status="4.4.1", action="delayed")
        await send_null_sender(running, bounce)
        await running.settle()
        await bounce_note(running, ticket.id)
        status, page = await get(running, link_path(sent))
    assert status == 200, page


def base64_body(received: Received) -> bytes:
    """The mail as a relay might return it re-encoded: its text parts in base64."""
    msg = message_from_bytes(received.raw, policy=email.policy.SMTP)
    assert isinstance(msg, EmailMessage)
    for part in msg.walk():
        if part.get_content_maintype() == "text":
            data = part.get_payload(decode=True)
            assert isinstance(data, bytes)
            del part["Content-Transfer-Encoding"]
            part["Content-Transfer-Encoding"] = "base64"
            part.set_payload(base64.encodebytes(data).decode())
    return msg.as_bytes()


async def test_a_delayed_dsn_that_returns_the_link_revokes_it(
    relay_config: Config, relay: Relay
) -> None:
    """A temporary DSN that returns the whole verification mail (its text in base64, so only
    a decoded look finds the link) stores a copy of the link: that link is revoked."""
    async with daemon_running(relay_config) as running:
        ticket = await first_contact(running, relay)
        sent = verification(relay, ticket.id)
        returned = base64_body(sent)
        assert link_path(sent).encode() not in returned
        bounce = dsn(
            returned,
            recipient=CUSTOMER,
            status="4.4.1",
            action="delayed",
            returned_type="message/rfc822",
        )
        await send_null_sender(running, bounce)
        await running.settle()
        await bounce_note(running, ticket.id)
        status, _page = await get(running, link_path(sent))
        assert undeliverable(running, CUSTOMER) is None
    assert status == 410


async def test_return_path_null_marks_a_mail_automatic(relay_config: Config, relay: Relay) -> None:
    """`Return-Path: <>` (the delivering MTA says the sender was null) gets no automatic mail,
    whatever the envelope of the last hop says."""
    async with daemon_running(relay_config) as running:
        message = mail(sender="Notifier <notifier@example.org>", subject="Something automatic")
        message["Return-Path"] = "<>"
        await running.send(message, sender="notifier@example.org")
        others = await barrier(running, relay)
        tickets = await running.tickets()
    assert others == []
    assert [t.subject for t in tickets if t.requester.email == "notifier@example.org"] == [
        "Something automatic"
    ]


async def test_a_persons_reply_that_reads_like_a_bounce_is_no_bounce(
    relay_config: Config, relay: Relay
) -> None:
    """The MTA heuristics run only on mail from an MTA: a customer's reply to our mail that
    lists addresses between commas (what one of them reads as a failure) is a reply."""
    async with daemon_running(relay_config) as running:
        ticket = await first_contact(running, relay)
        ack = acknowledgement(relay, ticket.id)
        ack_id = str(ack.message["Message-ID"])
        body = f"Please copy my colleagues, {CUSTOMER}, other@example.org, on this.\n"
        await running.send(
            mail(subject="Re: my ticket", body=body, in_reply_to=ack_id, references=ack_id),
            sender=CUSTOMER,
        )
        [after] = [t for t in await running.tickets() if t.id == ticket.id]
        assert [(m.author, m.thread_reason) for m in after.messages] == [
            ("customer", "new"),
            ("customer", "references"),
        ]
        assert undeliverable(running, CUSTOMER) is None
        await mails_to(relay, CUSTOMER, 2)


async def test_an_auto_reply_naming_its_own_address_marks_nothing(
    relay_config: Config, relay: Relay
) -> None:
    """A null-sender auto-reply whose text happens to read as a failure of its own address
    (a heuristic match) cannot mark that address: no mailbox bounces its own mail."""
    async with daemon_running(relay_config) as running:
        ticket = await first_contact(running, relay)
        ack_id = str(acknowledgement(relay, ticket.id).message["Message-ID"])
        oof = mail(
            subject="Automatic reply",
            body=f"I am away. Write to my deputy, or to me, {CUSTOMER}, next week.\n",
            in_reply_to=ack_id,
            references=ack_id,
        )
        oof["Auto-Submitted"] = "auto-replied"
        await send_null_sender(running, oof)
        await barrier(running, relay)
        assert undeliverable(running, CUSTOMER) is None
