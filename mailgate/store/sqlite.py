"""SQLite backend: the embedded default.

Every write of this process runs on one connection owned by one thread (`_Writer`), as a
whole transaction per call: one hand-over between threads per transaction, however many
statements it holds, so a busy event loop cannot stretch a transaction (and the commits
queued behind it) statement by statement. Reads use an aiosqlite connection, which WAL lets
run beside the writer. WAL with synchronous=FULL: a returned commit has been fsynced.
Raw messages are written and read in pieces where they are large (`sqlite_raw.py`); the
queries that list or pick rows never select them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite

from mailgate.addresses import address_key
from mailgate.errors import StoreError, StoreUnavailable
from mailgate.model import (
    Address,
    Author,
    Envelope,
    ForwardedClient,
    InboundRow,
    InboundState,
    Message,
    OutboxItem,
    OutboxRow,
    OutboxState,
    ParsedMail,
    Requester,
    StoredAttachment,
    ThreadReason,
    Ticket,
    TicketStatus,
)
from mailgate.spool import Spooled
from mailgate.store.base import IngestTx, TokenOutcome, TokenState
from mailgate.store.sqlite_raw import RawReader, insert_spooled

T = TypeVar("T")

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


async def _connect_reader(path: Path) -> aiosqlite.Connection:
    db = await aiosqlite.connect(path, isolation_level=None)
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


def _migrate(db: sqlite3.Connection) -> None:
    current = int(db.execute("PRAGMA user_version").fetchone()[0])
    # Foreign keys are off while tables are rebuilt (SQLite's documented procedure), so
    # dropping an old table cascades nowhere; they are checked before going back on.
    db.execute("PRAGMA foreign_keys = OFF")
    try:
        for version, script in _migrations():
            if version > current:
                # executescript commits on its own; user_version moves in the same transaction.
                db.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {version};\nCOMMIT;")
        if db.execute("PRAGMA foreign_key_check").fetchone() is not None:
            raise sqlite3.IntegrityError("foreign key check failed after migration")
    finally:
        db.execute("PRAGMA foreign_keys = ON")


class _Writer:
    """The one write connection, confined to its own thread; each call is one transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        self._db: sqlite3.Connection | None = None

    def _open(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        for pragma in _PRAGMAS:
            db.execute(pragma)
        # Migration 007 keys the stored addresses; the key is Python's (casefold, IDNA).
        db.create_function("address_key", 1, address_key, deterministic=True)
        _migrate(db)
        self._db = db

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        db = self._db
        assert db is not None, "writer not open"
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work(db)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # SQLite already rolled back (disk full, I/O error)
            raise
        return result

    async def _call(self, func: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, func)
        except sqlite3.OperationalError as exc:  # locked, disk full, I/O error: transient
            raise StoreUnavailable(str(exc)) from exc
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc

    async def open(self) -> None:
        await self._call(self._open)

    async def close(self) -> None:
        await self._call(self._close)
        self._thread.shutdown(wait=True)

    async def transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work(db)` between BEGIN IMMEDIATE and COMMIT on the writer thread."""
        return await self._call(lambda: self._transaction(work))

    async def changes_one(self, sql: str, params: Sequence[object]) -> bool:
        """Run one UPDATE as its own transaction; tell whether it changed a row."""
        cursor = await self.transaction(lambda db: db.execute(sql, params))
        return cursor.rowcount == 1

    async def statement(self, sql: str, params: Sequence[object] | Mapping[str, object]) -> None:
        """Run one statement, atomic (and fsynced) on its own, on the writer thread."""
        assert self._db is not None, "writer not open"
        db = self._db
        await self._call(lambda: db.execute(sql, params))


def _forwarded_json(forwarded: ForwardedClient | None) -> str | None:
    return json.dumps(dataclasses.asdict(forwarded)) if forwarded is not None else None


def _forwarded(text: str | None) -> ForwardedClient | None:
    """The stored original client; keys this version does not know are ignored."""
    if text is None:
        return None
    stored = json.loads(text)
    return ForwardedClient(
        **{f.name: stored.get(f.name) for f in dataclasses.fields(ForwardedClient)}
    )


def _inbound_row(row: aiosqlite.Row) -> InboundRow:
    return InboundRow(
        id=row["id"],
        envelope=Envelope(
            mail_from=row["mail_from"],
            rcpt_tos=tuple(json.loads(row["rcpt_tos"])),
            peer=row["peer"],
            helo=row["helo"],
            smtputf8=bool(row["smtputf8"]),
            forwarded=_forwarded(row["forwarded"]),
        ),
        size=row["size"],
        state=row["state"],
        received_at=_dt(row["received_at"]),
        reason=row["reason"],
        attempts=row["attempts"],
    )


class _SqliteIngestTx:
    """See `IngestTx`. Lives only inside one `SqliteStore.ingest()` call, on the writer thread."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def _one(self, sql: str, params: Sequence[Any]) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._db.execute(sql, params).fetchone()
        return row

    def inbound_state(self, inbound_id: str) -> InboundState | None:
        row = self._one("SELECT state FROM inbound WHERE id = ?", (inbound_id,))
        return cast(InboundState, row["state"]) if row else None

    def duplicate_ticket(self, message_id: str, sender: str, body_digest: str) -> int | None:
        row = self._one(
            "SELECT ticket_id FROM messages WHERE message_id = ? AND from_key = ? "
            "AND body_sha256 = ? LIMIT 1",
            (message_id, address_key(sender), body_digest),
        )
        return int(row["ticket_id"]) if row else None

    def has_message_id(self, message_id: str, sender: str) -> bool:
        row = self._one(
            "SELECT 1 FROM messages WHERE message_id = ? AND from_key = ? LIMIT 1",
            (message_id, address_key(sender)),
        )
        return row is not None

    def tickets_by_message_ids(self, message_ids: Sequence[str], sender: str) -> list[int]:
        if not message_ids:
            return []
        # Each ID names the tickets of the messages that carried it from `sender`; failing
        # those, the ticket of its carrier if only one sender ever carried it. A copy of an ID
        # that came from someone else is ambiguous, and an ambiguous ID names nothing.
        rows = self._db.execute(
            "SELECT m.ticket_id FROM messages m "
            "JOIN (SELECT message_id, count(DISTINCT from_key) AS senders, "
            "      max(from_key = ?2) AS own FROM messages "
            "      WHERE message_id IN (SELECT value FROM json_each(?1)) GROUP BY message_id) c "
            "ON c.message_id = m.message_id "
            "WHERE (c.own AND m.from_key = ?2) OR (NOT c.own AND c.senders = 1) "
            "GROUP BY m.ticket_id ORDER BY max(m.received_at) DESC",
            (json.dumps(list(message_ids)), address_key(sender)),
        )
        return [int(row["ticket_id"]) for row in rows]

    def ticket_status(self, ticket_id: int) -> TicketStatus | None:
        row = self._one("SELECT status FROM tickets WHERE id = ?", (ticket_id,))
        return cast(TicketStatus, row["status"]) if row else None

    def may_post(self, ticket_id: int, email: str) -> bool:
        key = address_key(email)
        row = self._one(
            "SELECT 1 FROM tickets t JOIN requesters r ON r.id = t.requester_id "
            "WHERE t.id = ? AND r.email_key = ? "
            "UNION ALL SELECT 1 FROM participants WHERE ticket_id = ? AND email_key = ? LIMIT 1",
            (ticket_id, key, ticket_id, key),
        )
        return row is not None

    def create_ticket(
        self,
        subject: str,
        requester: Address,
        *,
        at: datetime,
        flags: Sequence[str] = (),
        rename: bool = False,
    ) -> int:
        # With `rename`, the newest display name wins: requesters fix typos in their mail
        # client's settings. Otherwise a known requester keeps the name it has. The address
        # keeps the spelling it was first written with.
        row = self._one(
            "INSERT INTO requesters (email, email_key, name, created_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (email_key) DO UPDATE SET name = CASE WHEN ? "
            "THEN coalesce(excluded.name, requesters.name) ELSE requesters.name END "
            "RETURNING id",
            (requester.email, address_key(requester.email), requester.name, _ts(at), rename),
        )
        assert row is not None
        row = self._one(
            "INSERT INTO tickets (subject, requester_id, created_at, updated_at, flags) "
            "VALUES (?, ?, ?, ?, ?) RETURNING id",
            (subject, row["id"], _ts(at), _ts(at), json.dumps(list(flags))),
        )
        assert row is not None
        return int(row["id"])

    def add_message(
        self,
        ticket_id: int,
        mail: ParsedMail,
        *,
        inbound_id: str | None,
        reason: ThreadReason,
        attachments: Sequence[StoredAttachment],
        at: datetime,
        author: Author = "customer",
        auth: Mapping[str, object] | None = None,
        flags: Sequence[str] = (),
    ) -> int:
        row = self._one(
            "INSERT INTO messages (ticket_id, inbound_id, message_id, from_email, from_key, "
            "from_name, subject, body_text, body_html, thread_reason, author, received_at, auth, "
            "flags, body_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (
                ticket_id,
                inbound_id,
                mail.message_id,
                mail.sender.email,
                address_key(mail.sender.email),
                mail.sender.name,
                mail.subject,
                mail.body_text,
                mail.body_html,
                reason,
                author,
                _ts(at),
                json.dumps(dict(auth)) if auth is not None else None,
                json.dumps(list(flags)),
                mail.body_digest,
            ),
        )
        assert row is not None
        message_row = int(row["id"])
        self._db.executemany(
            "INSERT INTO attachments (message_id, position, sha256, filename, content_type, "
            "size, inline) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (message_row, n, a.sha256, a.filename, a.content_type, a.size, a.inline)
                for n, a in enumerate(attachments)
            ],
        )
        self._db.execute("UPDATE tickets SET updated_at = ? WHERE id = ?", (_ts(at), ticket_id))
        return message_row

    def add_participants(self, ticket_id: int, emails: Sequence[str]) -> None:
        self._db.executemany(
            "INSERT OR IGNORE INTO participants (ticket_id, email, email_key) VALUES (?, ?, ?)",
            [(ticket_id, email, address_key(email)) for email in emails],
        )

    def participants(self, ticket_id: int) -> list[str]:
        rows = self._db.execute(
            "SELECT email FROM participants WHERE ticket_id = ? ORDER BY email", (ticket_id,)
        )
        return [str(row["email"]) for row in rows]

    def ticket_head(self, ticket_id: int) -> tuple[str, Address]:
        row = self._one(
            "SELECT t.subject, r.email, r.name FROM tickets t "
            "JOIN requesters r ON r.id = t.requester_id WHERE t.id = ?",
            (ticket_id,),
        )
        if row is None:
            raise LookupError(f"no ticket {ticket_id}")
        return row["subject"], Address(row["email"], row["name"])

    def thread_ids(self, ticket_id: int) -> tuple[str | None, list[str]]:
        rows = self._db.execute(
            "SELECT message_id, author FROM messages WHERE ticket_id = ? "
            "AND message_id IS NOT NULL ORDER BY received_at, id",
            (ticket_id,),
        ).fetchall()
        customer = [row["message_id"] for row in rows if row["author"] == "customer"]
        return (customer[-1] if customer else None), [row["message_id"] for row in rows]

    def requester(self, email: str) -> Requester | None:
        row = self._one(_REQUESTERS + "WHERE r.email_key = ?", (address_key(email),))
        return _requester(row) if row else None

    def has_live_token(self, email: str, *, at: datetime) -> bool:
        row = self._one(
            "SELECT 1 FROM verification_tokens v JOIN requesters r ON r.id = v.requester_id "
            "WHERE r.email_key = ? AND v.used_at IS NULL AND v.revoked_at IS NULL "
            "AND v.expires_at > ? LIMIT 1",
            (address_key(email), _ts(at)),
        )
        return row is not None

    def issue_token(
        self,
        email: str,
        token_hash: str,
        *,
        at: datetime,
        expires_at: datetime,
        message_id: str | None = None,
    ) -> None:
        self._db.execute(
            "INSERT INTO verification_tokens (requester_id, token_hash, created_at, expires_at, "
            "message_id) SELECT id, ?, ?, ?, ? FROM requesters WHERE email_key = ?",
            (token_hash, _ts(at), _ts(expires_at), message_id, address_key(email)),
        )

    def revoke_tokens(
        self, *, hashes: Sequence[str] = (), message_ids: Sequence[str] = (), at: datetime
    ) -> int:
        cursor = self._db.execute(
            "UPDATE verification_tokens SET revoked_at = ? WHERE used_at IS NULL "
            "AND revoked_at IS NULL AND (token_hash IN (SELECT value FROM json_each(?)) "
            "OR message_id IN (SELECT value FROM json_each(?)))",
            (_ts(at), json.dumps(list(hashes)), json.dumps(list(message_ids))),
        )
        return int(cursor.rowcount)

    def automatic_mails_since(self, recipient: str | None, since: datetime) -> int:
        if recipient is None:
            row = self._one(
                "SELECT count(*) AS n FROM outbox WHERE automatic = 1 AND created_at > ?",
                (_ts(since),),
            )
            return int(row["n"]) if row else 0
        # Compared by key in Python: the window holds at most the global cap's rows.
        rows = self._db.execute(
            "SELECT recipient FROM outbox WHERE automatic = 1 AND created_at > ?", (_ts(since),)
        )
        key = address_key(recipient)
        return sum(1 for row in rows if address_key(row["recipient"]) == key)

    def undeliverable(self, email: str) -> bool:
        found = self._one("SELECT 1 FROM undeliverable WHERE email_key = ?", (address_key(email),))
        return found is not None

    def set_undeliverable(self, email: str, status: str | None, *, at: datetime) -> None:
        key = address_key(email)
        if status is None:
            self._db.execute("DELETE FROM undeliverable WHERE email_key = ?", (key,))
            return
        self._db.execute(
            "INSERT INTO undeliverable (email_key, email, status, since) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (email_key) DO UPDATE SET status = excluded.status",
            (key, email, status, _ts(at)),
        )

    def sent_to(self, message_id: str) -> list[str]:
        row = self._one("SELECT recipient, cc FROM outbox WHERE message_id = ?", (message_id,))
        return [row["recipient"], *json.loads(row["cc"])] if row else []

    def enqueue(self, item: OutboxItem, *, at: datetime) -> int:
        row = self._one(
            "INSERT INTO outbox (kind, ticket_id, recipient, recipient_name, cc, message_id, "
            "in_reply_to, refs, context, automatic, created_at, next_attempt_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (
                item.kind,
                item.ticket_id,
                item.to.email,
                item.to.name,
                json.dumps(list(item.cc)),
                item.message_id,
                item.in_reply_to,
                json.dumps(list(item.references)),
                json.dumps(item.context),
                int(item.automatic),
                _ts(at),
                _ts(at),
            ),
        )
        assert row is not None
        return int(row["id"])

    def finish_outbox(
        self,
        outbox_id: int,
        state: OutboxState,
        *,
        error: str | None,
        retry_at: datetime | None,
        reply: str | None = None,
    ) -> None:
        # A sent verification mail drops its token: from now on only its hash exists.
        self._db.execute(
            "UPDATE outbox SET state = :state, last_error = :error, "
            "reply = coalesce(:reply, reply), "
            "next_attempt_at = coalesce(:retry_at, next_attempt_at), "
            "sent_at = CASE WHEN :state = 'sent' THEN :now ELSE sent_at END, "
            "context = CASE WHEN :state = 'sent' THEN json_remove(context, '$.token') "
            "ELSE context END WHERE id = :id",
            {
                "state": state,
                "error": error,
                "reply": reply,
                "retry_at": _ts(retry_at) if retry_at else None,
                "now": _now(),
                "id": outbox_id,
            },
        )

    def set_status(self, ticket_id: int, status: TicketStatus, *, at: datetime) -> None:
        self._db.execute(
            "UPDATE tickets SET status = ?, updated_at = ? WHERE id = ?",
            (status, _ts(at), ticket_id),
        )

    def defer_inbound(self, inbound_id: str, *, retry_at: datetime, count: bool = True) -> None:
        self._db.execute(
            "UPDATE inbound SET attempts = attempts + ?, retry_at = ? WHERE id = ?",
            (int(count), _ts(retry_at), inbound_id),
        )

    def finish_inbound(
        self, inbound_id: str, state: InboundState, *, reason: str | None, at: datetime
    ) -> None:
        self._db.execute(
            "UPDATE inbound SET state = ?, reason = ?, processed_at = ? WHERE id = ?",
            (state, reason, _ts(at), inbound_id),
        )


_INSERT_INBOUND = (
    "INSERT INTO inbound (id, received_at, mail_from, rcpt_tos, peer, helo, smtputf8, forwarded, "
    "raw) VALUES "
)
_INBOUND_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?)"
_INBOUND_SPOOLED = _INSERT_INBOUND + "(?, ?, ?, ?, ?, ?, ?, ?, zeroblob(?))"
# Every column of inbound but the raw message, and its size (length() of a BLOB reads no
# more than the row's header).
_SELECT_INBOUND = (
    "SELECT id, received_at, mail_from, rcpt_tos, peer, helo, smtputf8, forwarded, state, "
    "reason, attempts, length(raw) AS size FROM inbound "
)

# The oldest due rows up to a limit, cut where their sizes add up past a number of bytes (the
# first row always comes).
_PENDING = (
    _SELECT_INBOUND  # noqa: S608 - constant text; the values are parameters
    + "WHERE id IN ("
    " SELECT id FROM ("
    "  SELECT id, size, sum(size) OVER (ORDER BY received_at, id) AS running FROM ("
    "   SELECT id, received_at, length(raw) AS size FROM inbound"
    "   WHERE state = 'received' AND (retry_at IS NULL OR retry_at <= ?)"
    "   AND id NOT IN (SELECT value FROM json_each(?)) ORDER BY received_at, id LIMIT ?))"
    " WHERE running - size < ?) "
    "ORDER BY received_at, id"
)


def _envelope_params(queue_id: str, now: float, env: Envelope) -> list[object]:
    return [queue_id, now, env.mail_from, json.dumps(list(env.rcpt_tos)), env.peer, env.helo,
            int(env.smtputf8), _forwarded_json(env.forwarded)]  # fmt: skip


class SqliteStore:
    """See `Store`."""

    def __init__(self, writer: _Writer, reader: aiosqlite.Connection) -> None:
        self._writer = writer
        self._reader = reader

    @classmethod
    async def open(cls, path: Path) -> SqliteStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = _Writer(path)
        await writer.open()  # creates and migrates the database before the reader looks
        try:
            reader = await _connect_reader(path)
        except sqlite3.Error as exc:
            await writer.close()
            raise StoreUnavailable(f"{path}: {exc}") from exc
        return cls(writer, reader)

    async def close(self) -> None:
        await self._reader.close()
        await self._writer.close()

    async def receive(self, batch: Sequence[tuple[str, Envelope, bytes | Spooled]]) -> None:
        now = _now()
        small: list[object] = []
        rows = 0
        spooled: list[tuple[list[object], Spooled]] = []
        for queue_id, env, raw in batch:
            if isinstance(raw, Spooled):
                spooled.append((_envelope_params(queue_id, now, env), raw))
            else:
                small += [*_envelope_params(queue_id, now, env), raw]
                rows += 1
        # The small messages: one multi-row INSERT, not executemany: a single sqlite3_step, so
        # the writer thread gives up and retakes the GIL once per batch rather than once per
        # message (each retake can wait out the GIL's 5 ms switch interval).
        insert = _INSERT_INBOUND + ",".join([_INBOUND_ROW] * rows)
        if not spooled:
            await self._writer.statement(insert, small)  # atomic on its own (autocommit)
            return

        def work(db: sqlite3.Connection) -> None:
            if rows:
                db.execute(insert, small)
            for params, raw in spooled:
                insert_spooled(db, _INBOUND_SPOOLED, params, raw)

        await self._writer.transaction(work)

    async def ingest(self, work: Callable[[IngestTx], T]) -> T:
        return await self._writer.transaction(lambda db: work(_SqliteIngestTx(db)))

    async def pending_inbound(
        self,
        *,
        limit: int,
        max_bytes: int = 64 * 1024 * 1024,
        exclude: Sequence[str] = (),
    ) -> list[InboundRow]:
        # The oldest due rows up to `limit`, cut where their sizes add up past `max_bytes` (the
        # first row always comes), so a backlog of large messages never loads all at once.
        async with self._reader.execute(
            _PENDING, (_now(), json.dumps(list(exclude)), limit, max_bytes)
        ) as cursor:
            return [_inbound_row(row) async for row in cursor]

    async def get_inbound(self, inbound_id: str) -> InboundRow | None:
        async with self._reader.execute(_SELECT_INBOUND + "WHERE id = ?", (inbound_id,)) as cursor:
            row = await cursor.fetchone()
        return _inbound_row(row) if row else None

    async def list_inbound(self, state: InboundState) -> list[InboundRow]:
        async with self._reader.execute(
            _SELECT_INBOUND + "WHERE state = ? ORDER BY received_at, id",
            (state,),
        ) as cursor:
            return [_inbound_row(row) async for row in cursor]

    @property
    def path(self) -> Path:
        """The database file: the parser process reads raw messages from it itself."""
        return self._writer.path

    async def read_raw(self, inbound_id: str, *, limit: int | None = None) -> bytes | None:
        def read() -> bytes | None:
            reader = RawReader(self.path)
            try:
                return reader.read(inbound_id) if limit is None else reader.head(inbound_id, limit)
            finally:
                reader.close()

        return await _reading(read)

    async def copy_raw(self, inbound_id: str, write: Callable[[bytes], object]) -> bool:
        def copy() -> bool:
            reader = RawReader(self.path)
            try:
                return reader.copy(inbound_id, write)
            finally:
                reader.close()

        return await _reading(copy)

    async def purge_inbound(self, inbound_id: str) -> bool:
        # secure_delete (see _PRAGMAS) overwrites the freed pages: the raw message is gone
        # from the file, not only from the table.
        return await self._writer.changes_one(
            "DELETE FROM inbound WHERE id = ? AND state = 'quarantined'", (inbound_id,)
        )

    async def requeue_inbound(self, inbound_id: str) -> bool:
        return await self._writer.changes_one(
            "UPDATE inbound SET state = 'received', reason = NULL, processed_at = NULL "
            "WHERE id = ? AND state = 'quarantined'",
            (inbound_id,),
        )

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
        return await self._writer.changes_one(
            "UPDATE tickets SET status = ?, updated_at = ? WHERE id = ?",
            (status, _now(), ticket_id),
        )

    async def list_requesters(self) -> list[Requester]:
        async with self._reader.execute(_REQUESTERS + "ORDER BY r.id") as cursor:
            return [_requester(row) async for row in cursor]

    async def get_requester(self, email: str) -> Requester | None:
        async with self._reader.execute(
            _REQUESTERS + "WHERE r.email_key = ?", (address_key(email),)
        ) as cursor:
            row = await cursor.fetchone()
        return _requester(row) if row else None

    async def verify_requester(self, email: str) -> bool:
        return await self._writer.changes_one(
            "UPDATE requesters SET verified_at = coalesce(verified_at, ?) WHERE email_key = ?",
            (_now(), address_key(email)),
        )

    async def add_participant(self, ticket_id: int, email: str) -> bool:
        def add(db: sqlite3.Connection) -> bool:
            if db.execute("SELECT 1 FROM tickets WHERE id = ?", (ticket_id,)).fetchone() is None:
                return False
            db.execute(
                "INSERT OR IGNORE INTO participants (ticket_id, email, email_key) VALUES (?, ?, ?)",
                (ticket_id, email, address_key(email)),
            )
            return True

        return await self._writer.transaction(add)

    async def redeem_token(self, token_hash: str) -> tuple[TokenOutcome, str | None]:
        return await self._writer.transaction(lambda db: _redeem(db, token_hash))

    async def peek_token(self, token_hash: str) -> TokenState:
        return await _peek(self._reader, token_hash)

    async def claim_outbox(self, *, limit: int) -> list[OutboxRow]:
        rows = await self._writer.transaction(
            lambda db: db.execute(_CLAIM, (_now(), limit)).fetchall()
        )
        return sorted((_outbox_row(row) for row in rows), key=lambda r: r.id)

    async def finish_outbox(
        self,
        outbox_id: int,
        state: OutboxState,
        *,
        error: str | None,
        retry_at: datetime | None,
        reply: str | None = None,
    ) -> None:
        await self._writer.transaction(
            lambda db: _SqliteIngestTx(db).finish_outbox(
                outbox_id, state, error=error, retry_at=retry_at, reply=reply
            )
        )

    async def requeue_sending(self) -> int:
        cursor = await self._writer.transaction(
            lambda db: db.execute(
                "UPDATE outbox SET state = 'queued', next_attempt_at = ? WHERE state = 'sending'",
                (_now(),),
            )
        )
        return int(cursor.rowcount)

    async def next_outbox_due(self) -> datetime | None:
        async with self._reader.execute(
            "SELECT min(next_attempt_at) FROM outbox WHERE state = 'queued'"
        ) as cursor:
            row = await cursor.fetchone()
        return _dt(row[0]) if row and row[0] is not None else None

    async def list_outbox(self, state: OutboxState | None = None) -> list[OutboxRow]:
        async with self._reader.execute(
            "SELECT * FROM outbox WHERE ?1 IS NULL OR state = ?1 ORDER BY id", (state,)
        ) as cursor:
            return [_outbox_row(row) async for row in cursor]

    async def retry_outbox(self, outbox_id: int) -> bool:
        return await self._writer.changes_one(
            "UPDATE outbox SET state = 'queued', next_attempt_at = ? "
            "WHERE id = ? AND state IN ('queued', 'failed')",
            (_now(), outbox_id),
        )


async def _reading(read: Callable[[], T]) -> T:
    """Run a `RawReader` call in a thread, with the store's error mapping."""
    try:
        return await asyncio.to_thread(read)
    except sqlite3.OperationalError as exc:
        raise StoreUnavailable(str(exc)) from exc
    except sqlite3.Error as exc:
        raise StoreError(str(exc)) from exc


def _requester(row: sqlite3.Row | aiosqlite.Row) -> Requester:
    return Requester(
        email=row["email"],
        name=row["name"],
        verified=row["verified_at"] is not None,
        created_at=_dt(row["created_at"]),
        verified_at=_dt(row["verified_at"]) if row["verified_at"] is not None else None,
        undeliverable=row["undeliverable"],
    )


def _outbox_row(row: aiosqlite.Row) -> OutboxRow:
    item = OutboxItem(
        kind=row["kind"],
        ticket_id=row["ticket_id"],
        to=Address(row["recipient"], row["recipient_name"]),
        message_id=row["message_id"],
        automatic=bool(row["automatic"]),
        context=json.loads(row["context"]),
        cc=tuple(json.loads(row["cc"])),
        in_reply_to=row["in_reply_to"],
        references=tuple(json.loads(row["refs"])),
    )
    return OutboxRow(
        id=row["id"],
        item=item,
        state=row["state"],
        attempts=row["attempts"],
        last_error=row["last_error"],
        created_at=_dt(row["created_at"]),
        next_attempt_at=_dt(row["next_attempt_at"]),
        sent_at=_dt(row["sent_at"]) if row["sent_at"] is not None else None,
        reply=row["reply"],
    )


def _redeem(db: sqlite3.Connection, token_hash: str) -> tuple[TokenOutcome, str | None]:
    row = db.execute(
        "SELECT v.id, v.requester_id, v.used_at, v.expires_at, v.revoked_at, r.email "
        "FROM verification_tokens v JOIN requesters r ON r.id = v.requester_id "
        "WHERE v.token_hash = ?",
        (token_hash,),
    ).fetchone()
    if row is None:
        return "unknown", None
    if row["used_at"] is not None:
        return "used", None
    if row["revoked_at"] is not None:
        return "revoked", None
    now = _now()
    if row["expires_at"] <= now:
        return "expired", None
    db.execute("UPDATE verification_tokens SET used_at = ? WHERE id = ?", (now, row["id"]))
    db.execute(
        "UPDATE requesters SET verified_at = coalesce(verified_at, ?) WHERE id = ?",
        (now, row["requester_id"]),
    )
    return "verified", str(row["email"])


async def _peek(db: aiosqlite.Connection, token_hash: str) -> TokenState:
    """What `_redeem` would find, in the same order, on the reader: nothing is written. No
    join: a token's requester always exists (ON DELETE CASCADE, foreign keys on)."""
    try:
        async with db.execute(
            "SELECT used_at, revoked_at, expires_at FROM verification_tokens WHERE token_hash = ?",
            (token_hash,),
        ) as cursor:
            row = await cursor.fetchone()
    except sqlite3.OperationalError as exc:
        raise StoreUnavailable(str(exc)) from exc
    except sqlite3.Error as exc:
        raise StoreError(str(exc)) from exc
    if row is None:
        return "unknown"
    if row["used_at"] is not None:
        return "used"
    if row["revoked_at"] is not None:
        return "revoked"
    return "expired" if row["expires_at"] <= _now() else "live"


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
        flags=tuple(json.loads(row["flags"])),
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
        author=row["author"],
        attachments=attachments,
        auth=json.loads(row["auth"]) if row["auth"] else None,
        flags=tuple(json.loads(row["flags"])),
    )


_REQUESTERS = (
    "SELECT r.*, u.status AS undeliverable FROM requesters r "
    "LEFT JOIN undeliverable u ON u.email_key = r.email_key "
)
_CLAIM = (
    "UPDATE outbox SET state = 'sending', attempts = attempts + 1 WHERE id IN ("
    " SELECT id FROM outbox WHERE state = 'queued' AND next_attempt_at <= ?"
    " ORDER BY next_attempt_at, id LIMIT ?) RETURNING *"
)


@asynccontextmanager
async def open_store(path: Path) -> AsyncIterator[SqliteStore]:
    """Open the store at `path`, migrating it, and close it on exit."""
    store = await SqliteStore.open(path)
    try:
        yield store
    finally:
        await store.close()
