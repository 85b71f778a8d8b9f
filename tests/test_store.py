"""The SQLite store on its own: what intake commits, ingest reads back, bounded in memory."""

from __future__ import annotations

import hashlib
import sqlite3
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mailgate.store
from mailgate.model import Address, Envelope, ParsedMail
from mailgate.store import IngestTx
from tests.conftest import open_test_store

ENVELOPE = Envelope("a@example.org", ("support@example.com",), "127.0.0.1:1", "client")


async def test_backlog_is_read_in_batches_bounded_by_bytes(tmp_path: Path) -> None:
    async with open_test_store(tmp_path / "db.sqlite") as store:
        await store.receive([(f"Q{n}", ENVELOPE, bytes(1000)) for n in range(10)])
        assert [r.id for r in await store.pending_inbound(limit=4)] == ["Q0", "Q1", "Q2", "Q3"]
        assert len(await store.pending_inbound(limit=10, max_bytes=2500)) == 3
        # One message larger than the bound still comes, alone: it must be ingested too.
        assert [r.id for r in await store.pending_inbound(limit=10, max_bytes=10)] == ["Q0"]


async def test_received_rows_survive_reopening(tmp_path: Path) -> None:
    raw = b"From: a@example.org\r\n\r\nbody\r\n"
    async with open_test_store(tmp_path / "db.sqlite") as store:
        await store.receive([("Q1", ENVELOPE, raw)])
    async with open_test_store(tmp_path / "db.sqlite") as store:
        [row] = await store.pending_inbound(limit=10)
        stored = await store.read_raw("Q1")
    assert (row.id, row.size, row.envelope, row.state) == ("Q1", len(raw), ENVELOPE, "received")
    assert stored == raw


async def test_deferred_and_excluded_rows_are_not_pending(tmp_path: Path) -> None:
    """A row whose sender checks wait on DNS is skipped until its retry time, and stays
    'received'; rows already under way (`exclude`) are not handed out twice."""
    async with open_test_store(tmp_path / "db.sqlite") as store:
        await store.receive([(f"Q{n}", ENVELOPE, b"x") for n in range(3)])
        later = datetime.now(UTC) + timedelta(hours=1)
        await store.ingest(lambda tx: tx.defer_inbound("Q0", retry_at=later))
        assert [r.id for r in await store.pending_inbound(limit=10)] == ["Q1", "Q2"]
        assert [r.id for r in await store.pending_inbound(limit=10, exclude=["Q1"])] == ["Q2"]
        [deferred] = [r for r in await store.list_inbound("received") if r.id == "Q0"]
        assert deferred.attempts == 1
        now = datetime.now(UTC) - timedelta(seconds=1)
        await store.ingest(lambda tx: tx.defer_inbound("Q0", retry_at=now))
        assert [r.id for r in await store.pending_inbound(limit=1)] == ["Q0"]
        assert (await store.pending_inbound(limit=1))[0].attempts == 2


def _mail(sender: str, message_id: str, body: str) -> ParsedMail:
    return ParsedMail(
        sender=Address(sender),
        to=(),
        cc=(),
        subject="s",
        message_id=message_id,
        in_reply_to=(),
        references=(),
        body_text=body,
        body_html=None,
        body_digest=hashlib.sha256(body.encode()).hexdigest(),
    )


async def test_every_lookup_compares_addresses_by_key(tmp_path: Path) -> None:
    """Requester, participant, dedupe, references and undeliverable marks: one mailbox
    whatever its spelling (full Unicode case folding; the domain as an A-label), stored in
    the spelling it came with."""
    now = datetime.now(UTC)

    def work(tx: IngestTx) -> tuple[object, ...]:
        ticket = tx.create_ticket("s", Address("STRASSE@Bücher.example"), at=now)
        tx.add_participants(ticket, ["Ünal@example.org", "ünal@example.org"])
        first = _mail("STRASSE@bücher.example", "m1@client.example", "one")
        tx.add_message(ticket, first, inbound_id=None, reason="new", attachments=(), at=now)
        tx.set_undeliverable("ÜNAL@example.org", "5.1.1", at=now)
        requester = tx.requester("straße@xn--bcher-kva.example")
        return (
            requester.email if requester else None,
            tx.may_post(ticket, "strasse@BÜCHER.example"),
            tx.may_post(ticket, "üNAL@example.org"),
            tx.may_post(ticket, "someone@example.org"),
            tx.participants(ticket),
            tx.duplicate_ticket(
                "m1@client.example", "straße@bücher.example", first.body_digest or ""
            ),
            tx.duplicate_ticket("m1@client.example", "straße@bücher.example", "another body"),
            tx.has_message_id("m1@client.example", "Strasse@bücher.example"),
            tx.tickets_by_message_ids(["m1@client.example"], "STRASSE@BÜCHER.EXAMPLE"),
            tx.undeliverable("ünal@EXAMPLE.org"),
        )

    async with open_test_store(tmp_path / "db.sqlite") as store:
        found = await store.ingest(work)
        assert await store.verify_requester("strasse@bücher.example")
        requester = await store.get_requester("STRAßE@BÜCHER.EXAMPLE")
    assert found == (
        "STRASSE@Bücher.example",
        True,
        True,
        False,
        ["Ünal@example.org"],
        1,
        None,
        True,
        [1],
        True,
    )
    assert requester is not None and requester.verified


def _version_5(path: Path) -> sqlite3.Connection:
    """A database as the migrations before 007 left it."""
    folder = Path(mailgate.store.__file__).parent / "migrations" / "sqlite"
    db = sqlite3.connect(path, isolation_level=None)
    for script in sorted(folder.glob("00[1-5]_*.sql")):
        db.executescript(script.read_text(encoding="utf-8"))
    db.execute("PRAGMA user_version = 5")
    return db


async def test_migration_007_keys_the_stored_addresses_and_merges_spellings(
    tmp_path: Path,
) -> None:
    """Spellings NOCASE kept apart (non-ASCII case, ß) become one requester, participant or
    mark: the oldest requester row stays, the others' tickets and links move to it, and it is
    verified if any of them was. Adopted into the sealed store (migration 009), the spellings
    that `address_key` makes one are one person (one blind index)."""
    path = tmp_path / "db.sqlite"
    db = _version_5(path)
    db.executescript(
        "INSERT INTO requesters (id, email, name, created_at, verified_at) VALUES"
        " (1, 'Ünal@example.org', 'Ünal', 1, NULL), (2, 'ünal@example.org', NULL, 2, 5),"
        " (3, 'ann@example.org', NULL, 3, NULL);"
        "INSERT INTO tickets (id, subject, requester_id, created_at, updated_at) VALUES"
        " (1, 'a', 1, 1, 1), (2, 'b', 2, 2, 2), (3, 'c', 3, 3, 3);"
        "INSERT INTO verification_tokens (requester_id, token_hash, created_at, expires_at)"
        " VALUES (2, 'h', 2, 9e9);"
        "INSERT INTO participants (ticket_id, email) VALUES"
        " (3, 'STRASSE@example.net'), (3, 'straße@example.net');"
        "INSERT INTO undeliverable (email, status, since) VALUES"
        " ('STRASSE@example.net', '5.1.1', 1), ('straße@example.net', '5.2.2', 2);"
        "INSERT INTO messages (ticket_id, message_id, from_email, subject, body_text,"
        " thread_reason, received_at) VALUES (2, 'm@x', 'ünal@example.org', 'b', 'x', 'new', 2);"
    )
    db.close()
    async with open_test_store(path) as store:
        requesters = await store.list_requesters()
        tickets = await store.list_tickets()

        def read(tx: IngestTx) -> tuple[object, ...]:
            return (
                tx.participants(3),
                tx.undeliverable("strasse@EXAMPLE.net"),
                tx.has_message_id("m@x", "ÜNAL@example.org"),
                tx.has_live_token("ünal@example.org", at=datetime.now(UTC)),
            )

        found = await store.ingest(read)
    with sqlite3.connect(path) as db:
        people = db.execute("SELECT count(*) FROM people").fetchone()[0]
    # Ünal in two spellings (and as a sender), ann, STRASSE/straße (participant, marks): three.
    assert people == 3
    assert [(r.email, r.name, r.verified) for r in requesters] == [
        ("Ünal@example.org", "Ünal", True),
        ("ann@example.org", None, False),
    ]
    assert [t.requester.email for t in tickets] == ["Ünal@example.org"] * 2 + ["ann@example.org"]
    assert found == (["STRASSE@example.net"], True, True, True)


async def test_listing_rows_reads_no_raw_message(tmp_path: Path) -> None:
    # Quarantine lists (and ingest's picks) select sizes, not bytes: listing three 4 MiB
    # messages costs what listing three small ones does; a head is read without the rest.
    raws = [bytes([n]) * (4 * 1024 * 1024) for n in range(3)]
    async with open_test_store(tmp_path / "db.sqlite") as store:
        await store.receive([(f"Q{n}", ENVELOPE, raw) for n, raw in enumerate(raws)])
        with sqlite3.connect(tmp_path / "db.sqlite") as db:
            db.execute("UPDATE inbound SET state = 'quarantined', reason = 'test'")
        tracemalloc.start()
        try:
            rows = await store.list_inbound("quarantined")
            picked = await store.pending_inbound(limit=10)
            head = await store.read_raw("Q1", limit=65536)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert [(r.id, r.size) for r in rows] == [(f"Q{n}", len(raw)) for n, raw in enumerate(raws)]
    assert picked == []
    assert head == raws[1][:65536]
    assert peak < 1024 * 1024
