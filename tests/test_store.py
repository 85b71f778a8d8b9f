"""The SQLite store on its own: what intake commits, ingest reads back, bounded in memory."""

from __future__ import annotations

import sqlite3
import tracemalloc
from pathlib import Path

from mailgate.model import Envelope
from mailgate.store import open_store

ENVELOPE = Envelope("a@example.org", ("support@example.com",), "127.0.0.1:1", "client")


async def test_backlog_is_read_in_batches_bounded_by_bytes(tmp_path: Path) -> None:
    async with open_store(tmp_path / "db.sqlite") as store:
        await store.receive([(f"Q{n}", ENVELOPE, bytes(1000)) for n in range(10)])
        assert [r.id for r in await store.pending_inbound(limit=4)] == ["Q0", "Q1", "Q2", "Q3"]
        assert len(await store.pending_inbound(limit=10, max_bytes=2500)) == 3
        # One message larger than the bound still comes, alone: it must be ingested too.
        assert [r.id for r in await store.pending_inbound(limit=10, max_bytes=10)] == ["Q0"]


async def test_received_rows_survive_reopening(tmp_path: Path) -> None:
    raw = b"From: a@example.org\r\n\r\nbody\r\n"
    async with open_store(tmp_path / "db.sqlite") as store:
        await store.receive([("Q1", ENVELOPE, raw)])
    async with open_store(tmp_path / "db.sqlite") as store:
        [row] = await store.pending_inbound(limit=10)
        stored = await store.read_raw("Q1")
    assert (row.id, row.size, row.envelope, row.state) == ("Q1", len(raw), ENVELOPE, "received")
    assert stored == raw


async def test_listing_rows_reads_no_raw_message(tmp_path: Path) -> None:
    # Quarantine lists (and ingest's picks) select sizes, not bytes: listing three 4 MiB
    # messages costs what listing three small ones does; a head is read without the rest.
    raws = [bytes([n]) * (4 * 1024 * 1024) for n in range(3)]
    async with open_store(tmp_path / "db.sqlite") as store:
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
