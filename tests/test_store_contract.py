"""The Store contract (`mailgate/store/base.py`): what every backend must do, seen from its user.

Each test runs on every backend in `tests/conftest.py`'s `STORE_BACKENDS`, opened only
through the `open_backend` fixture, and speaks only the `Store` and `IngestTx` protocols: no
SQL, no file of the backend. Addresses are compared by `addresses.address_key` everywhere
(full Unicode case folding, the domain as an A-label) and come back as first spelled.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailgate.model import (
    Address,
    Author,
    Envelope,
    ForwardedClient,
    OutboxItem,
    ParsedMail,
    PrivacyAction,
    StoredAttachment,
)
from mailgate.spool import Spool, Spooled
from mailgate.store import IngestTx, Store
from mailgate.store.blobs import save_blob
from tests.conftest import StoreOpener

ENVELOPE = Envelope("a@example.org", ("support@example.com",), "127.0.0.1:1", "client")
NOW = datetime.now(UTC).replace(microsecond=0)
HOUR = timedelta(hours=1)


def mail(
    sender: str = "ann@example.org",
    message_id: str | None = "m1@client.example",
    body: str = "Hello",
    *,
    name: str | None = None,
) -> ParsedMail:
    return ParsedMail(
        sender=Address(sender, name),
        to=(),
        cc=(),
        subject="Printer",
        message_id=message_id,
        in_reply_to=(),
        references=(),
        body_text=body,
        body_html=None,
        body_digest=hashlib.sha256(body.encode()).hexdigest(),
    )


def item(to: str = "ann@example.org", *, automatic: bool = True, ticket_id: int = 1) -> OutboxItem:
    return OutboxItem(
        kind="verification" if automatic else "agent_reply",
        ticket_id=ticket_id,
        to=Address(to, "Ann"),
        message_id=f"out-{to}-{automatic}@mailgate.test",
        automatic=automatic,
        context={"token": "secret-token", "email": to},
        cc=("cc@example.org",),
        in_reply_to="m1@client.example",
        references=("m0@client.example", "m1@client.example"),
    )


def enqueue(to: str, at: datetime) -> Callable[[IngestTx], int]:
    return lambda tx: tx.enqueue(item(to), at=at)


async def spooled(folder: Path, data: bytes) -> Spooled:
    """`data` as intake hands a large message over: in an unnamed spool file."""
    spool = Spool(folder, threshold=1024)
    for start in range(0, len(data), 4096):
        await spool.write(data[start : start + 4096])
    raw = await spool.finish()
    assert isinstance(raw, Spooled)
    return raw


async def ticket_with_message(store: Store, sender: str = "ann@example.org") -> int:
    def work(tx: IngestTx) -> int:
        ticket = tx.create_ticket("Printer", Address(sender, "Ann"), at=NOW)
        tx.add_message(ticket, mail(sender), inbound_id=None, reason="new", attachments=(), at=NOW)
        return ticket

    return await store.ingest(work)


# Receiving raw messages.


async def test_received_messages_survive_reopening_byte_for_byte(
    open_backend: StoreOpener, tmp_path: Path
) -> None:
    small = b"From: a@example.org\r\n\r\nbody\r\n"
    large = bytes(range(256)) * 4000  # past the spool threshold given above
    forwarded = Envelope(
        "b@example.org",
        ("support@example.com", "help@help.example.com"),
        "[::1]:25",
        None,
        smtputf8=True,
        forwarded=ForwardedClient(addr="192.0.2.7", helo="mx.example.org", proto="ESMTP"),
    )
    async with open_backend() as store:
        big = await spooled(tmp_path, large)
        try:
            await store.receive([("Q1", ENVELOPE, small), ("Q2", forwarded, big)])
        finally:
            big.release()
    async with open_backend() as store:
        rows = await store.pending_inbound(limit=10)
        assert [(r.id, r.size, r.envelope, r.state) for r in rows] == [
            ("Q1", len(small), ENVELOPE, "received"),
            ("Q2", len(large), forwarded, "received"),
        ]
        assert await store.read_raw("Q1") == small
        assert await store.read_raw("Q2") == large
        assert await store.get_inbound("Q2") == rows[1]


async def test_read_raw_with_a_limit_and_copy_raw(open_backend: StoreOpener) -> None:
    raw = b"".join(b"%06d\r\n" % n for n in range(50_000))
    async with open_backend() as store:
        await store.receive([("Q1", ENVELOPE, raw)])
        assert await store.read_raw("Q1", limit=100) == raw[:100]
        assert await store.read_raw("Q1", limit=len(raw) * 2) == raw
        pieces: list[bytes] = []
        assert await store.copy_raw("Q1", pieces.append)
        assert b"".join(pieces) == raw
        assert await store.read_raw("nope") is None
        assert await store.read_raw("nope", limit=10) is None
        assert not await store.copy_raw("nope", pieces.append)


# Picking rows for ingest.


async def test_pending_rows_oldest_first_within_limits(open_backend: StoreOpener) -> None:
    async with open_backend() as store:
        await store.receive([("Q9", ENVELOPE, bytes(1000))])  # an earlier commit
        await store.receive([(f"Q{n}", ENVELOPE, bytes(1000)) for n in range(1, 6)])
        assert [r.id for r in await store.pending_inbound(limit=3)] == ["Q9", "Q1", "Q2"]
        # Past the first row, no more than max_bytes of raw message in all.
        picked = await store.pending_inbound(limit=10, max_bytes=2500)
        assert [r.id for r in picked] == ["Q9", "Q1", "Q2"]
        # One message larger than the bound still comes, alone: it must be ingested too.
        assert [r.id for r in await store.pending_inbound(limit=10, max_bytes=10)] == ["Q9"]
        picked = await store.pending_inbound(limit=3, exclude=["Q9", "Q2"])
        assert [r.id for r in picked] == ["Q1", "Q3", "Q4"]


async def test_a_deferred_row_waits_until_its_retry_time(open_backend: StoreOpener) -> None:
    async with open_backend() as store:
        await store.receive([(f"Q{n}", ENVELOPE, b"x") for n in range(3)])
        later = datetime.now(UTC) + HOUR
        await store.ingest(lambda tx: tx.defer_inbound("Q0", retry_at=later))
        await store.ingest(lambda tx: tx.defer_inbound("Q1", retry_at=later, count=False))
        assert [r.id for r in await store.pending_inbound(limit=10)] == ["Q2"]
        waiting = {r.id: r for r in await store.list_inbound("received")}
        assert (waiting["Q0"].state, waiting["Q0"].attempts) == ("received", 1)
        assert waiting["Q1"].attempts == 0  # it waited for something else: no attempt counted
        past = datetime.now(UTC) - timedelta(seconds=1)
        await store.ingest(lambda tx: tx.defer_inbound("Q0", retry_at=past))
        [row, _] = await store.pending_inbound(limit=10)
        assert (row.id, row.attempts) == ("Q0", 2)


async def test_finished_rows_leave_the_queue_with_their_state(open_backend: StoreOpener) -> None:
    async with open_backend() as store:
        await store.receive([("Q1", ENVELOPE, b"x"), ("Q2", ENVELOPE, b"y")])

        def work(tx: IngestTx) -> object:
            tx.finish_inbound("Q1", "ingested", reason="duplicate", at=NOW)
            tx.finish_inbound("Q2", "quarantined", reason="parser crashed", at=NOW)
            return tx.inbound_state("Q1"), tx.inbound_state("Q2"), tx.inbound_state("Q3")

        assert await store.ingest(work) == ("ingested", "quarantined", None)
        assert await store.pending_inbound(limit=10) == []
        assert [r.id for r in await store.list_inbound("ingested")] == ["Q1"]
        [quarantined] = await store.list_inbound("quarantined")
        assert (quarantined.id, quarantined.reason) == ("Q2", "parser crashed")
        row = await store.get_inbound("Q1")
        assert row is not None and (row.state, row.reason) == ("ingested", "duplicate")
        assert await store.get_inbound("Q3") is None


async def test_queues_count_rows_by_state_and_name_the_oldest_pending(
    open_backend: StoreOpener,
) -> None:
    async with open_backend() as store:
        empty = await store.queues()
        assert (empty.inbound.by_state, empty.inbound.oldest_pending) == ({}, None)
        assert (empty.outbox.by_state, empty.outbox.oldest_pending) == ({}, None)
        before = datetime.now(UTC) - timedelta(seconds=1)
        await store.receive([(f"Q{n}", ENVELOPE, b"x") for n in range(3)])
        await store.ingest(lambda tx: tx.finish_inbound("Q0", "quarantined", reason="r", at=NOW))
        ticket = await ticket_with_message(store)
        await store.ingest(lambda tx: tx.enqueue(item(ticket_id=ticket), at=NOW - HOUR))
        queues = await store.queues()
        assert queues.inbound.by_state == {"received": 2, "quarantined": 1}
        oldest = queues.inbound.oldest_pending
        assert oldest is not None and before <= oldest <= datetime.now(UTC)
        assert queues.outbox.by_state == {"queued": 1}
        assert queues.outbox.oldest_pending == NOW - HOUR
        await store.ingest(lambda tx: tx.finish_inbound("Q1", "ingested", reason=None, at=NOW))
        await store.ingest(lambda tx: tx.finish_inbound("Q2", "ingested", reason=None, at=NOW))
        drained = await store.queues()
        assert drained.inbound.by_state == {"ingested": 2, "quarantined": 1}
        assert drained.inbound.oldest_pending is None


async def test_recent_problems_are_the_last_quarantined_and_failed_rows_newest_first(
    open_backend: StoreOpener,
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    async with open_backend() as store:
        assert await store.recent_quarantined(5) == []
        assert await store.recent_delivery_errors(5) == []
        await store.receive([(f"Q{n}", ENVELOPE, b"x") for n in range(4)])

        def quarantine(tx: IngestTx) -> None:
            for n, reason in enumerate(("first", "second", "third")):
                tx.finish_inbound(f"Q{n}", "quarantined", reason=reason, at=now + n * HOUR)

        await store.ingest(quarantine)
        assert [r.reason for r in await store.recent_quarantined(2)] == ["third", "second"]
        await ticket_with_message(store)
        failed, retrying, sent, fresh = [
            await store.ingest(enqueue(f"p{n}@example.org", now - HOUR)) for n in range(4)
        ]
        await store.claim_outbox(limit=10)

        def attempts(tx: IngestTx) -> None:
            tx.finish_outbox(failed, "failed", error="550 gone", retry_at=None, reply="550")
            tx.finish_outbox(retrying, "queued", error="451 later", retry_at=now, reply="451")
            tx.finish_outbox(sent, "sent", error=None, retry_at=None, reply="250")
            tx.finish_outbox(fresh, "queued", error=None, retry_at=now, reply=None)

        await store.ingest(attempts)
        errors = await store.recent_delivery_errors(5)
        assert [(r.id, r.state, r.last_error) for r in errors] == [
            (retrying, "queued", "451 later"),
            (failed, "failed", "550 gone"),
        ]
        assert [r.id for r in await store.recent_delivery_errors(1)] == [retrying]


async def test_queues_name_when_the_longest_waiting_due_row_became_due(
    open_backend: StoreOpener,
) -> None:
    # A row deferred to a later retry is not behind: /healthz judges ingest by `oldest_due`.
    async with open_backend() as store:
        await store.receive([("Q0", ENVELOPE, b"x")])
        [row] = await store.list_inbound("received")
        assert (await store.queues()).inbound.oldest_due == row.received_at
        await store.ingest(lambda tx: tx.defer_inbound("Q0", retry_at=NOW + HOUR))
        deferred = (await store.queues()).inbound
        assert (deferred.oldest_pending, deferred.oldest_due) == (row.received_at, None)
        await store.ingest(lambda tx: tx.defer_inbound("Q0", retry_at=NOW - HOUR))
        assert (await store.queues()).inbound.oldest_due == NOW - HOUR  # due since its retry
        ticket = await ticket_with_message(store)
        await store.ingest(lambda tx: tx.enqueue(item(ticket_id=ticket), at=NOW - HOUR))
        outbox = (await store.queues()).outbox
        assert outbox.oldest_due is not None and outbox.oldest_due <= datetime.now(UTC)
        [claimed] = await store.claim_outbox(limit=1)
        await store.finish_outbox(claimed.id, "queued", error="4xx", retry_at=NOW + HOUR)
        outbox = (await store.queues()).outbox
        assert (outbox.oldest_pending, outbox.oldest_due) == (NOW - HOUR, None)


async def test_requeue_and_purge_take_only_quarantined_rows(open_backend: StoreOpener) -> None:
    async with open_backend() as store:
        await store.receive([(f"Q{n}", ENVELOPE, b"raw %d" % n) for n in range(3)])

        def work(tx: IngestTx) -> None:
            tx.finish_inbound("Q0", "quarantined", reason="parse timed out", at=NOW)
            tx.finish_inbound("Q1", "quarantined", reason="parse timed out", at=NOW)

        await store.ingest(work)
        assert not await store.requeue_inbound("Q2")  # 'received': not quarantined
        assert not await store.purge_inbound("Q2")
        assert not await store.requeue_inbound("nope")
        assert await store.requeue_inbound("Q0")
        row = await store.get_inbound("Q0")
        assert row is not None and (row.state, row.reason) == ("received", None)
        assert [r.id for r in await store.pending_inbound(limit=10)] == ["Q0", "Q2"]
        assert await store.purge_inbound("Q1")
        assert await store.get_inbound("Q1") is None
        assert await store.read_raw("Q1") is None
        assert not await store.purge_inbound("Q1")
        assert await store.read_raw("Q2") == b"raw 2"


# Units of work.


async def test_a_failed_unit_of_work_writes_nothing(open_backend: StoreOpener) -> None:
    class Boom(Exception):
        pass

    async with open_backend() as store:
        await store.receive([("Q1", ENVELOPE, b"x")])
        ticket = await ticket_with_message(store)

        def work(tx: IngestTx) -> None:
            other = tx.create_ticket("Other", Address("bob@example.org"), at=NOW)
            tx.add_message(
                other,
                mail("bob@example.org"),
                inbound_id="Q1",
                reason="new",
                attachments=(),
                at=NOW,
            )
            tx.add_participants(ticket, ["carl@example.org"])
            tx.set_status(ticket, "closed", at=NOW)
            tx.set_undeliverable("ann@example.org", "5.1.1", at=NOW)
            tx.enqueue(item(), at=NOW)
            tx.finish_inbound("Q1", "ingested", reason=None, at=NOW)
            raise Boom

        with pytest.raises(Boom):
            await store.ingest(work)
        assert [(t.id, t.status) for t in await store.list_tickets()] == [(ticket, "open")]
        assert await store.list_requesters() == [await store.get_requester("ann@example.org")]
        assert await store.list_outbox() == []
        assert [r.id for r in await store.pending_inbound(limit=10)] == ["Q1"]
        requester = await store.get_requester("ann@example.org")
        assert requester is not None and requester.undeliverable is None
        assert await store.ingest(lambda tx: tx.participants(ticket)) == []


async def test_a_unit_of_work_returns_what_its_work_returns(open_backend: StoreOpener) -> None:
    async with open_backend() as store:
        assert await store.ingest(lambda tx: ("a", 1)) == ("a", 1)


# Tickets, messages, requesters.


async def test_tickets_with_their_messages_and_attachments(
    open_backend: StoreOpener, tmp_path: Path
) -> None:
    """Messages come back in order with what was stored; attachment content is written by
    the parser process as a sealed file (`store/blobs.py`) and opened through the store."""
    root = tmp_path / "attachments"
    pdf, png = b"%PDF-1.4 contract", b"\x89PNG contract"
    pdf_name, pdf_key, pdf_sha = save_blob(root, pdf)
    png_name, png_key, png_sha = save_blob(root, png)
    attachment = StoredAttachment(
        "a.pdf", "application/pdf", len(pdf), pdf_sha, blob=pdf_name, key=pdf_key
    )
    inline = StoredAttachment(
        None, "image/png", len(png), png_sha, inline=True, blob=png_name, key=png_key
    )

    def work(tx: IngestTx) -> tuple[int, int]:
        first = tx.create_ticket(
            "Printer", Address("ann@example.org", "Ann"), at=NOW, flags=["unauthenticated"]
        )
        tx.add_message(
            first,
            mail(),
            inbound_id=None,
            reason="new",
            attachments=[attachment, inline],
            at=NOW,
            auth={"trust": "unauthenticated", "source": "not checked"},
            flags=["unauthenticated", "reply_to_differs"],
        )
        note = mail("agent@example.com", None, "Internal")
        tx.add_message(
            first,
            note,
            inbound_id=None,
            reason="agent",
            attachments=(),
            at=NOW + HOUR,
            author="system",
        )
        second = tx.create_ticket("Scanner", Address("bob@example.org"), at=NOW)
        tx.set_status(second, "closed", at=NOW)
        return first, second

    async with open_backend() as store:
        first, second = await store.ingest(work)
        assert [(t.id, t.status) for t in await store.list_tickets()] == [
            (first, "open"),
            (second, "closed"),
        ]
        assert [t.id for t in await store.list_tickets(status="closed")] == [second]
        ticket = await store.get_ticket(first)
        assert ticket is not None
        assert (ticket.subject, ticket.requester, ticket.message_count, ticket.flags) == (
            "Printer",
            Address("ann@example.org", "Ann"),
            2,
            ("unauthenticated",),
        )
        one, two = ticket.messages
        assert (one.sender, one.body_text, one.thread_reason, one.author) == (
            Address("ann@example.org"),
            "Hello",
            "new",
            "customer",
        )
        shown = [(a.filename, a.content_type, a.size, a.inline) for a in one.attachments]
        assert shown == [
            ("a.pdf", "application/pdf", len(pdf), False),
            (None, "image/png", len(png), True),
        ]
        contents = [await store.attachment_content(a.id or 0, root) for a in one.attachments]
        assert contents == [pdf, png]
        assert await store.blob_names() == {pdf_name, png_name}
        assert await store.attachment_content(999, root) is None
        assert one.auth == {"trust": "unauthenticated", "source": "not checked"}
        assert one.flags == ("unauthenticated", "reply_to_differs")
        assert (two.author, two.thread_reason, two.message_id, two.attachments) == (
            "system",
            "agent",
            None,
            (),
        )
        assert ticket.updated_at == NOW + HOUR  # a message moves it
        assert await store.get_ticket(999) is None
        assert await store.set_ticket_status(second, "open")
        assert not await store.set_ticket_status(999, "open")
        assert await store.list_tickets(status="closed") == []

        def read(tx: IngestTx) -> object:
            return (
                tx.ticket_status(first),
                tx.ticket_status(999),
                tx.ticket_head(first),
                tx.thread_ids(first),
            )

        assert await store.ingest(read) == (
            "open",
            None,
            ("Printer", Address("ann@example.org", "Ann")),
            ("m1@client.example", ["m1@client.example"]),
        )
        with pytest.raises(LookupError):
            await store.ingest(lambda tx: tx.ticket_head(999))


async def test_thread_ids_name_the_customers_latest_and_all_oldest_first(
    open_backend: StoreOpener,
) -> None:
    posts: list[tuple[Author, str]] = [
        ("customer", "c1@x"),
        ("agent", "a1@x"),
        ("customer", "c2@x"),
        ("agent", "a2@x"),
    ]

    def work(tx: IngestTx) -> tuple[str | None, list[str]]:
        ticket = tx.create_ticket("Printer", Address("ann@example.org"), at=NOW)
        for n, (author, message_id) in enumerate(posts):
            message = mail(message_id=message_id)
            at = NOW + n * HOUR
            tx.add_message(
                ticket, message, inbound_id=None, reason="new", attachments=(), at=at, author=author
            )
        return tx.thread_ids(ticket)

    async with open_backend() as store:
        assert await store.ingest(work) == ("c2@x", ["c1@x", "a1@x", "c2@x", "a2@x"])


async def test_a_requester_is_renamed_only_when_asked(open_backend: StoreOpener) -> None:
    def work(tx: IngestTx) -> None:
        tx.create_ticket("a", Address("Ann@Example.org", "Ann"), at=NOW)
        tx.create_ticket("b", Address("ann@example.org", "Mallory"), at=NOW)  # not renamed
        tx.create_ticket("c", Address("ANN@example.org", None), at=NOW, rename=True)  # no name

    def rename(tx: IngestTx) -> None:
        tx.create_ticket("d", Address("ann@EXAMPLE.org", "Ann Smith"), at=NOW, rename=True)

    async with open_backend() as store:
        await store.ingest(work)
        requesters = await store.list_requesters()
        assert [(r.email, r.name) for r in requesters] == [("Ann@Example.org", "Ann")]
        await store.ingest(rename)
        tickets = await store.list_tickets()
    assert [t.requester for t in tickets] == [Address("Ann@Example.org", "Ann Smith")] * 4


async def test_requesters_are_verified_once(open_backend: StoreOpener) -> None:
    async with open_backend() as store:
        await ticket_with_message(store)
        requester = await store.get_requester("ann@example.org")
        assert requester is not None and not requester.verified
        assert requester.verified_at is None
        assert await store.verify_requester("ANN@example.org")
        first = await store.get_requester("ann@example.org")
        assert first is not None and first.verified and first.verified_at is not None
        assert await store.verify_requester("ann@example.org")
        again = await store.get_requester("ann@example.org")
        assert again is not None and again.verified_at == first.verified_at
        assert not await store.verify_requester("nobody@example.org")
        assert await store.get_requester("nobody@example.org") is None
        found = await store.ingest(
            lambda tx: (tx.requester("Ann@example.org"), tx.requester("x@y"))
        )
    assert found == (again, None)


async def test_participants_one_spelling_each(open_backend: StoreOpener) -> None:
    async with open_backend() as store:
        ticket = await ticket_with_message(store)
        await store.ingest(
            lambda tx: tx.add_participants(ticket, ["Ünal@example.org", "ünal@EXAMPLE.org"])
        )
        assert await store.add_participant(ticket, "carl@example.org")
        assert await store.add_participant(ticket, "Carl@Example.org")
        assert not await store.add_participant(999, "carl@example.org")
        found = await store.ingest(lambda tx: tx.participants(ticket))
    assert found == ["carl@example.org", "Ünal@example.org"]


# Threading facts: duplicates and the Message-IDs that name tickets.


async def test_a_repeat_delivery_is_found_by_id_sender_and_body(open_backend: StoreOpener) -> None:
    first = mail("ann@example.org", "m1@client.example", "one")

    def work(tx: IngestTx) -> tuple[object, ...]:
        ticket = tx.create_ticket("s", Address("ann@example.org"), at=NOW)
        tx.add_message(ticket, first, inbound_id=None, reason="new", attachments=(), at=NOW)
        digest = first.body_digest or ""
        other = mail(body="two").body_digest or ""
        return (
            tx.duplicate_ticket("m1@client.example", "ANN@example.org", digest),
            tx.duplicate_ticket("m1@client.example", "ann@example.org", other),
            tx.duplicate_ticket("m1@client.example", "bob@example.org", digest),
            tx.duplicate_ticket("m2@client.example", "ann@example.org", digest),
            tx.has_message_id("m1@client.example", "Ann@Example.org"),
            tx.has_message_id("m1@client.example", "bob@example.org"),
            tx.has_message_id("m2@client.example", "ann@example.org"),
        )

    async with open_backend() as store:
        found = await store.ingest(work)
    assert found == (1, None, None, None, True, False, False)


async def test_an_id_carried_by_several_senders_names_nothing_for_others(
    open_backend: StoreOpener,
) -> None:
    """An ID names the tickets where the asking sender carried it, else the ticket of its one
    carrier; a copy planted by a stranger makes it name nothing for anyone else."""

    def post(ticket: int, sender: str, at: datetime) -> Callable[[IngestTx], int]:
        message = mail(sender, "x@client")
        return lambda tx: tx.add_message(
            ticket, message, inbound_id=None, reason="new", attachments=(), at=at
        )

    def names(tx: IngestTx) -> tuple[list[int], ...]:
        return (
            tx.tickets_by_message_ids(["x@client"], "ann@example.org"),
            tx.tickets_by_message_ids(["x@client"], "BOB@example.org"),
            tx.tickets_by_message_ids(["x@client"], "mallory@example.net"),
            tx.tickets_by_message_ids(["nothing@client"], "ann@example.org"),
            tx.tickets_by_message_ids([], "ann@example.org"),
        )

    async with open_backend() as store:
        ann = await store.ingest(
            lambda tx: tx.create_ticket("a", Address("ann@example.org"), at=NOW)
        )
        mal = await store.ingest(
            lambda tx: tx.create_ticket("m", Address("mallory@example.net"), at=NOW)
        )
        await store.ingest(post(ann, "ann@example.org", NOW))
        assert await store.ingest(names) == ([ann], [ann], [ann], [], [])
        await store.ingest(post(mal, "mallory@example.net", NOW + HOUR))
        assert await store.ingest(names) == ([ann], [], [mal], [], [])


async def test_ids_name_the_senders_tickets_newest_message_first(
    open_backend: StoreOpener,
) -> None:
    def work(tx: IngestTx) -> list[int]:
        old = tx.create_ticket("old", Address("ann@example.org"), at=NOW)
        new = tx.create_ticket("new", Address("ann@example.org"), at=NOW)
        tx.add_message(
            new,
            mail(message_id="b@x"),
            inbound_id=None,
            reason="new",
            attachments=(),
            at=NOW + HOUR,
        )
        tx.add_message(
            old, mail(message_id="a@x"), inbound_id=None, reason="new", attachments=(), at=NOW
        )
        return tx.tickets_by_message_ids(["a@x", "b@x", "c@x"], "ANN@example.org")

    async with open_backend() as store:
        assert await store.ingest(work) == [2, 1]


# Addresses.


async def test_every_lookup_compares_addresses_by_key(open_backend: StoreOpener) -> None:
    """One mailbox whatever its spelling: `STRASSE`, `strasse` and `straße` are one (full
    case folding, not ASCII-only), and so are a domain's U-label and A-label."""

    def work(tx: IngestTx) -> tuple[object, ...]:
        ticket = tx.create_ticket("s", Address("STRASSE@Bücher.example"), at=NOW)
        tx.add_message(
            ticket,
            mail("STRASSE@bücher.example", "m1@x", "one"),
            inbound_id=None,
            reason="new",
            attachments=(),
            at=NOW,
        )
        tx.issue_token("straße@bücher.example", "h1", at=NOW, expires_at=NOW + HOUR)
        tx.set_undeliverable("Straße@XN--BCHER-KVA.example", "5.1.1", at=NOW)
        tx.enqueue(item("strasse@bücher.example"), at=NOW)
        return (
            tx.requester("straße@xn--bcher-kva.example"),
            tx.ticket_head(ticket)[1].email,
            tx.has_message_id("m1@x", "strasse@xn--bcher-kva.example"),
            tx.tickets_by_message_ids(["m1@x"], "STRAßE@BÜCHER.EXAMPLE"),
            tx.has_live_token("STRASSE@xn--bcher-kva.example", at=NOW),
            tx.undeliverable("strasse@bücher.example"),
            tx.automatic_mails_since("STRASSE@BÜCHER.example", NOW - HOUR),
            tx.undeliverable("strase@bücher.example"),
        )

    async with open_backend() as store:
        found = await store.ingest(work)
        requester = await store.get_requester("strasse@BÜCHER.example")
    assert requester is not None and requester.email == "STRASSE@Bücher.example"
    assert requester.undeliverable == "5.1.1"
    assert found == (requester, "STRASSE@Bücher.example", True, [1], True, True, 1, False)


# Verification tokens.


async def test_tokens_redeem_once_and_never_when_expired_revoked_or_unknown(
    open_backend: StoreOpener,
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)  # exact in any timestamp column

    def work(tx: IngestTx) -> tuple[bool, bool]:
        tx.create_ticket("s", Address("Ann@example.org"), at=now)
        tx.create_ticket("s", Address("bob@example.org"), at=now)
        before = tx.has_live_token("ann@example.org", at=now)
        tx.issue_token("ann@example.org", "live", at=now, expires_at=now + HOUR)
        tx.issue_token("ann@example.org", "old", at=now - 2 * HOUR, expires_at=now - HOUR)
        tx.issue_token("bob@example.org", "revoked", at=now, expires_at=now + HOUR)
        return before, tx.has_live_token("ANN@example.org", at=now)

    async with open_backend() as store:
        assert await store.ingest(work) == (False, True)
        assert await store.ingest(lambda tx: tx.revoke_tokens(hashes=["revoked"], at=now)) == 1
        assert await store.redeem_token("revoked") == ("revoked", None)
        assert await store.redeem_token("old") == ("expired", None)
        assert await store.redeem_token("nothing") == ("unknown", None)
        bob = await store.get_requester("bob@example.org")
        assert bob is not None and not bob.verified
        assert await store.redeem_token("live") == ("verified", "Ann@example.org")
        ann = await store.get_requester("ann@example.org")
        assert ann is not None and ann.verified
        assert await store.redeem_token("live") == ("used", None)
        live = await store.ingest(
            lambda tx: (
                tx.has_live_token("ann@example.org", at=now),  # used
                tx.has_live_token("bob@example.org", at=now),  # revoked
            )
        )
        assert live == (False, False)


async def test_tokens_are_revoked_by_hash_or_by_their_mail_and_only_unused(
    open_backend: StoreOpener,
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)  # exact in any timestamp column

    def work(tx: IngestTx) -> None:
        tx.create_ticket("s", Address("ann@example.org"), at=now)
        for n in range(4):
            tx.issue_token(
                "ann@example.org",
                f"h{n}",
                at=now,
                expires_at=now + HOUR,
                message_id=f"mail{n}@mailgate.test",
            )

    async with open_backend() as store:
        await store.ingest(work)
        assert await store.redeem_token("h0") == ("verified", "ann@example.org")
        revoked = await store.ingest(
            lambda tx: tx.revoke_tokens(
                hashes=["h0", "h1"], message_ids=["mail2@mailgate.test", "other@x"], at=now
            )
        )
        assert revoked == 2  # h0 was used already: it stays used
        assert await store.ingest(lambda tx: tx.revoke_tokens(hashes=["h1"], at=now)) == 0
        assert await store.redeem_token("h0") == ("used", None)
        assert await store.redeem_token("h1") == ("revoked", None)
        assert await store.redeem_token("h2") == ("revoked", None)
        assert await store.redeem_token("h3") == ("verified", "ann@example.org")
        assert await store.ingest(lambda tx: tx.revoke_tokens(at=now)) == 0


async def test_privacy_request_links_are_tokens_a_bounce_revokes(
    open_backend: StoreOpener,
) -> None:
    """A privacy request's link is revoked as a verification token is: by its hash or by the
    mail that carried it, once; an address with no person opens none."""
    now = datetime.now(UTC).replace(microsecond=0)

    def work(tx: IngestTx) -> None:
        ticket = tx.create_ticket("erase", Address("ann@example.org"), at=now)
        actions: tuple[PrivacyAction, ...] = ("erase", "export")
        for n, action in enumerate(actions):
            tx.open_privacy_request(
                "Ann@Example.org",
                ticket,
                action,
                f"p{n}",
                at=now,
                expires_at=now + HOUR,
                message_id=f"privacy{n}@mailgate.test",
            )
        tx.open_privacy_request(
            "nobody@example.org", ticket, "erase", "p9", at=now, expires_at=now, message_id=None
        )

    async with open_backend() as store:
        await store.ingest(work)
        revoked = await store.ingest(
            lambda tx: tx.revoke_tokens(
                hashes=["p0", "p9"], message_ids=["privacy1@mailgate.test"], at=now
            )
        )
        assert revoked == 2
        assert await store.ingest(lambda tx: tx.revoke_tokens(hashes=["p0"], at=now)) == 0


# Undeliverable marks.


async def test_undeliverable_marks_are_set_replaced_and_cleared(open_backend: StoreOpener) -> None:
    async with open_backend() as store:
        await ticket_with_message(store)
        await store.ingest(lambda tx: tx.set_undeliverable("ann@example.org", "5.1.1", at=NOW))
        await store.ingest(lambda tx: tx.set_undeliverable("ANN@example.org", "5.2.2", at=NOW))
        requester = await store.get_requester("ann@example.org")
        assert requester is not None and requester.undeliverable == "5.2.2"
        assert await store.ingest(lambda tx: tx.undeliverable("ann@example.org"))
        assert not await store.ingest(lambda tx: tx.undeliverable("bob@example.org"))
        await store.ingest(lambda tx: tx.set_undeliverable("Ann@Example.org", None, at=NOW))
        assert not await store.ingest(lambda tx: tx.undeliverable("ann@example.org"))
        cleared = await store.get_requester("ann@example.org")
        assert cleared is not None and cleared.undeliverable is None


# The outbox.


async def test_outbox_rows_are_claimed_once_and_finished(open_backend: StoreOpener) -> None:
    now = datetime.now(UTC).replace(microsecond=0)  # exact in any timestamp column
    async with open_backend() as store:
        ticket = await ticket_with_message(store)
        first = await store.ingest(lambda tx: tx.enqueue(item(ticket_id=ticket), at=now - HOUR))
        second = await store.ingest(
            lambda tx: tx.enqueue(item("bob@example.org", automatic=False), at=now)
        )
        future = await store.ingest(lambda tx: tx.enqueue(item("carl@x.org"), at=now + HOUR))
        assert await store.next_outbox_due() == now - HOUR
        claimed = await store.claim_outbox(limit=10)
        assert [(r.id, r.state, r.attempts) for r in claimed] == [
            (first, "sending", 1),
            (second, "sending", 1),
        ]
        assert claimed[0].item == item(ticket_id=ticket)  # as it was queued
        assert await store.claim_outbox(limit=10) == []  # claimed once
        assert await store.ingest(lambda tx: tx.sent_to(item().message_id)) == [
            "ann@example.org",
            "cc@example.org",
        ]
        assert await store.ingest(lambda tx: tx.sent_to("unknown@x")) == []
        await store.finish_outbox(first, "sent", error=None, retry_at=None, reply="250 ok")
        await store.finish_outbox(second, "queued", error="421 busy", retry_at=now + 2 * HOUR)
        rows = {r.id: r for r in await store.list_outbox()}
        sent = rows[first]
        assert (sent.state, sent.reply, sent.last_error) == ("sent", "250 ok", None)
        assert sent.sent_at is not None
        assert "token" not in sent.item.context  # a sent mail drops its token
        assert sent.item.context["email"] == "ann@example.org"
        retried = rows[second]
        assert (retried.state, retried.last_error, retried.next_attempt_at) == (
            "queued",
            "421 busy",
            now + 2 * HOUR,
        )
        assert retried.item.context == item("bob@example.org").context  # not sent: kept
        assert [r.id for r in await store.list_outbox("queued")] == [second, future]
        assert await store.claim_outbox(limit=10) == []  # neither is due
        assert await store.retry_outbox(second)
        assert [r.id for r in await store.claim_outbox(limit=10)] == [second]
        assert not await store.retry_outbox(first)  # sent
        assert not await store.retry_outbox(999)


def system_mail(to: str, message_id: str) -> OutboxItem:
    return OutboxItem("privacy_erased", None, Address(to), message_id, True, {})


async def test_a_system_mail_makes_no_person_and_waits_while_it_is_held(
    open_backend: StoreOpener,
) -> None:
    """A system mail (no ticket) makes no person of its recipient; one held for an address
    is not due while the person with that address exists; once sent or failed a system mail
    leaves no row."""
    now = datetime.now(UTC).replace(microsecond=0)
    async with open_backend() as store:
        await ticket_with_message(store)  # ann@example.org
        free = await store.ingest(
            lambda tx: tx.enqueue(system_mail("gone@example.org", "sys1@mailgate.test"), at=now)
        )
        await store.ingest(
            lambda tx: tx.enqueue(
                system_mail("ann@example.org", "sys2@mailgate.test"),
                at=now - HOUR,
                held_for="Ann@example.org",
            )
        )
        assert await store.get_requester("gone@example.org") is None
        assert await store.next_outbox_due() == now  # the held one is not due
        [claimed] = await store.claim_outbox(limit=10)
        assert claimed.id == free
        assert claimed.item == system_mail("gone@example.org", "sys1@mailgate.test")
        assert await store.claim_outbox(limit=10) == []
        await store.finish_outbox(free, "sent", error=None, retry_at=None, reply="250 ok")
        [held] = await store.list_outbox()
        assert held.item.message_id == "sys2@mailgate.test" and held.state == "queued"
        assert await store.ingest(lambda tx: tx.sent_to("sys1@mailgate.test")) == []


async def test_claims_respect_the_limit_and_oldest_due_come_first(
    open_backend: StoreOpener,
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)  # exact in any timestamp column
    async with open_backend() as store:
        await ticket_with_message(store)  # the rows' ticket
        ids = [await store.ingest(enqueue(f"r{n}@x.org", now - n * HOUR)) for n in range(3)]
        claimed = await store.claim_outbox(limit=2)
        assert sorted(r.id for r in claimed) == sorted([ids[2], ids[1]])
        assert [r.id for r in await store.claim_outbox(limit=2)] == [ids[0]]


async def test_a_crash_leaves_sending_rows_that_are_queued_again(
    open_backend: StoreOpener,
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)  # exact in any timestamp column
    async with open_backend() as store:
        await ticket_with_message(store)  # the rows' ticket
        queued = await store.ingest(lambda tx: tx.enqueue(item(), at=now + HOUR))
        sending = await store.ingest(lambda tx: tx.enqueue(item("bob@x.org"), at=now - HOUR))
        [claimed] = await store.claim_outbox(limit=10)
        assert claimed.id == sending
    async with open_backend() as store:
        assert await store.requeue_sending() == 1
        assert await store.requeue_sending() == 0
        rows = {r.id: r for r in await store.list_outbox()}
        assert (rows[sending].state, rows[queued].state) == ("queued", "queued")
        [again] = await store.claim_outbox(limit=10)
        assert (again.id, again.attempts) == (sending, 2)


async def test_a_failed_row_can_be_retried(open_backend: StoreOpener) -> None:
    now = datetime.now(UTC).replace(microsecond=0)  # exact in any timestamp column
    async with open_backend() as store:
        await ticket_with_message(store)  # the rows' ticket
        row = await store.ingest(lambda tx: tx.enqueue(item(), at=now - HOUR))
        await store.claim_outbox(limit=10)

        def fail(tx: IngestTx) -> None:
            tx.finish_outbox(row, "failed", error="550 no such user", retry_at=None, reply="550")

        await store.ingest(fail)
        [failed] = await store.list_outbox("failed")
        assert (failed.last_error, failed.reply) == ("550 no such user", "550")
        assert await store.next_outbox_due() is None
        assert await store.retry_outbox(row)
        [again] = await store.claim_outbox(limit=10)
        assert again.id == row


async def test_automatic_mails_are_counted_per_recipient_and_in_all(
    open_backend: StoreOpener,
) -> None:
    def work(tx: IngestTx) -> tuple[int, ...]:
        tx.enqueue(item("ann@example.org"), at=NOW)
        tx.enqueue(item("Ann@Example.org"), at=NOW + HOUR)
        tx.enqueue(item("bob@example.org"), at=NOW)
        tx.enqueue(item("ann@example.org", automatic=False), at=NOW)  # an agent's reply
        return (
            tx.automatic_mails_since("ANN@example.org", NOW - HOUR),
            tx.automatic_mails_since("ann@example.org", NOW),  # strictly after `since`
            tx.automatic_mails_since(None, NOW - HOUR),
            tx.automatic_mails_since(None, NOW + HOUR),
            tx.automatic_mails_since("carl@example.org", NOW - HOUR),
        )

    async with open_backend() as store:
        await ticket_with_message(store)  # the rows' ticket
        assert await store.ingest(work) == (2, 1, 3, 0, 0)
