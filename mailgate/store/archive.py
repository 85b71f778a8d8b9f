"""The archive: the records the law still requires of closed inquiries, in a file of its own.

A ticket closed for `[retention] active_after_close` (or a closed ticket of a person being
erased) leaves the database for this SQLite file, which only `mailgate archive list|show` and
the purge open. Each record is sealed (AES-256-GCM) under a key of its own, made for it in
the key store (outside the data directory, as every data key) and bound to the record's
ticket id; its requester is kept only as a keyed hash of the address, without the name. At
the end of `[retention] closed_tickets` a record is destroyed: its key first (from then on
every copy of it, in this file, its WAL or any backup, is ciphertext without a key), then its
row, overwritten (`secure_delete`), the WAL truncated.

Destroyed keys are logged here and in the key store, and the two are reconciled when the
archive opens, as the database does: a restored copy of the archive loses the records whose
keys are gone, and a restored key store loses the keys this log names.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from mailgate.errors import StoreError, StoreUnavailable
from mailgate.privacy.keyring import Keyring
from mailgate.privacy.sealing import Undecryptable

T = TypeVar("T")
Reason = Literal["retention", "erasure"]
RECORD = "archive.record"  # the seal's label, with the ticket id: a record opens only as itself

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    ticket_id   INTEGER PRIMARY KEY,     -- the ticket's id in the database (never reused)
    key_id      TEXT NOT NULL UNIQUE,    -- the record's own key, in the key store
    requester   TEXT NOT NULL,           -- keyed hash of the requester's address; no name
    created_at  REAL NOT NULL,
    closed_at   REAL NOT NULL,
    archived_at REAL NOT NULL,
    reason      TEXT NOT NULL CHECK (reason IN ('retention', 'erasure')),
    messages    INTEGER NOT NULL,
    record      BLOB NOT NULL            -- sealed JSON: subject, messages, attachment metadata
);
CREATE INDEX IF NOT EXISTS records_closed ON records (closed_at);
CREATE INDEX IF NOT EXISTS records_requester ON records (requester);
-- Keys of destroyed records (random ids, no personal data), reconciled with the key store's.
CREATE TABLE IF NOT EXISTS destroyed (
    key_id TEXT PRIMARY KEY,
    at     REAL NOT NULL
);
"""
_PRAGMAS = (
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    "PRAGMA busy_timeout = 10000",
    "PRAGMA secure_delete = ON",
)


@dataclass(frozen=True, slots=True)
class ArchivedTicket:
    """One archived record; `content` is None if its key is gone (a restored old copy)."""

    ticket_id: int
    requester: str
    created_at: datetime
    closed_at: datetime
    archived_at: datetime
    reason: Reason
    message_count: int
    content: dict[str, Any] | None


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class ArchiveStore:
    """The archive file and its keys; every call runs in a thread, one at a time.

    The file is made by the first record written: reading or purging an archive that does not
    exist finds nothing and makes nothing.
    """

    def __init__(self, path: Path, keys: Keyring) -> None:
        self.path = path
        self._keys = keys
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    @classmethod
    async def open(cls, path: Path, keys: Keyring) -> ArchiveStore:
        """The archive at `path`, reconciled with the key store if it exists."""
        archive = cls(path, keys)
        await archive._call(lambda _db: None, empty=None)
        return archive

    async def close(self) -> None:
        def close() -> None:
            with self._lock:
                if self._db is not None:
                    self._db.close()
                    self._db = None

        await _mapped(close)

    def _connect(self, *, create: bool) -> sqlite3.Connection | None:
        if self._db is not None or (not create and not self.path.exists()):
            return self._db
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.row_factory = sqlite3.Row
            for pragma in _PRAGMAS:
                db.execute(pragma)
            db.executescript(_SCHEMA)
            self._reconcile(db)
        except BaseException:
            db.close()
            raise
        self._db = db
        return db

    async def _call(self, work: Callable[[sqlite3.Connection], T], *, empty: T) -> T:
        """Run `work` on the archive; `empty` if there is none (`work` would make it)."""

        def locked() -> T:
            with self._lock:
                db = self._connect(create=False)
                return empty if db is None else work(db)

        return await _mapped(locked)

    async def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` on the archive, making the file if it is new."""

        def locked() -> T:
            with self._lock:
                db = self._connect(create=True)
                assert db is not None
                return work(db)

        return await _mapped(locked)

    @staticmethod
    def _transaction(db: sqlite3.Connection, work: Callable[[], T]) -> T:
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work()
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return result

    def _reconcile(self, db: sqlite3.Connection) -> None:
        destroyed = self._keys.destroyed()
        logged = {row[0] for row in db.execute("SELECT key_id FROM destroyed")}
        self._keys.destroy(logged - destroyed)
        gone = [
            row[0]
            for row in db.execute("SELECT key_id FROM records")
            if row[0] in destroyed or row[0] in logged
        ]
        if gone:
            self._delete(db, gone)

    def _delete(self, db: sqlite3.Connection, key_ids: Sequence[str]) -> int:
        """Delete the records of these (destroyed) keys and log them; truncate the WAL."""

        def delete() -> int:
            ids = json.dumps(list(key_ids))
            count = db.execute(
                "DELETE FROM records WHERE key_id IN (SELECT value FROM json_each(?))", (ids,)
            ).rowcount
            db.execute(
                "INSERT OR IGNORE INTO destroyed (key_id, at) SELECT value, ? FROM json_each(?)",
                (time.time(), ids),
            )
            return count

        count = self._transaction(db, delete)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return count

    # -- writing -----------------------------------------------------------------------------

    async def has(self, ticket_id: int) -> bool:
        def has(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT 1 FROM records WHERE ticket_id = ?", (ticket_id,))
            return row.fetchone() is not None

        return await self._call(has, empty=False)

    async def put(
        self,
        ticket_id: int,
        *,
        requester: str,
        created_at: datetime,
        closed_at: datetime,
        reason: Reason,
        content: dict[str, Any],
    ) -> bool:
        """Seal `content` under a new key of its own and store it (durably: fsynced) as the
        record of `ticket_id`; False if it is archived already (a purge cut short, run again)."""
        key = self._keys.new_key()  # durable in the key store before anything is sealed under it
        sealed = key.seal(json.dumps(content).encode(), f"{RECORD}:{ticket_id}")

        def put(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "INSERT OR IGNORE INTO records (ticket_id, key_id, requester, created_at, "
                "closed_at, archived_at, reason, messages, record) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    ticket_id,
                    key.key_id,
                    requester,
                    created_at.timestamp(),
                    closed_at.timestamp(),
                    time.time(),
                    reason,
                    len(content.get("messages", ())),
                    sealed,
                ),
            )
            return cursor.rowcount == 1

        stored = await self._write(lambda db: self._transaction(db, lambda: put(db)))
        if not stored:
            self._keys.destroy([key.key_id])  # made for nothing: no value was ever sealed under it
        return stored

    async def destroy_closed_before(self, before: float, *, dry_run: bool = False) -> int:
        """Destroy the records of tickets closed before `before`: their keys, then their rows;
        return how many (with `dry_run`, how many are due)."""

        def due(db: sqlite3.Connection) -> list[str]:
            rows = db.execute("SELECT key_id FROM records WHERE closed_at < ?", (before,))
            return [row[0] for row in rows]

        none: list[str] = []
        key_ids = await self._call(due, empty=none)
        if dry_run or not key_ids:
            return len(key_ids)
        self._keys.destroy(key_ids)
        return await self._call(lambda db: self._delete(db, key_ids), empty=0)

    async def checkpoint(self) -> None:
        """Truncate the WAL (if the archive is open: it was written or read in this run)."""

        def checkpoint() -> None:
            with self._lock:
                if self._db is not None:
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

        await _mapped(checkpoint)

    # -- reading -----------------------------------------------------------------------------

    async def list(self, *, requester: str | None = None) -> list[ArchivedTicket]:
        rows: list[sqlite3.Row] = await self._call(
            lambda db: db.execute(
                "SELECT * FROM records WHERE ?1 IS NULL OR requester = ?1 ORDER BY ticket_id",
                (requester,),
            ).fetchall(),
            empty=[],
        )
        return [self._opened(row) for row in rows]

    async def get(self, ticket_id: int) -> ArchivedTicket | None:
        rows: list[sqlite3.Row] = await self._call(
            lambda db: db.execute(
                "SELECT * FROM records WHERE ticket_id = ?", (ticket_id,)
            ).fetchall(),
            empty=[],
        )
        return self._opened(rows[0]) if rows else None

    def _opened(self, row: sqlite3.Row) -> ArchivedTicket:
        key = self._keys.key(row["key_id"])
        content: dict[str, Any] | None = None
        if key is not None:
            try:
                content = json.loads(key.open(bytes(row["record"]), f"{RECORD}:{row['ticket_id']}"))
            except Undecryptable:
                content = None
        return ArchivedTicket(
            ticket_id=row["ticket_id"],
            requester=row["requester"],
            created_at=_dt(row["created_at"]),
            closed_at=_dt(row["closed_at"]),
            archived_at=_dt(row["archived_at"]),
            reason=row["reason"],
            message_count=row["messages"],
            content=content,
        )


async def _mapped(work: Callable[[], T]) -> T:
    """Run `work` in a thread, with the store's error mapping."""
    try:
        return await asyncio.to_thread(work)
    except sqlite3.OperationalError as exc:
        raise StoreUnavailable(str(exc)) from exc
    except sqlite3.Error as exc:
        raise StoreError(str(exc)) from exc


@asynccontextmanager
async def open_archive(path: Path, keys: Keyring) -> AsyncIterator[ArchiveStore]:
    archive = await ArchiveStore.open(path, keys)
    try:
        yield archive
    finally:
        await archive.close()
