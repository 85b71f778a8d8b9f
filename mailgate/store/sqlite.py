"""SQLite backend (aiosqlite): the embedded default.

One write connection behind an asyncio.Lock carries every write of this process (ARCHITECTURE
rule 3); reads use their own connection, which WAL lets run beside the writer. The database
runs in WAL mode with synchronous=FULL, so a returned commit has been fsynced.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, cast

import aiosqlite

from mailgate.errors import StoreError, StoreUnavailable
from mailgate.model import (
    Address,
    Envelope,
    InboundRow,
    InboundState,
    Message,
    ParsedMail,
    StoredAttachment,
    ThreadReason,
    Ticket,
    TicketStatus,
)

_PRAGMAS = (
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    "PRAGMA foreign_keys = ON",
    "PRAGMA busy_timeout = 10000",
    "PRAGMA secure_delete = ON",  # deleted personal data is overwritten, not left in free pages
)


def _ts(moment: datetime) -> float:
    return moment.timestamp()


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _now() -> float:
    return datetime.now(UTC).timestamp()


async def _connect(path: Path) -> aiosqlite.Connection:
    db = await aiosqlite.connect(path, isolation_level=None)  # we issue BEGIN/COMMIT ourselves
    db.row_factory = aiosqlite.Row
    for pragma in _PRAGMAS:
        await db.execute(pragma)
    return db


def _migrations() -> list[tuple[int, str]]:
    folder = resources.files("mailgate.store") / "migrations" / "sqlite"
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text(encoding="utf-8")))
    return sorted(found)


async def _migrate(db: aiosqlite.Connection) -> None:
    async with db.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    current = int(row[0]) if row else 0
    for version, script in _migrations():
        if version > current:
            # executescript commits on its own; user_version moves in the same script.
            await db.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {version};\nCOMMIT;")


def _inbound_row(row: aiosqlite.Row) -> InboundRow:
    return InboundRow(
        id=row["id"],
        envelope=Envelope(
            mail_from=row["mail_from"],
            rcpt_tos=tuple(json.loads(row["rcpt_tos"])),
            peer=row["peer"],
            helo=row["helo"],
            smtputf8=bool(row["smtputf8"]),
        ),
        raw=bytes(row["raw"]),
        state=row["state"],
        received_at=_dt(row["received_at"]),
        reason=row["reason"],
    )


class _SqliteIngestTx:
    """See `IngestTx`. Lives only inside `SqliteStore.ingesting()`."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def _one(self, sql: str, params: Sequence[Any]) -> aiosqlite.Row | None:
        async with self._db.execute(sql, params) as cursor:
            return await cursor.fetchone()

    async def inbound_state(self, inbound_id: str) -> InboundState | None:
        row = await self._one("SELECT state FROM inbound WHERE id = ?", (inbound_id,))
        return cast(InboundState, row["state"]) if row else None

    async def duplicate_ticket(self, message_id: str, sender: str) -> int | None:
        row = await self._one(
            "SELECT ticket_id FROM messages WHERE message_id = ? AND from_email = ? LIMIT 1",
            (message_id, sender),
        )
        return int(row["ticket_id"]) if row else None

    async def tickets_by_message_ids(self, message_ids: Sequence[str]) -> list[int]:
        if not message_ids:
            return []
        async with self._db.execute(
            "SELECT ticket_id FROM messages "
            "WHERE message_id IN (SELECT value FROM json_each(?)) "
            "GROUP BY ticket_id ORDER BY max(received_at) DESC",
            (json.dumps(list(message_ids)),),
        ) as cursor:
            return [int(row["ticket_id"]) async for row in cursor]

    async def ticket_status(self, ticket_id: int) -> TicketStatus | None:
        row = await self._one("SELECT status FROM tickets WHERE id = ?", (ticket_id,))
        return cast(TicketStatus, row["status"]) if row else None

    async def may_post(self, ticket_id: int, email: str) -> bool:
        row = await self._one(
            "SELECT 1 FROM tickets t JOIN requesters r ON r.id = t.requester_id "
            "WHERE t.id = ? AND r.email = ? "
            "UNION ALL SELECT 1 FROM participants WHERE ticket_id = ? AND email = ? LIMIT 1",
            (ticket_id, email, ticket_id, email),
        )
        return row is not None

    async def create_ticket(self, subject: str, requester: Address, *, at: datetime) -> int:
        # The newest display name wins: requesters fix typos in their mail client's settings.
        row = await self._one(
            "INSERT INTO requesters (email, name, created_at) VALUES (?, ?, ?) "
            "ON CONFLICT (email) DO UPDATE SET name = coalesce(excluded.name, requesters.name) "
            "RETURNING id",
            (requester.email, requester.name, _ts(at)),
        )
        assert row is not None
        row = await self._one(
            "INSERT INTO tickets (subject, requester_id, created_at, updated_at) "
            "VALUES (?, ?, ?, ?) RETURNING id",
            (subject, row["id"], _ts(at), _ts(at)),
        )
        assert row is not None
        return int(row["id"])

    async def add_message(
        self,
        ticket_id: int,
        mail: ParsedMail,
        *,
        inbound_id: str,
        reason: ThreadReason,
        attachments: Sequence[StoredAttachment],
        at: datetime,
    ) -> int:
        row = await self._one(
            "INSERT INTO messages (ticket_id, inbound_id, message_id, from_email, from_name, "
            "subject, body_text, body_html, thread_reason, received_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (
                ticket_id,
                inbound_id,
                mail.message_id,
                mail.sender.email,
                mail.sender.name,
                mail.subject,
                mail.body_text,
                mail.body_html,
                reason,
                _ts(at),
            ),
        )
        assert row is not None
        message_row = int(row["id"])
        await self._db.executemany(
            "INSERT INTO attachments (message_id, position, sha256, filename, content_type, "
            "size, inline) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (message_row, n, a.sha256, a.filename, a.content_type, a.size, a.inline)
                for n, a in enumerate(attachments)
            ],
        )
        await self._db.execute(
            "UPDATE tickets SET updated_at = ? WHERE id = ?", (_ts(at), ticket_id)
        )
        return message_row

    async def add_participants(self, ticket_id: int, emails: Sequence[str]) -> None:
        await self._db.executemany(
            "INSERT OR IGNORE INTO participants (ticket_id, email) VALUES (?, ?)",
            [(ticket_id, email) for email in emails],
        )

    async def set_status(self, ticket_id: int, status: TicketStatus, *, at: datetime) -> None:
        await self._db.execute(
            "UPDATE tickets SET status = ?, updated_at = ? WHERE id = ?",
            (status, _ts(at), ticket_id),
        )

    async def finish_inbound(
        self, inbound_id: str, state: InboundState, *, reason: str | None, at: datetime
    ) -> None:
        await self._db.execute(
            "UPDATE inbound SET state = ?, reason = ?, processed_at = ? WHERE id = ?",
            (state, reason, _ts(at), inbound_id),
        )


class SqliteStore:
    """See `Store`."""

    def __init__(self, writer: aiosqlite.Connection, reader: aiosqlite.Connection) -> None:
        self._writer = writer
        self._reader = reader
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> SqliteStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            writer = await _connect(path)
            await _migrate(writer)
            reader = await _connect(path)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"{path}: {exc}") from exc
        return cls(writer, reader)

    async def close(self) -> None:
        async with self._write_lock:
            await self._reader.close()
            await self._writer.close()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """Run a write transaction on the one writer; driver errors become StoreUnavailable."""
        async with self._write_lock:
            db = self._writer
            try:
                await db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreUnavailable(str(exc)) from exc
            try:
                yield db
                await db.execute("COMMIT")
            except BaseException as exc:
                if db.in_transaction:
                    try:
                        await db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # SQLite already rolled back (disk full, I/O error)
                if isinstance(exc, sqlite3.OperationalError):  # locked, disk full, I/O error
                    raise StoreUnavailable(str(exc)) from exc
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(str(exc)) from exc
                raise

    async def receive(self, batch: Sequence[tuple[str, Envelope, bytes]]) -> None:
        now = _now()
        async with self._transaction() as db:
            await db.executemany(
                "INSERT INTO inbound (id, received_at, mail_from, rcpt_tos, peer, helo, "
                "smtputf8, raw) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        queue_id,
                        now,
                        env.mail_from,
                        json.dumps(list(env.rcpt_tos)),
                        env.peer,
                        env.helo,
                        int(env.smtputf8),
                        raw,
                    )
                    for queue_id, env, raw in batch
                ],
            )

    async def pending_inbound(self, *, limit: int) -> list[InboundRow]:
        async with self._reader.execute(
            "SELECT * FROM inbound WHERE state = 'received' ORDER BY received_at, id LIMIT ?",
            (limit,),
        ) as cursor:
            return [_inbound_row(row) async for row in cursor]

    async def get_inbound(self, inbound_id: str) -> InboundRow | None:
        async with self._reader.execute(
            "SELECT * FROM inbound WHERE id = ?", (inbound_id,)
        ) as cursor:
            row = await cursor.fetchone()
        return _inbound_row(row) if row else None

    async def list_inbound(self, state: InboundState) -> list[InboundRow]:
        async with self._reader.execute(
            "SELECT * FROM inbound WHERE state = ? ORDER BY received_at, id", (state,)
        ) as cursor:
            return [_inbound_row(row) async for row in cursor]

    async def requeue_inbound(self, inbound_id: str) -> bool:
        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE inbound SET state = 'received', reason = NULL, processed_at = NULL "
                "WHERE id = ? AND state = 'quarantined'",
                (inbound_id,),
            )
            return cursor.rowcount == 1

    @asynccontextmanager
    async def ingesting(self) -> AsyncIterator[_SqliteIngestTx]:
        async with self._transaction() as db:
            yield _SqliteIngestTx(db)

    async def list_tickets(self, *, status: TicketStatus | None = None) -> list[Ticket]:
        async with self._reader.execute(
            "SELECT t.*, r.email, r.name, "
            "(SELECT count(*) FROM messages m WHERE m.ticket_id = t.id) AS message_count "
            "FROM tickets t JOIN requesters r ON r.id = t.requester_id "
            "WHERE ?1 IS NULL OR t.status = ?1 ORDER BY t.id",
            (status,),
        ) as cursor:
            return [_ticket(row) async for row in cursor]

    async def get_ticket(self, ticket_id: int) -> Ticket | None:
        db = self._reader
        async with db.execute(
            "SELECT t.*, r.email, r.name, "
            "(SELECT count(*) FROM messages m WHERE m.ticket_id = t.id) AS message_count "
            "FROM tickets t JOIN requesters r ON r.id = t.requester_id WHERE t.id = ?",
            (ticket_id,),
        ) as cursor:
            row = await cursor.fetchone()
        if row is None:
            return None
        attachments: dict[int, list[StoredAttachment]] = {}
        async with db.execute(
            "SELECT a.* FROM attachments a JOIN messages m ON m.id = a.message_id "
            "WHERE m.ticket_id = ? ORDER BY a.message_id, a.position",
            (ticket_id,),
        ) as cursor:
            async for a in cursor:
                attachments.setdefault(a["message_id"], []).append(
                    StoredAttachment(
                        a["filename"], a["content_type"], a["size"], a["sha256"], bool(a["inline"])
                    )
                )
        async with db.execute(
            "SELECT * FROM messages WHERE ticket_id = ? ORDER BY received_at, id", (ticket_id,)
        ) as cursor:
            messages = tuple(
                [_message(m, tuple(attachments.get(m["id"], ()))) async for m in cursor]
            )
        return _ticket(row, messages)

    async def set_ticket_status(self, ticket_id: int, status: TicketStatus) -> bool:
        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE tickets SET status = ?, updated_at = ? WHERE id = ?",
                (status, _now(), ticket_id),
            )
            return cursor.rowcount == 1


def _ticket(row: aiosqlite.Row, messages: tuple[Message, ...] = ()) -> Ticket:
    return Ticket(
        id=row["id"],
        subject=row["subject"],
        status=row["status"],
        requester=Address(row["email"], row["name"]),
        created_at=_dt(row["created_at"]),
        updated_at=_dt(row["updated_at"]),
        message_count=row["message_count"],
        messages=messages,
    )


def _message(row: aiosqlite.Row, attachments: tuple[StoredAttachment, ...]) -> Message:
    return Message(
        id=row["id"],
        ticket_id=row["ticket_id"],
        sender=Address(row["from_email"], row["from_name"]),
        subject=row["subject"],
        body_text=row["body_text"],
        body_html=row["body_html"],
        message_id=row["message_id"],
        received_at=_dt(row["received_at"]),
        thread_reason=row["thread_reason"],
        attachments=attachments,
    )


@asynccontextmanager
async def open_store(path: Path) -> AsyncIterator[SqliteStore]:
    """Open the store at `path`, migrating it, and close it on exit."""
    store = await SqliteStore.open(path)
    try:
        yield store
    finally:
        await store.close()
