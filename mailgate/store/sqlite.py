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
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import aiosqlite

from mailgate.addresses import address_key
from mailgate.errors import StoreError, StoreUnavailable
from mailgate.model import (
    Address,
    AuditRecord,
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
    PrivacyAction,
    Queue,
    Queues,
    Requester,
    StoredAttachment,
    ThreadReason,
    Ticket,
    TicketStatus,
)
from mailgate.privacy.keyring import Keyring
from mailgate.privacy.sealing import DataKey, seal_stream
from mailgate.spool import Spooled
from mailgate.store import sqlite_requests as requests
from mailgate.store import sqlite_rights as rights
from mailgate.store.base import IngestTx, TokenOutcome, TokenState
from mailgate.store.blobs import read_blob
from mailgate.store.labels import (
    ATTACHMENT,
    AUTH,
    BLOB_KEY,
    BODY,
    EMAIL,
    ENVELOPE,
    ERASED,
    HTML,
    MESSAGE_KEY,
    NAME,
    OUTBOX,
    OUTBOX_ERROR,
    RAW,
    SENDER,
    SUBJECT,
)
from mailgate.store.sqlite_erase import Deleted, delete_person, delete_tickets, reconcile
from mailgate.store.sqlite_raw import (
    RawReader,
    insert_spooled,
    insert_stream,
    message_key,
    raw_size,
)
from mailgate.store.sqlite_retention import CATEGORIES as RETENTION_CATEGORIES
from mailgate.store.sqlite_retention import CLOSED as CLOSED_TICKETS
from mailgate.store.sqlite_retention import (
    UNVERIFIED,
    Cutoffs,
    count_due,
    mark_unverified,
    remove_batch,
)

if TYPE_CHECKING:
    from mailgate.store.sqlite_adopt import Adopted

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


def _queue(states: dict[str, tuple[int, float | None, float | None]]) -> Queue:
    """A queue from (count, oldest pending, oldest due) per state; states without rows are
    left out."""
    pending = [oldest for _, oldest, _ in states.values() if oldest is not None]
    due = [since for _, _, since in states.values() if since is not None]
    return Queue(
        {state: count for state, (count, _, _) in states.items() if count},
        _dt(min(pending)) if pending else None,
        _dt(min(due)) if due else None,
    )


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

    def __init__(self, path: Path, keys: Keyring, attachments: Path | None) -> None:
        self.path = path
        self._keys = keys
        self._attachments = attachments
        self.adopted: Adopted | None = None  # what the open brought over from before 009
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
        # Imported here: adoption builds on this module's writes (the ingest unit of work).
        from mailgate.store.sqlite_adopt import adopt_legacy

        try:
            self.adopted = adopt_legacy(db, _SqliteIngestTx(db, self._keys), self._attachments)
        except BaseException:
            db.close()
            raise
        reconcile(db, self._keys)
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

    async def checkpoint(self) -> bool:
        """Copy the WAL into the database and truncate it (after deletes: no old pages stay);
        tell whether it could (a reader's snapshot keeps the pages it reads)."""
        assert self._db is not None, "writer not open"
        db = self._db
        # Fetched to its end: a PRAGMA that returns a row and is left unfinished keeps a
        # statement in progress, and the next COMMIT on this connection fails.
        rows = await self._call(lambda: db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())
        return not rows[0][0]

    async def statement(self, sql: str, params: Sequence[object] | Mapping[str, object]) -> None:
        """Run one statement, atomic (and fsynced) on its own, on the writer thread."""
        assert self._db is not None, "writer not open"
        db = self._db
        await self._call(lambda: db.execute(sql, params))


def _envelope_json(env: Envelope) -> bytes:
    """The envelope as UTF-8 JSON.

    Raises:
        StoreError: a value is not text that UTF-8 can hold (a lone surrogate): that message
            alone is refused (intake commits the rest of its batch without it).
    """
    try:
        return _envelope_text(env).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise StoreError(f"envelope not storable: {exc.reason}") from None


def _envelope_text(env: Envelope) -> str:
    return json.dumps(
        {
            "mail_from": env.mail_from,
            "rcpt_tos": list(env.rcpt_tos),
            "peer": env.peer,
            "helo": env.helo,
            "smtputf8": env.smtputf8,
            "forwarded": dataclasses.asdict(env.forwarded) if env.forwarded else None,
        },
        ensure_ascii=False,
    )


def _envelope(data: bytes) -> Envelope:
    """The stored envelope; keys this version does not know are ignored."""
    stored = json.loads(data)
    return Envelope(
        mail_from=stored["mail_from"],
        rcpt_tos=tuple(stored["rcpt_tos"]),
        peer=stored["peer"],
        helo=stored["helo"],
        smtputf8=bool(stored["smtputf8"]),
        forwarded=forwarded_client(stored.get("forwarded")),
    )


def forwarded_client(stored: Mapping[str, Any] | None) -> ForwardedClient | None:
    """The XFORWARD client as stored (JSON); keys this version does not know are ignored."""
    if stored is None:
        return None
    names = (f.name for f in dataclasses.fields(ForwardedClient))
    return ForwardedClient(**{name: stored.get(name) for name in names})


def _inbound_row(keys: Keyring, row: sqlite3.Row | aiosqlite.Row) -> InboundRow:
    key = message_key(keys, bytes(row["raw_key"]), row["owner_key"])
    envelope = (
        _envelope(key.open(bytes(row["envelope"]), ENVELOPE))
        if key is not None
        else Envelope(mail_from="", rcpt_tos=(), peer=ERASED, helo=None)
    )
    return InboundRow(
        id=row["id"],
        envelope=envelope,
        size=row["size"],
        state=row["state"],
        received_at=_dt(row["received_at"]),
        reason=row["reason"],
        attempts=row["attempts"],
    )


class _Opener:
    """Opens sealed values of rows read anywhere: finds each person's key by its id."""

    def __init__(self, keys: Keyring) -> None:
        self.keys = keys

    def key(self, key_id: str | None) -> DataKey | None:
        return self.keys.key(key_id) if key_id else None

    def address(self, row: sqlite3.Row | aiosqlite.Row, prefix: str = "") -> Address:
        """The (email, name) of a joined people row, or the erased placeholder."""
        key = self.key(row[f"{prefix}key_id"])
        if key is None:
            return Address(ERASED, None)
        return Address(
            key.open_text(bytes(row[f"{prefix}email"]), EMAIL) or ERASED,
            key.open_text(_bytes(row[f"{prefix}name"]), NAME),
        )


class _People(_Opener):
    """People by address (blind index) and their keys, inside a transaction on the writer."""

    def __init__(self, db: sqlite3.Connection, keys: Keyring) -> None:
        super().__init__(keys)
        self._db = db

    def find(self, email: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._db.execute(
            "SELECT * FROM people WHERE blind = ?", (self.keys.blind(email),)
        ).fetchone()
        return row

    def upsert(
        self, person: Address, *, rename: bool = False, created_at: float | None = None
    ) -> tuple[int, DataKey]:
        """The person with this address, made if new (at `created_at`, default now); `rename`
        lets the display name change."""
        row = self.find(person.email)
        if row is not None:
            key = self.key(row["key_id"])
            if rename and person.name and key is not None:
                self._db.execute(
                    "UPDATE people SET name = ? WHERE id = ?",
                    (key.seal_text(person.name, NAME), row["id"]),
                )
            if key is None:  # destroyed under us (an erasure in another process): unusable
                raise StoreError("that person was erased")
            return int(row["id"]), key
        key = self.keys.new_key()
        new = self._db.execute(
            "INSERT INTO people (blind, key_id, email, name, created_at) VALUES (?, ?, ?, ?, ?) "
            "RETURNING id",
            (
                self.keys.blind(person.email),
                key.key_id,
                key.seal_text(person.email, EMAIL),
                key.seal_text(person.name, NAME),
                _now() if created_at is None else created_at,
            ),
        ).fetchone()
        return int(new["id"]), key

    def of_ticket(self, ticket_id: int) -> tuple[int, DataKey]:
        """The ticket's requester and their key: what its values are sealed under."""
        row = self._db.execute(
            "SELECT p.id, p.key_id FROM tickets t JOIN people p ON p.id = t.requester_id "
            "WHERE t.id = ?",
            (ticket_id,),
        ).fetchone()
        if row is None:
            raise LookupError(f"no ticket {ticket_id}")
        key = self.key(row["key_id"])
        if key is None:
            raise StoreError(f"ticket {ticket_id}: its requester's key is destroyed")
        return int(row["id"]), key


@dataclass(frozen=True, slots=True)
class PersonRef:
    """A person by row id and data key id: no personal data."""

    id: int
    key_id: str


def _bytes(value: object) -> bytes | None:
    return None if value is None else bytes(cast(bytes, value))


class _SqliteIngestTx:
    """See `IngestTx`. Lives only inside one `SqliteStore.ingest()` call, on the writer thread."""

    def __init__(self, db: sqlite3.Connection, keys: Keyring) -> None:
        self._db = db
        self._people = _People(db, keys)
        self._keys = keys

    @property
    def people(self) -> _People:
        return self._people

    def _one(self, sql: str, params: Sequence[Any]) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._db.execute(sql, params).fetchone()
        return row

    def _person_id(self, email: str) -> int | None:
        row = self._people.find(email)
        return int(row["id"]) if row is not None else None

    def inbound_state(self, inbound_id: str) -> InboundState | None:
        row = self._one("SELECT state FROM inbound WHERE id = ?", (inbound_id,))
        return cast(InboundState, row["state"]) if row else None

    def _digest(self, body_digest: str) -> str:
        return self._keys.keyed_hash(body_digest.encode(), "body")

    def duplicate_ticket(self, message_id: str, sender: str, body_digest: str) -> int | None:
        person = self._person_id(sender)
        if person is None:
            return None
        row = self._one(
            "SELECT ticket_id FROM messages WHERE message_id = ? AND sender_id = ? "
            "AND body_digest = ? LIMIT 1",
            (message_id, person, self._digest(body_digest)),
        )
        return int(row["ticket_id"]) if row else None

    def has_message_id(self, message_id: str, sender: str) -> bool:
        person = self._person_id(sender)
        row = self._one(
            "SELECT 1 FROM messages WHERE message_id = ? AND sender_id = ? LIMIT 1",
            (message_id, person),
        )
        return row is not None

    def tickets_by_message_ids(self, message_ids: Sequence[str], sender: str) -> list[int]:
        if not message_ids:
            return []
        # Each ID names the tickets of the messages that carried it from `sender`; failing
        # those, the ticket of its carrier if only one sender ever carried it. A copy of an ID
        # that came from someone else is ambiguous, and an ambiguous ID names nothing. A
        # message whose sender was erased counts as another sender.
        person = self._person_id(sender) or 0
        rows = self._db.execute(
            "SELECT m.ticket_id FROM messages m "
            "JOIN (SELECT message_id, count(DISTINCT coalesce(sender_id, -id)) AS senders, "
            "      max(sender_id IS ?2) AS own FROM messages "
            "      WHERE message_id IN (SELECT value FROM json_each(?1)) GROUP BY message_id) c "
            "ON c.message_id = m.message_id "
            "WHERE (c.own AND m.sender_id IS ?2) OR (NOT c.own AND c.senders = 1) "
            "GROUP BY m.ticket_id ORDER BY max(m.received_at) DESC",
            (json.dumps(list(message_ids)), person),
        )
        return [int(row["ticket_id"]) for row in rows]

    def ticket_status(self, ticket_id: int) -> TicketStatus | None:
        row = self._one("SELECT status FROM tickets WHERE id = ?", (ticket_id,))
        return cast(TicketStatus, row["status"]) if row else None

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
        person, key = self._people.upsert(requester, rename=rename)
        return self.insert_ticket(person, key, subject, created_at=_ts(at), flags=flags)

    def insert_ticket(
        self,
        person: int,
        key: DataKey,
        subject: str,
        *,
        created_at: float,
        flags: Sequence[str] = (),
        row_id: int | None = None,
        status: TicketStatus = "open",
        updated_at: float | None = None,
        closed_at: float | None = None,
    ) -> int:
        """Insert a ticket of `person`, its subject sealed under their `key`; `row_id` and the
        rest keep a ticket's id and state as an earlier version stored them (adoption)."""
        row = self._one(
            "INSERT INTO tickets (id, subject, status, requester_id, created_at, updated_at, "
            "closed_at, flags) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (
                row_id,
                key.seal_text(subject, SUBJECT),
                status,
                person,
                created_at,
                created_at if updated_at is None else updated_at,
                closed_at,
                json.dumps(list(flags)),
            ),
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
        row_id: int | None = None,
    ) -> int:
        """See `IngestTx`; `row_id` (and each attachment's `id`) keep the ids an earlier
        version gave them (adoption)."""
        owner_id, owner = self._people.of_ticket(ticket_id)
        sender_id, sender_key = self._people.upsert(Address(mail.sender.email, None))
        sender = json.dumps([mail.sender.email, mail.sender.name]).encode()
        row = self._one(
            "INSERT INTO messages (id, ticket_id, inbound_id, message_id, sender_id, sender_key, "
            "sender, subject, body_text, body_html, body_digest, thread_reason, author, "
            "received_at, auth, flags) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "RETURNING id",
            (
                row_id,
                ticket_id,
                inbound_id,
                mail.message_id,
                sender_id,
                sender_key.key_id,
                sender_key.seal(sender, SENDER),
                owner.seal_text(mail.subject, SUBJECT),
                owner.seal_text(mail.body_text, BODY),
                owner.seal_text(mail.body_html, HTML),
                self._digest(mail.body_digest) if mail.body_digest else None,
                reason,
                author,
                _ts(at),
                owner.seal(json.dumps(dict(auth)).encode(), AUTH) if auth is not None else None,
                json.dumps(list(flags)),
            ),
        )
        assert row is not None
        message_row = int(row["id"])
        for position, attachment in enumerate(attachments):
            blob = self._blob(owner_id, owner, attachment)
            meta = json.dumps({"filename": attachment.filename, "sha256": attachment.sha256})
            self._db.execute(
                "INSERT INTO attachments (id, message_id, position, blob_id, meta, content_type, "
                "size, inline) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    attachment.id,
                    message_row,
                    position,
                    blob,
                    owner.seal(meta.encode(), ATTACHMENT),
                    attachment.content_type,
                    attachment.size,
                    attachment.inline,
                ),
            )
        if inbound_id is not None:
            self._own_inbound(inbound_id, owner)
        self._db.execute("UPDATE tickets SET updated_at = ? WHERE id = ?", (_ts(at), ticket_id))
        return message_row

    def _own_inbound(self, inbound_id: str, owner: DataKey) -> None:
        """The raw message belongs to the ticket's requester now: erasing them shreds it (a
        key wrapped under the master key would open it in any old backup)."""
        raw = self._one("SELECT raw_key, owner_key FROM inbound WHERE id = ?", (inbound_id,))
        if raw is not None and raw["owner_key"] is None:
            message = self._keys.unwrap_message_key(bytes(raw["raw_key"]))
            self._db.execute(
                "UPDATE inbound SET raw_key = ?, owner_key = ? WHERE id = ?",
                (owner.seal(message.material, MESSAGE_KEY), owner.key_id, inbound_id),
            )

    def _blob(self, owner_id: int, owner: DataKey, attachment: StoredAttachment) -> int:
        """The owner's blob of this content: counted once more, or the new file recorded."""
        digest = self._keys.keyed_hash(f"{owner.key_id}:{attachment.sha256}".encode(), "blob")
        row = self._one(
            "UPDATE blobs SET refs = refs + 1 WHERE owner_id = ? AND digest = ? RETURNING id",
            (owner_id, digest),
        )
        if row is not None:
            return int(row["id"])  # the new file stays unreferenced: the sweep removes it
        row = self._one(
            "INSERT INTO blobs (owner_id, name, digest, key, size, refs) "
            "VALUES (?, ?, ?, ?, ?, 1) RETURNING id",
            (
                owner_id,
                attachment.blob,
                digest,
                owner.seal(attachment.key, f"{BLOB_KEY}:{attachment.blob}"),
                attachment.size,
            ),
        )
        assert row is not None
        return int(row["id"])

    def add_participants(self, ticket_id: int, emails: Sequence[str]) -> None:
        for email in emails:
            person, _key = self._people.upsert(Address(email, None))
            self._db.execute(
                "INSERT OR IGNORE INTO participants (ticket_id, person_id) VALUES (?, ?)",
                (ticket_id, person),
            )

    def participants(self, ticket_id: int) -> list[str]:
        rows = self._db.execute(
            "SELECT p.key_id, p.email, p.name FROM participants x "
            "JOIN people p ON p.id = x.person_id WHERE x.ticket_id = ?",
            (ticket_id,),
        )
        return sorted(self._people.address(row).email for row in rows)

    def ticket_head(self, ticket_id: int) -> tuple[str, Address]:
        row = self._one(
            "SELECT t.subject, p.key_id, p.email, p.name FROM tickets t "
            "JOIN people p ON p.id = t.requester_id WHERE t.id = ?",
            (ticket_id,),
        )
        if row is None:
            raise LookupError(f"no ticket {ticket_id}")
        key = self._people.key(row["key_id"])
        subject = key.open_text(bytes(row["subject"]), SUBJECT) if key else ERASED
        return subject or "", self._people.address(row)

    def thread_ids(self, ticket_id: int) -> tuple[str | None, list[str]]:
        rows = self._db.execute(
            "SELECT message_id, author FROM messages WHERE ticket_id = ? "
            "AND message_id IS NOT NULL ORDER BY received_at, id",
            (ticket_id,),
        ).fetchall()
        customer = [row["message_id"] for row in rows if row["author"] == "customer"]
        return (customer[-1] if customer else None), [row["message_id"] for row in rows]

    def requester(self, email: str) -> Requester | None:
        row = self._people.find(email)
        return _requester(self._people, row) if row else None

    def has_live_token(self, email: str, *, at: datetime) -> bool:
        person = self._person_id(email)
        row = self._one(
            "SELECT 1 FROM verification_tokens WHERE person_id = ? AND used_at IS NULL "
            "AND revoked_at IS NULL AND expires_at > ? LIMIT 1",
            (person, _ts(at)),
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
        person = self._person_id(email)
        if person is None:
            return
        self._db.execute(
            "INSERT INTO verification_tokens (person_id, token_hash, created_at, expires_at, "
            "message_id) VALUES (?, ?, ?, ?, ?)",
            (person, token_hash, _ts(at), _ts(expires_at), message_id),
        )

    def revoke_tokens(
        self, *, hashes: Sequence[str] = (), message_ids: Sequence[str] = (), at: datetime
    ) -> int:
        found, carried = json.dumps(list(hashes)), json.dumps(list(message_ids))
        cursor = self._db.execute(
            "UPDATE verification_tokens SET revoked_at = ? WHERE used_at IS NULL "
            "AND revoked_at IS NULL AND (token_hash IN (SELECT value FROM json_each(?)) "
            "OR message_id IN (SELECT value FROM json_each(?)))",
            (_ts(at), found, carried),
        )
        # A privacy request's link is a token like the others: a bounce revokes it too.
        return int(cursor.rowcount) + requests.revoke(self._db, found, carried, _ts(at))

    def open_privacy_request(
        self,
        email: str,
        ticket_id: int,
        action: PrivacyAction,
        token_hash: str,
        *,
        at: datetime,
        expires_at: datetime,
        message_id: str | None,
    ) -> None:
        row = self._people.find(email)
        if row is None:
            return
        requests.open_request(
            self._db,
            person_id=int(row["id"]),
            blind=bytes(row["blind"]),
            ticket_id=ticket_id,
            action=action,
            token_hash=token_hash,
            at=_ts(at),
            expires_at=_ts(expires_at),
            message_id=message_id,
        )

    def automatic_mails_since(self, recipient: str | None, since: datetime) -> int:
        if recipient is None:
            row = self._one(
                "SELECT count(*) AS n FROM outbox WHERE automatic = 1 AND created_at > ?",
                (_ts(since),),
            )
            return int(row["n"]) if row else 0
        row = self._one(
            "SELECT count(*) AS n FROM outbox WHERE automatic = 1 AND recipient_id = ? "
            "AND created_at > ?",
            (self._person_id(recipient), _ts(since)),
        )
        return int(row["n"]) if row else 0

    def undeliverable(self, email: str) -> bool:
        row = self._people.find(email)
        return row is not None and row["undeliverable"] is not None

    def set_undeliverable(self, email: str, status: str | None, *, at: datetime) -> None:
        if status is None:
            person = self._person_id(email)
            self._db.execute(
                "UPDATE people SET undeliverable = NULL, undeliverable_since = NULL WHERE id = ?",
                (person,),
            )
            return
        person, _key = self._people.upsert(Address(email, None))
        self._db.execute(
            "UPDATE people SET undeliverable = ?, "
            "undeliverable_since = coalesce(undeliverable_since, ?) WHERE id = ?",
            (status, _ts(at), person),
        )

    def sent_to(self, message_id: str) -> list[str]:
        row = self._one(
            "SELECT o.ticket_id, o.mail FROM outbox o WHERE o.message_id = ?", (message_id,)
        )
        if row is None or row["ticket_id"] is None:  # a system mail names no one once sent
            return []
        _owner, key = self._people.of_ticket(row["ticket_id"])
        mail = json.loads(key.open(bytes(row["mail"]), OUTBOX))
        return [mail["to"][0], *mail["cc"]]

    def enqueue(
        self,
        item: OutboxItem,
        *,
        at: datetime,
        held_for: str | None = None,
        row_id: int | None = None,
    ) -> int:
        """See `IngestTx`; `row_id` keeps the id an earlier version gave the row (adoption)."""
        recipient: int | None
        seal_key: str | None
        if item.ticket_id is None:
            # A system mail: to no person (no people row is made for its address), sealed
            # under a key of its own, destroyed with the row once it is sent.
            key = self._keys.new_key()
            recipient, seal_key = None, key.key_id
        else:
            _owner, key = self._people.of_ticket(item.ticket_id)
            recipient, _ = self._people.upsert(Address(item.to.email, None))
            seal_key = None
        mail = {"to": [item.to.email, item.to.name], "cc": list(item.cc), "context": item.context}
        row = self._one(
            "INSERT INTO outbox (id, kind, ticket_id, recipient_id, seal_key, held_for, mail, "
            "message_id, in_reply_to, refs, automatic, created_at, next_attempt_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (
                row_id,
                item.kind,
                item.ticket_id,
                recipient,
                seal_key,
                self._person_id(held_for) if held_for is not None else None,
                key.seal(json.dumps(mail).encode(), OUTBOX),
                item.message_id,
                item.in_reply_to,
                json.dumps(list(item.references)),
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
        row = self._one("SELECT ticket_id, seal_key, mail FROM outbox WHERE id = ?", (outbox_id,))
        if row is None:
            return
        if row["seal_key"] is not None:
            key = self._keys.key(row["seal_key"])
            if state in ("sent", "failed") or key is None:
                # Done with: its key first (from here the row is ciphertext without a key),
                # then the row; a crash between leaves a row that the next claim drops.
                self._keys.destroy([row["seal_key"]])
                self._db.execute("DELETE FROM outbox WHERE id = ?", (outbox_id,))
                return
        else:
            try:
                _owner, key = self._people.of_ticket(row["ticket_id"])
            except (LookupError, StoreError):
                return  # its ticket was erased while it was being sent
        mail = bytes(row["mail"])
        if state in ("sent", "failed"):
            opened = json.loads(key.open(mail, OUTBOX))
            # A sent verification mail drops its token: from now on only its hash exists.
            if state == "sent":
                opened["context"].pop("token", None)
            # An export's zip is kept only until its mail is sent (or has failed).
            blob = opened["context"].get("export_blob")
            if blob is not None:
                opened["context"]["export_blob"] = None
                self._db.execute(
                    "DELETE FROM blobs WHERE name = ? AND owner_id = "
                    "(SELECT requester_id FROM tickets WHERE id = ?)",
                    (blob, row["ticket_id"]),
                )
            mail = key.seal(json.dumps(opened).encode(), OUTBOX)
        self._db.execute(
            "UPDATE outbox SET state = :state, last_error = :error, mail = :mail, "
            "reply = coalesce(:reply, reply), "
            "next_attempt_at = coalesce(:retry_at, next_attempt_at), "
            "sent_at = CASE WHEN :state = 'sent' THEN :now ELSE sent_at END WHERE id = :id",
            {
                "state": state,
                "error": key.seal_text(error, OUTBOX_ERROR),
                "reply": key.seal_text(reply, OUTBOX_ERROR),
                "mail": mail,
                "retry_at": _ts(retry_at) if retry_at else None,
                "now": _now(),
                "id": outbox_id,
            },
        )

    def set_status(self, ticket_id: int, status: TicketStatus, *, at: datetime) -> None:
        _set_status(self._db, ticket_id, status, _ts(at))

    def defer_inbound(self, inbound_id: str, *, retry_at: datetime, count: bool = True) -> None:
        self._db.execute(
            "UPDATE inbound SET attempts = attempts + ?, retry_at = ? WHERE id = ?",
            (int(count), _ts(retry_at), inbound_id),
        )

    def finish_inbound(
        self,
        inbound_id: str,
        state: InboundState,
        *,
        reason: str | None,
        at: datetime,
        ticket_id: int | None = None,
    ) -> None:
        if ticket_id is not None:
            self._own_inbound(inbound_id, self._people.of_ticket(ticket_id)[1])
        self._db.execute(
            "UPDATE inbound SET state = ?, reason = ?, processed_at = ? WHERE id = ?",
            (state, reason, _ts(at), inbound_id),
        )

    def insert_inbound(
        self,
        queue_id: str,
        envelope: Envelope,
        *,
        received_at: float,
        size: int,
        pieces: Iterable[bytes],
    ) -> None:
        """Insert a received row as `receive` does (its envelope and raw message sealed under a
        key of its own, wrapped under the master key), the raw message read in `pieces`."""
        params, key = _sealed_envelope(self._keys, queue_id, received_at, envelope, size)
        insert_stream(self._db, _INBOUND_SPOOLED, params, size, pieces, key)


class PrivacyTx(_SqliteIngestTx):
    """A unit of work of a privacy request's confirmation (`SqliteStore.privacy`): the ingest
    unit of work (the mails that follow are queued through the ticket rules as ever) and what
    acting on the request writes besides, in the same transaction: the request's state, a
    restriction, the mark that begins an erasure, the export's blob, audit records."""

    def confirm_request(self, token_hash: str, *, at: datetime) -> requests.Claim | TokenState:
        """Use a live request's link (once); otherwise its state, nothing changed."""
        return requests.confirm(self._db, self._keys, token_hash, _ts(at))

    def unfinished_request(self, request_id: int) -> requests.Claim | None:
        """The request if it is confirmed and not yet done (its person not being erased)."""
        return requests.unfinished(self._db, self._keys, request_id)

    def finish_request(self, request_id: int, *, at: datetime) -> None:
        requests.finish(self._db, request_id, _ts(at))

    def reopen_request(self, request_id: int) -> bool:
        """Give a confirmed request's link back (carrying it out failed): it can be used again."""
        return requests.reopen(self._db, request_id)

    def restrict(
        self, email: str, change: rights.Change, audit: AuditRecord
    ) -> rights.Restriction | None:
        return rights.set_restriction(self._db, self._keys, email, change, audit)

    def begin_erasure(self, person_id: int) -> PersonRef | None:
        """Mark the person 'erasing' (`SqliteStore.begin_erasure`, by id)."""
        row = self._one(
            "UPDATE people SET state = 'erasing' WHERE id = ? RETURNING id, key_id", (person_id,)
        )
        return PersonRef(row["id"], row["key_id"]) if row else None

    def add_audit(self, record: AuditRecord) -> None:
        rights.insert_audit(self._db, record)

    def own_export(self, person_id: int, name: str, key: bytes, size: int) -> None:
        """Record an export's sealed zip (`blobs.save_blob`) as a blob of the person: erasing
        them removes it; it is removed once its mail is sent."""
        row = self._one("SELECT key_id FROM people WHERE id = ?", (person_id,))
        owner = self._keys.key(row["key_id"]) if row is not None else None
        if owner is None:
            raise StoreError("that person was erased")
        digest = self._keys.keyed_hash(f"{owner.key_id}:export:{name}".encode(), "blob")
        self._db.execute(
            "INSERT INTO blobs (owner_id, name, digest, key, size, refs) VALUES (?, ?, ?, ?, ?, 1)",
            (person_id, name, digest, owner.seal(key, f"{BLOB_KEY}:{name}"), size),
        )


def _set_status(db: sqlite3.Connection, ticket_id: int, status: TicketStatus, at: float) -> int:
    # A closed ticket set open again counts as reopened (statistics: the reopen rate).
    cursor = db.execute(
        "UPDATE tickets SET status = ?1, updated_at = ?2, "
        "reopened = reopened + (status = 'closed' AND ?1 = 'open'), "
        "closed_at = CASE WHEN ?1 = 'closed' THEN coalesce(closed_at, ?2) END WHERE id = ?3",
        (status, at, ticket_id),
    )
    return int(cursor.rowcount)


_INSERT_INBOUND = "INSERT INTO inbound (id, received_at, envelope, raw_key, size, raw) VALUES "
_INBOUND_ROW = "(?, ?, ?, ?, ?, ?)"
_INBOUND_SPOOLED = _INSERT_INBOUND + "(?, ?, ?, ?, ?, zeroblob(?))"
# Every column of inbound but the raw message.
_SELECT_INBOUND = (
    "SELECT id, received_at, envelope, raw_key, owner_key, size, state, reason, attempts "
    "FROM inbound "
)

# The oldest due rows up to a limit, cut where their sizes add up past a number of bytes (the
# first row always comes).
_PENDING = (
    _SELECT_INBOUND  # noqa: S608 - constant text; the values are parameters
    + "WHERE id IN ("
    " SELECT id FROM ("
    "  SELECT id, size, sum(size) OVER (ORDER BY received_at, id) AS running FROM ("
    "   SELECT id, received_at, size FROM inbound"
    "   WHERE state = 'received' AND (retry_at IS NULL OR retry_at <= ?)"
    "   AND id NOT IN (SELECT value FROM json_each(?)) ORDER BY received_at, id LIMIT ?))"
    " WHERE running - size < ?) "
    "ORDER BY received_at, id"
)


def _sealed_envelope(
    keys: Keyring, queue_id: str, now: float, env: Envelope, size: int
) -> tuple[list[object], DataKey]:
    key, wrapped = keys.message_key()
    return [queue_id, now, key.seal(_envelope_json(env), ENVELOPE), wrapped, size], key


class SqliteStore:
    """See `Store`."""

    def __init__(self, writer: _Writer, reader: aiosqlite.Connection, keys: Keyring) -> None:
        self._writer = writer
        self._reader = reader
        self.keys = keys

    @classmethod
    async def open(
        cls, path: Path, keys: Keyring, *, attachments: Path | None = None
    ) -> SqliteStore:
        """Open (creating and migrating) the database at `path`. `attachments` is the folder of
        attachment files: a database from before migration 009 needs it to adopt its files."""
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = _Writer(path, keys, attachments)
        try:
            await writer.open()  # creates and migrates the database before the reader looks
        except BaseException:
            await writer.close()
            raise
        try:
            reader = await _connect_reader(path)
        except sqlite3.Error as exc:
            await writer.close()
            raise StoreUnavailable(f"{path}: {exc}") from exc
        return cls(writer, reader, keys)

    async def close(self) -> None:
        await self._reader.close()
        await self._writer.close()

    @property
    def adopted(self) -> Adopted | None:
        """What opening brought over from a database written before migration 009, if any."""
        return self._writer.adopted

    async def receive(self, batch: Sequence[tuple[str, Envelope, bytes | Spooled]]) -> None:
        # Sealed here, before the commit that the 250 waits for: no raw message or envelope
        # ever reaches the database file (or its WAL) in clear.
        now = _now()
        small: list[object] = []
        rows = 0
        spooled: list[tuple[list[object], DataKey, Spooled]] = []
        for queue_id, env, raw in batch:
            params, key = _sealed_envelope(self.keys, queue_id, now, env, raw_size(raw))
            if isinstance(raw, Spooled):
                spooled.append((params, key, raw))
            else:
                small += [*params, seal_stream(key, raw, RAW)]
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
            for params, key, raw in spooled:
                insert_spooled(db, _INBOUND_SPOOLED, params, raw, key)

        await self._writer.transaction(work)

    async def ingest(self, work: Callable[[IngestTx], T]) -> T:
        return await self._writer.transaction(lambda db: work(_SqliteIngestTx(db, self.keys)))

    async def _rows(
        self, sql: str, params: Sequence[object] | Mapping[str, object] = ()
    ) -> list[aiosqlite.Row]:
        async with self._reader.execute(sql, params) as cursor:
            return list(await cursor.fetchall())

    async def pending_inbound(
        self,
        *,
        limit: int,
        max_bytes: int = 64 * 1024 * 1024,
        exclude: Sequence[str] = (),
    ) -> list[InboundRow]:
        # The oldest due rows up to `limit`, cut where their sizes add up past `max_bytes` (the
        # first row always comes), so a backlog of large messages never loads all at once.
        rows = await self._rows(_PENDING, (_now(), json.dumps(list(exclude)), limit, max_bytes))
        return [_inbound_row(self.keys, row) for row in rows]

    async def get_inbound(self, inbound_id: str) -> InboundRow | None:
        rows = await self._rows(_SELECT_INBOUND + "WHERE id = ?", (inbound_id,))
        return _inbound_row(self.keys, rows[0]) if rows else None

    async def list_inbound(self, state: InboundState) -> list[InboundRow]:
        rows = await self._rows(
            _SELECT_INBOUND + "WHERE state = ? ORDER BY received_at, id", (state,)
        )
        return [_inbound_row(self.keys, row) for row in rows]

    async def recent_quarantined(self, limit: int) -> list[InboundRow]:
        rows = await self._rows(
            _SELECT_INBOUND + "WHERE state = 'quarantined' "
            "ORDER BY processed_at DESC, received_at DESC LIMIT ?",
            (limit,),
        )
        return [_inbound_row(self.keys, row) for row in rows]

    @property
    def path(self) -> Path:
        """The database file: the parser process reads raw messages from it itself."""
        return self._writer.path

    async def read_raw(self, inbound_id: str, *, limit: int | None = None) -> bytes | None:
        def read() -> bytes | None:
            reader = RawReader(self.path, self.keys)
            try:
                return reader.read(inbound_id) if limit is None else reader.head(inbound_id, limit)
            finally:
                reader.close()

        return await _reading(read)

    async def copy_raw(self, inbound_id: str, write: Callable[[bytes], object]) -> bool:
        def copy() -> bool:
            reader = RawReader(self.path, self.keys)
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
        rows = await self._rows(
            _TICKETS + "WHERE ?1 IS NULL OR t.status = ?1 ORDER BY t.id", (status,)
        )
        people = _Opener(self.keys)
        return [_ticket(people, row) for row in rows]

    async def get_ticket(self, ticket_id: int) -> Ticket | None:
        rows = await self._rows(_TICKETS + "WHERE t.id = ?", (ticket_id,))
        if not rows:
            return None
        people = _Opener(self.keys)
        owner = people.key(rows[0]["key_id"])
        attachments: dict[int, list[StoredAttachment]] = {}
        for a in await self._rows(
            "SELECT a.*, b.name AS blob FROM attachments a "
            "JOIN messages m ON m.id = a.message_id JOIN blobs b ON b.id = a.blob_id "
            "WHERE m.ticket_id = ? ORDER BY a.message_id, a.position",
            (ticket_id,),
        ):
            meta = json.loads(owner.open(bytes(a["meta"]), ATTACHMENT)) if owner else {}
            attachments.setdefault(a["message_id"], []).append(
                StoredAttachment(
                    filename=meta.get("filename"),
                    content_type=a["content_type"],
                    size=a["size"],
                    sha256=meta.get("sha256", ""),
                    inline=bool(a["inline"]),
                    blob=a["blob"],
                    id=a["id"],
                )
            )
        messages = tuple(
            _message(people, owner, m, tuple(attachments.get(m["id"], ())))
            for m in await self._rows(
                "SELECT * FROM messages WHERE ticket_id = ? ORDER BY received_at, id", (ticket_id,)
            )
        )
        return _ticket(people, rows[0], messages)

    async def attachment_content(self, attachment_id: int, root: Path) -> bytes | None:
        """The content of a stored attachment, opened from its sealed file under `root`."""
        rows = await self._rows(
            "SELECT b.name, b.key, p.key_id FROM attachments a JOIN blobs b ON b.id = a.blob_id "
            "JOIN people p ON p.id = b.owner_id WHERE a.id = ?",
            (attachment_id,),
        )
        if not rows:
            return None
        owner = self.keys.key(rows[0]["key_id"])
        if owner is None:
            return None
        name = rows[0]["name"]
        key = DataKey(owner.open(bytes(rows[0]["key"]), f"{BLOB_KEY}:{name}"))
        return await asyncio.to_thread(read_blob, root, name, key)

    async def set_ticket_status(self, ticket_id: int, status: TicketStatus) -> bool:
        changed = await self._writer.transaction(
            lambda db: _set_status(db, ticket_id, status, _now())
        )
        return changed == 1

    async def list_requesters(self) -> list[Requester]:
        rows = await self._rows(
            "SELECT * FROM people p WHERE EXISTS "
            "(SELECT 1 FROM tickets t WHERE t.requester_id = p.id) ORDER BY p.id"
        )
        people = _Opener(self.keys)
        return [_requester(people, row) for row in rows]

    async def get_requester(self, email: str) -> Requester | None:
        rows = await self._rows("SELECT * FROM people WHERE blind = ?", (self.keys.blind(email),))
        return _requester(_Opener(self.keys), rows[0]) if rows else None

    async def verify_requester(self, email: str) -> bool:
        return await self._writer.changes_one(
            "UPDATE people SET verified_at = coalesce(verified_at, ?) WHERE blind = ?",
            (_now(), self.keys.blind(email)),
        )

    async def add_participant(self, ticket_id: int, email: str) -> bool:
        def add(db: sqlite3.Connection) -> bool:
            if db.execute("SELECT 1 FROM tickets WHERE id = ?", (ticket_id,)).fetchone() is None:
                return False
            _SqliteIngestTx(db, self.keys).add_participants(ticket_id, [email])
            return True

        return await self._writer.transaction(add)

    async def redeem_token(self, token_hash: str) -> tuple[TokenOutcome, str | None]:
        return await self._writer.transaction(lambda db: _redeem(db, self.keys, token_hash))

    async def peek_token(self, token_hash: str) -> TokenState:
        return await _peek(self._reader, token_hash)

    # -- privacy requests by mail (sqlite_requests.py) -------------------------------------

    async def peek_privacy(self, token_hash: str) -> tuple[TokenState, PrivacyAction | None]:
        """A privacy request's link state and its action, reading only (GET, HEAD)."""
        try:
            rows = await self._rows(requests.REQUEST + "WHERE r.token_hash = ?", (token_hash,))
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(str(exc)) from exc
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc
        if not rows:
            return "unknown", None
        return requests.state(rows[0], _now()), cast(PrivacyAction, rows[0]["action"])

    async def privacy(self, work: Callable[[PrivacyTx], T]) -> T:
        """Run `work` in one write transaction (`PrivacyTx`) and return its result."""
        return await self._writer.transaction(lambda db: work(PrivacyTx(db, self.keys)))

    async def unfinished_requests(self) -> list[int]:
        """Requests confirmed and not acted on (a crash or a failure came between)."""
        rows = await self._rows(
            "SELECT id FROM privacy_requests WHERE confirmed_at IS NOT NULL AND done_at IS NULL "
            "ORDER BY id"
        )
        return [int(row[0]) for row in rows]

    async def outbox_attachment(self, outbox_id: int, root: Path) -> bytes | None:
        rows = await self._rows(
            "SELECT o.mail, t.requester_id, p.key_id FROM outbox o "
            "JOIN tickets t ON t.id = o.ticket_id JOIN people p ON p.id = t.requester_id "
            "WHERE o.id = ?",
            (outbox_id,),
        )
        owner = self.keys.key(rows[0]["key_id"]) if rows else None
        if owner is None:
            return None
        name = json.loads(owner.open(bytes(rows[0]["mail"]), OUTBOX))["context"].get("export_blob")
        blob = await self._rows(
            "SELECT key FROM blobs WHERE name = ? AND owner_id = ?",
            (name, rows[0]["requester_id"]),
        )
        if not name or not blob:
            return None
        key = DataKey(owner.open(bytes(blob[0]["key"]), f"{BLOB_KEY}:{name}"))
        return await asyncio.to_thread(read_blob, root, name, key)

    async def claim_outbox(self, *, limit: int) -> list[OutboxRow]:
        def claim(db: sqlite3.Connection) -> list[sqlite3.Row]:
            ids = [row[0] for row in db.execute(_CLAIM, (_now(), limit))]
            rows = db.execute(
                _OUTBOX + "WHERE o.id IN (SELECT value FROM json_each(?))",  # noqa: S608
                (json.dumps(ids),),
            ).fetchall()
            live = []
            for row in rows:
                if row["seal_key"] is not None and self.keys.key(row["seal_key"]) is None:
                    # A system row whose key is destroyed (a crash after its mail was done
                    # with, or an old copy of the database): nothing of it can be sent.
                    db.execute("DELETE FROM outbox WHERE id = ?", (row["id"],))
                else:
                    live.append(row)
            return live

        rows = await self._writer.transaction(claim)
        people = _Opener(self.keys)
        return sorted((_outbox_row(people, row) for row in rows), key=lambda r: r.id)

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
            lambda db: _SqliteIngestTx(db, self.keys).finish_outbox(
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
        rows = await self._rows(f"SELECT min(next_attempt_at) FROM outbox WHERE {_DUE}")  # noqa: S608
        return _dt(rows[0][0]) if rows and rows[0][0] is not None else None

    async def list_outbox(self, state: OutboxState | None = None) -> list[OutboxRow]:
        rows = await self._rows(
            _OUTBOX + "WHERE ?1 IS NULL OR o.state = ?1 ORDER BY o.id", (state,)
        )
        people = _Opener(self.keys)
        return [_outbox_row(people, row) for row in rows]

    async def recent_delivery_errors(self, limit: int) -> list[OutboxRow]:
        rows = await self._rows(
            _OUTBOX + "WHERE o.state IN ('queued', 'failed') AND o.last_error IS NOT NULL "
            "ORDER BY o.id DESC LIMIT ?",
            (limit,),
        )
        people = _Opener(self.keys)
        return [_outbox_row(people, row) for row in rows]

    async def queues(self) -> Queues:
        # One query per state, each on its state's partial index (migrations 010 and 013),
        # so that the cost follows the pending rows, not the tables' size.
        now = {"now": _now()}
        inbound, outbox = {}, {}
        [(count, oldest, due)] = await self._rows(
            "SELECT count(*), min(received_at), min(CASE WHEN retry_at IS NULL OR retry_at <= "
            ":now THEN coalesce(retry_at, received_at) END) FROM inbound WHERE state = 'received'",
            now,
        )
        inbound["received"] = (count, oldest, due)
        for state in ("ingested", "quarantined"):
            [(count,)] = await self._rows(
                f"SELECT count(*) FROM inbound WHERE state = '{state}'"  # noqa: S608
            )
            inbound[state] = (count, None, None)
        [(count, oldest, due)] = await self._rows(
            "SELECT count(*), min(created_at), min(CASE WHEN next_attempt_at <= :now THEN "
            "next_attempt_at END) FROM outbox WHERE state = 'queued'",
            now,
        )
        outbox["queued"] = (count, oldest, due)
        [(count, oldest)] = await self._rows(
            "SELECT count(*), min(created_at) FROM outbox WHERE state = 'sending'"
        )
        outbox["sending"] = (count, oldest, None)
        for state in ("sent", "failed"):
            [(count,)] = await self._rows(
                f"SELECT count(*) FROM outbox WHERE state = '{state}'"  # noqa: S608
            )
            outbox[state] = (count, None, None)
        return Queues(inbound=_queue(inbound), outbox=_queue(outbox))

    async def retry_outbox(self, outbox_id: int) -> bool:
        return await self._writer.changes_one(
            "UPDATE outbox SET state = 'queued', next_attempt_at = ? "
            "WHERE id = ? AND state IN ('queued', 'failed')",
            (_now(), outbox_id),
        )

    async def begin_erasure(self, email: str) -> PersonRef | None:
        """Mark the person with this address 'erasing' (a crash from here on is finished at
        the next start); None if there is no such person."""

        def mark(db: sqlite3.Connection) -> PersonRef | None:
            row = db.execute(
                "UPDATE people SET state = 'erasing' WHERE blind = ? RETURNING id, key_id",
                (self.keys.blind(email),),
            ).fetchone()
            return PersonRef(row["id"], row["key_id"]) if row else None

        return await self._writer.transaction(mark)

    async def erasing(self) -> list[PersonRef]:
        """People whose erasure began and did not finish (a crash)."""
        rows = await self._rows("SELECT id, key_id FROM people WHERE state = 'erasing'")
        return [PersonRef(row["id"], row["key_id"]) for row in rows]

    async def delete_person(self, person: PersonRef) -> Deleted:
        """Delete every row of the person (their key must be destroyed already), then
        truncate the WAL so that no copy of the deleted pages stays in it, then the person.

        While a reader holds a snapshot the old pages stay: the person is left marked, and
        the result says `overwritten=False` (erasing again finishes it)."""
        deleted = await self._writer.transaction(
            lambda db: delete_person(db, self.keys, person.id, person.key_id, forget=False)
        )
        if not await self._writer.checkpoint():
            return dataclasses.replace(deleted, overwritten=False)
        # What arrived meanwhile goes too (a concurrent ingest quarantines their new mail).
        late = await self._writer.transaction(
            lambda db: delete_person(db, self.keys, person.id, person.key_id)
        )
        await self._writer.checkpoint()
        return deleted + late

    async def rewrap_message_keys(self, *, after: str = "", limit: int = 256) -> tuple[int, str]:
        keys = self.keys

        def work(db: sqlite3.Connection) -> tuple[int, str]:
            # By queue id, so that a whole pass reads each row once however many batches.
            rows = db.execute(
                "SELECT id, raw_key FROM inbound WHERE id > ? AND owner_key IS NULL "
                "ORDER BY id LIMIT ?",
                (after, limit),
            ).fetchall()
            moved = 0
            for row in rows:
                wrapped = bytes(row["raw_key"])
                if not keys.wraps_current(wrapped):  # a re-run after a crash skips what is done
                    db.execute(
                        "UPDATE inbound SET raw_key = ? WHERE id = ?",
                        (keys.rewrap_message_key(wrapped), row["id"]),
                    )
                    moved += 1
            return moved, (rows[-1]["id"] if len(rows) == limit else "")

        return await self._writer.transaction(work)

    async def message_keys_left(self) -> int:
        current = self.keys.current.encode()
        rows = await self._rows(
            "SELECT count(*) FROM inbound WHERE owner_key IS NULL AND substr(raw_key, 1, ?) != ?",
            (len(current), current),
        )
        return int(rows[0][0])

    async def blob_names(self) -> set[str]:
        """The names of the attachment files that rows refer to (the sweep keeps only those)."""
        return {row[0] for row in await self._rows("SELECT name FROM blobs")}

    # -- rights, audit, statistics (sqlite_rights.py) --------------------------------------

    async def person_record(self, email: str, audit_subject: str) -> rights.PersonRecord | None:
        """Everything stored of the person with this address, read at one moment."""
        return await _reading(
            lambda: rights.snapshot(
                self.path, lambda db: rights.person_record(db, self.keys, email, audit_subject)
            )
        )

    async def set_restriction(
        self, email: str, change: rights.Change, audit: AuditRecord
    ) -> rights.Restriction | None:
        return await self._writer.transaction(
            lambda db: rights.set_restriction(db, self.keys, email, change, audit)
        )

    async def correct_person(
        self,
        email: str,
        *,
        name: str | None,
        new_email: str | None,
        audit: Sequence[AuditRecord],
        then: Callable[[IngestTx, rights.Correction], T],
    ) -> tuple[rights.Correction, T] | None:
        """Correct the person's name or address and run `then` (the mail that follows) in the
        same transaction; None if there is no such person."""

        def work(db: sqlite3.Connection) -> tuple[rights.Correction, T] | None:
            corrected = rights.correct_person(
                db, self.keys, email, name=name, new_email=new_email, audit=audit
            )
            if corrected is None:
                return None
            return corrected, then(_SqliteIngestTx(db, self.keys), corrected)

        return await self._writer.transaction(work)

    async def ticket_counts(self, email: str) -> dict[str, int] | None:
        return await _reading(
            lambda: rights.snapshot(
                self.path, lambda db: rights.ticket_counts(db, self.keys, email)
            )
        )

    async def add_audit(self, record: AuditRecord) -> int:
        return await self._writer.transaction(lambda db: rights.insert_audit(db, record))

    async def audit_records(self, since: datetime | None = None) -> list[AuditRecord]:
        return await _reading(
            lambda: rights.snapshot(self.path, lambda db: rights.audit_records(db, since))
        )

    async def erased_files(self) -> list[str]:
        """Attachment files of erased people not yet unlinked (a crash cut the erasure)."""
        return [row[0] for row in await self._rows("SELECT name FROM erased_files")]

    async def forget_erased_files(self, names: Sequence[str]) -> None:
        await self._writer.transaction(lambda db: rights.forget_erased_files(db, names))

    async def ticket_facts(self, since: datetime | None = None) -> list[rights.TicketFacts]:
        start = since.timestamp() if since else 0.0
        return await _reading(
            lambda: rights.snapshot(self.path, lambda db: rights.ticket_facts(db, self.keys, start))
        )

    # -- retention (issue 10): the rules in privacy/retention.py, the SQL in sqlite_retention.py

    async def count_due(self, cutoffs: Cutoffs) -> dict[str, int]:
        """How many rows of each simple category are due (a dry run), on a read-only
        connection of its own: nothing is written, nothing waits for the writer."""

        def count() -> dict[str, int]:
            db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
            try:
                return count_due(db, cutoffs)
            finally:
                db.close()

        return await _reading(count)

    async def expire(self, cutoffs: Cutoffs, *, stopping: Callable[[], bool]) -> dict[str, int]:
        """Remove every due row of the simple categories, a short transaction per batch."""
        total = dict.fromkeys(RETENTION_CATEGORIES, 0)
        while not stopping():
            batch = await self._writer.transaction(lambda db: remove_batch(db, cutoffs))
            for category, count in batch.items():
                total[category] += count
            if not any(batch.values()):
                break
        return total

    async def closed_tickets(
        self,
        *,
        before: float | None = None,
        since: float | None = None,
        requester: int | None = None,
    ) -> list[tuple[int, float]]:
        """(id, closed_at) of the closed tickets closed before `before` and at or after
        `since` (of `requester` only, if given), oldest first."""
        rows = await self._rows(
            CLOSED_TICKETS, {"before": before, "since": since, "requester": requester}
        )
        return [(int(row["id"]), float(row["closed_at"])) for row in rows]

    async def delete_tickets(self, ticket_ids: Sequence[int]) -> Deleted:
        """Delete these tickets and all that is theirs (erasure's code); the caller removes
        the files named and truncates the WAL (`checkpoint`)."""
        return await self._writer.transaction(lambda db: delete_tickets(db, ticket_ids))

    async def unverified_people(self, before: float) -> list[tuple[PersonRef, str]]:
        """Active people never verified, created before `before`, with no open ticket (theirs
        or one they take part in) and no mail on its way to them; with their addresses."""
        rows = await self._rows(UNVERIFIED, {"before": before})
        people = _Opener(self.keys)
        return [(PersonRef(row["id"], row["key_id"]), people.address(row).email) for row in rows]

    async def begin_unverified_erasure(self, person: PersonRef, before: float) -> bool:
        """Mark the person 'erasing' if they are still due (see `unverified_people`)."""
        key_id = await self._writer.transaction(lambda db: mark_unverified(db, person.id, before))
        return key_id == person.key_id

    async def checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it: no deleted page stays in it."""
        await self._writer.checkpoint()


async def _reading(read: Callable[[], T]) -> T:
    """Run a `RawReader` call in a thread, with the store's error mapping."""
    try:
        return await asyncio.to_thread(read)
    except sqlite3.OperationalError as exc:
        raise StoreUnavailable(str(exc)) from exc
    except sqlite3.Error as exc:
        raise StoreError(str(exc)) from exc


def _requester(people: _Opener, row: sqlite3.Row | aiosqlite.Row) -> Requester:
    address = people.address(row)
    return Requester(
        email=address.email,
        name=address.name,
        verified=row["verified_at"] is not None,
        created_at=_dt(row["created_at"]),
        verified_at=_dt(row["verified_at"]) if row["verified_at"] is not None else None,
        undeliverable=row["undeliverable"],
        state=row["state"],
        objected=row["objected_at"] is not None,
    )


def _outbox_row(people: _Opener, row: sqlite3.Row | aiosqlite.Row) -> OutboxRow:
    key = people.key(row["key_id"])
    mail: dict[str, Any] = (
        json.loads(key.open(bytes(row["mail"]), OUTBOX))
        if key is not None
        else {"to": [ERASED, None], "cc": [], "context": {}}
    )
    item = OutboxItem(
        kind=row["kind"],
        ticket_id=row["ticket_id"],
        to=Address(mail["to"][0], mail["to"][1]),
        message_id=row["message_id"],
        automatic=bool(row["automatic"]),
        context=mail["context"],
        cc=tuple(mail["cc"]),
        in_reply_to=row["in_reply_to"],
        references=tuple(json.loads(row["refs"])),
    )

    def opened(value: object) -> str | None:
        return key.open_text(_bytes(value), OUTBOX_ERROR) if key is not None else None

    return OutboxRow(
        id=row["id"],
        item=item,
        state=row["state"],
        attempts=row["attempts"],
        last_error=opened(row["last_error"]),
        created_at=_dt(row["created_at"]),
        next_attempt_at=_dt(row["next_attempt_at"]),
        sent_at=_dt(row["sent_at"]) if row["sent_at"] is not None else None,
        reply=opened(row["reply"]),
    )


def _redeem(
    db: sqlite3.Connection, keys: Keyring, token_hash: str
) -> tuple[TokenOutcome, str | None]:
    row = db.execute(
        "SELECT v.id, v.person_id, v.used_at, v.expires_at, v.revoked_at, "
        "p.key_id, p.email, p.name FROM verification_tokens v "
        "JOIN people p ON p.id = v.person_id WHERE v.token_hash = ?",
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
        "UPDATE people SET verified_at = coalesce(verified_at, ?) WHERE id = ?",
        (now, row["person_id"]),
    )
    return "verified", _Opener(keys).address(row).email


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


def _ticket(
    people: _Opener, row: sqlite3.Row | aiosqlite.Row, messages: tuple[Message, ...] = ()
) -> Ticket:
    key = people.key(row["key_id"])
    return Ticket(
        id=row["id"],
        subject=(key.open_text(bytes(row["subject"]), SUBJECT) or "") if key else ERASED,
        status=row["status"],
        requester=people.address(row),
        created_at=_dt(row["created_at"]),
        updated_at=_dt(row["updated_at"]),
        message_count=row["message_count"],
        messages=messages,
        flags=tuple(json.loads(row["flags"])),
    )


def _message(
    people: _Opener,
    owner: DataKey | None,
    row: sqlite3.Row | aiosqlite.Row,
    attachments: tuple[StoredAttachment, ...],
) -> Message:
    sender_key = people.key(row["sender_key"])
    email, name = (
        json.loads(sender_key.open(bytes(row["sender"]), SENDER)) if sender_key else (ERASED, None)
    )

    def opened(column: str, label: str) -> str | None:
        return owner.open_text(_bytes(row[column]), label) if owner else ERASED

    auth = opened("auth", AUTH) if row["auth"] is not None else None
    return Message(
        id=row["id"],
        ticket_id=row["ticket_id"],
        sender=Address(email, name),
        subject=opened("subject", SUBJECT) or "",
        body_text=opened("body_text", BODY) or "",
        body_html=opened("body_html", HTML) if row["body_html"] is not None else None,
        message_id=row["message_id"],
        received_at=_dt(row["received_at"]),
        thread_reason=row["thread_reason"],
        author=row["author"],
        attachments=attachments,
        auth=json.loads(auth) if auth and owner else None,
        flags=tuple(json.loads(row["flags"])),
    )


_TICKETS = (
    "SELECT t.*, p.key_id, p.email, p.name, "
    "(SELECT count(*) FROM messages m WHERE m.ticket_id = t.id) AS message_count "
    "FROM tickets t JOIN people p ON p.id = t.requester_id "
)
# A row is sealed under its ticket's requester's key, or (a system row) under its own.
_OUTBOX = (
    "SELECT o.*, coalesce(o.seal_key, p.key_id) AS key_id FROM outbox o "
    "LEFT JOIN tickets t ON t.id = o.ticket_id LEFT JOIN people p ON p.id = t.requester_id "
)
# Due, and not held: a row held for a person waits until that person's row is gone.
_DUE = (
    "state = 'queued' AND (held_for IS NULL OR NOT EXISTS "
    "(SELECT 1 FROM people WHERE people.id = outbox.held_for))"
)
_CLAIM = (
    "UPDATE outbox SET state = 'sending', attempts = attempts + 1 WHERE id IN ("  # noqa: S608
    f" SELECT id FROM outbox WHERE {_DUE} AND next_attempt_at <= ?"
    " ORDER BY next_attempt_at, id LIMIT ?) RETURNING id"
)


@asynccontextmanager
async def open_store(
    path: Path, keys: Keyring, *, attachments: Path | None = None
) -> AsyncIterator[SqliteStore]:
    """Open the store at `path` with its keys, migrating it, and close it on exit."""
    store = await SqliteStore.open(path, keys, attachments=attachments)
    try:
        yield store
    finally:
        await store.close()
