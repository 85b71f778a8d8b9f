"""The SQLite backend's own: its migrations, and memory bounded when listing large rows.

What every backend must do is the contract suite's (tests/test_store_contract.py).
"""

from __future__ import annotations

import sqlite3
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mailgate.store
from mailgate.model import Address, Envelope
from mailgate.store import IngestTx
from tests.conftest import open_test_store

ENVELOPE = Envelope("a@example.org", ("support@example.com",), "127.0.0.1:1", "client")


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


async def test_peeking_at_a_token_tells_its_state_and_uses_nothing(tmp_path: Path) -> None:
    """`peek_token` answers what `redeem_token` would find, in the same order (used before
    revoked before expired), and changes nothing: a live token stays live until redeemed."""
    now = datetime.now(UTC)
    later, earlier = now + timedelta(days=1), now - timedelta(seconds=1)

    def work(tx: IngestTx) -> None:
        for email in ("live@example.org", "gone@example.org", "old@example.org"):
            tx.create_ticket("s", Address(email), at=now)
        tx.issue_token("live@example.org", "live", at=now, expires_at=later)
        tx.issue_token("gone@example.org", "revoked", at=now, expires_at=later)
        tx.issue_token("old@example.org", "expired", at=now, expires_at=earlier)
        tx.revoke_tokens(hashes=["revoked"], at=now)

    async with open_test_store(tmp_path / "db.sqlite") as store:
        await store.ingest(work)
        states = {h: await store.peek_token(h) for h in ("live", "revoked", "expired", "none")}
        assert states == {
            "live": "live",
            "revoked": "revoked",
            "expired": "expired",
            "none": "unknown",
        }
        assert await store.peek_token("live") == "live"  # looking twice used nothing
        requester = await store.get_requester("live@example.org")
        assert requester is not None and not requester.verified
        assert await store.redeem_token("live") == ("verified", "live@example.org")
        assert await store.peek_token("live") == "used"
