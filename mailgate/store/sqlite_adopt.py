"""Bring the rows of a database written before migration 009 (addresses and text in clear)
into the person-keyed, sealed tables, then drop the legacy tables.

Migration 009 renamed the tables of 001-008 `legacy_*`. The first open with the keys seals
their rows into the new tables through the writes ingest itself uses (`_SqliteIngestTx`: the
same people upsert, seals, body digest, blob records and raw-message keys), in one transaction
that also drops the legacy tables. A crash before its commit leaves the legacy rows as they
were (and at worst sealed attachment files that no row names, which the blob sweep removes);
the next open starts again.

What is kept as it was: the ids of tickets (subject tags and mailgate's Message-IDs name them),
messages, attachments, outbox rows and tokens, and the high-water marks of the ticket and
outbox ids (never reused). People get new ids; the address each was first spelled with (as a
requester, then as a participant, a sender, a recipient, an undeliverable mark) is theirs.
A closed ticket was closed at its last update.

Attachment files of the old layout (the content in clear, named by its SHA-256 under
[storage] attachments) are read and sealed into new blob files of the ticket's requester
(`blobs.save_blob`), and deleted only after the commit. A marker table, created by that
commit, says that old files may be left: the open after a crash between the commit and the
last deletion deletes them (a file already gone is no error). A file the legacy rows name that
is missing (deleted by hand) leaves the attachment's metadata and no content, as before.
"""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from mailgate.errors import StoreError
from mailgate.model import Address, Envelope, OutboxItem, ParsedMail, StoredAttachment
from mailgate.privacy.sealing import DataKey
from mailgate.store.blobs import save_blob
from mailgate.store.labels import OUTBOX_ERROR
from mailgate.store.sqlite import _SqliteIngestTx, forwarded_client
from mailgate.store.sqlite_raw import blob_pieces

# Children before parents: dropping a table deletes its rows, and foreign keys are on.
LEGACY = (
    "legacy_attachments",
    "legacy_outbox",
    "legacy_verification_tokens",
    "legacy_participants",
    "legacy_messages",
    "legacy_tickets",
    "legacy_undeliverable",
    "legacy_requesters",
    "legacy_inbound",
)
# Created by the adopting commit, dropped once the old attachment files are gone.
PENDING_FILES = "legacy_files_pending"
# The old layout: root/ab/abcd... (64 hex digits). New blob files have 32 (`blobs.save_blob`).
_OLD_NAME = re.compile(r"[0-9a-f]{64}")


@dataclass
class Adopted:
    """What one adoption brought over, in counts."""

    people: int = 0
    tickets: int = 0
    messages: int = 0
    attachments: int = 0
    missing_files: int = 0
    inbound: int = 0
    tokens: int = 0
    outbox: int = 0
    files_deleted: int = 0

    def __bool__(self) -> bool:
        return bool(self.people or self.inbound or self.files_deleted)


def adopt_legacy(db: sqlite3.Connection, tx: _SqliteIngestTx, attachments: Path | None) -> Adopted:
    """Seal every legacy row into the new tables and drop the legacy tables (one transaction),
    then delete the old attachment files; do nothing on a database that has no legacy tables.

    Raises:
        StoreError: the legacy rows name attachment files and `attachments` is None, or an
            attachment file could not be read or a new one written; nothing is committed, and
            the next open tries again.
    """
    done = Adopted()
    try:
        if _tables(db) & set(LEGACY):
            _adopt_all(db, tx, attachments, done)
        if attachments is not None and PENDING_FILES in _tables(db):
            done.files_deleted = _delete_old_files(attachments)
            db.execute(f"DROP TABLE IF EXISTS {PENDING_FILES}")
            # What a WAL of the old version held in clear goes with its frames.
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except OSError as exc:
        raise StoreError(f"adopting the rows from before migration 009: {exc}") from exc
    return done


def _adopt_all(
    db: sqlite3.Connection, tx: _SqliteIngestTx, attachments: Path | None, done: Adopted
) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        present = _tables(db) & set(LEGACY)  # another process may have adopted meanwhile
        if present:
            _adopt(db, tx, attachments, done)
            for table in LEGACY:
                if table in present:
                    db.execute(f"DROP TABLE {table}")
            db.execute(f"CREATE TABLE IF NOT EXISTS {PENDING_FILES} (at REAL NOT NULL)")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _tables(db: sqlite3.Connection) -> set[str]:
    return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _rows(
    db: sqlite3.Connection, table: str, order: str, columns: str = "*"
) -> Iterator[sqlite3.Row]:
    # Constant names from this module, no values: nothing to bind.
    yield from db.execute(f"SELECT {columns} FROM {table} ORDER BY {order}")  # noqa: S608


def _dt(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def _adopt(db: sqlite3.Connection, tx: _SqliteIngestTx, root: Path | None, done: Adopted) -> None:
    inbound = _adopt_inbound(db, tx, done)
    requesters: dict[int, tuple[int, DataKey]] = {}
    for r in _rows(db, "legacy_requesters", "id"):
        person, key = tx.people.upsert(Address(r["email"], r["name"]), created_at=r["created_at"])
        db.execute(
            "UPDATE people SET verified_at = coalesce(verified_at, ?) WHERE id = ?",
            (r["verified_at"], person),
        )
        requesters[r["id"]] = (person, key)
    for t in _rows(db, "legacy_tickets", "id"):
        person, key = requesters[t["requester_id"]]
        tx.insert_ticket(
            person,
            key,
            t["subject"],
            row_id=t["id"],
            status=t["status"],
            created_at=t["created_at"],
            updated_at=t["updated_at"],
            closed_at=t["updated_at"] if t["status"] == "closed" else None,
            flags=json.loads(t["flags"]),
        )
        done.tickets += 1
    for p in _rows(db, "legacy_participants", "ticket_id, email"):
        tx.add_participants(p["ticket_id"], [p["email"]])
    _adopt_messages(db, tx, root, inbound, done)
    # Each message touched its ticket: the tickets' own last update stands.
    db.execute(
        "UPDATE tickets SET updated_at = "
        "(SELECT l.updated_at FROM legacy_tickets l WHERE l.id = tickets.id)"
    )
    for v in _rows(db, "legacy_verification_tokens", "id"):
        db.execute(
            "INSERT INTO verification_tokens (id, person_id, token_hash, created_at, expires_at, "
            "used_at, message_id, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                v["id"],
                requesters[v["requester_id"]][0],
                v["token_hash"],
                v["created_at"],
                v["expires_at"],
                v["used_at"],
                v["message_id"],
                v["revoked_at"],
            ),
        )
        done.tokens += 1
    for o in _rows(db, "legacy_outbox", "id"):
        _adopt_outbox(db, tx, o)
        done.outbox += 1
    for u in _rows(db, "legacy_undeliverable", "since"):
        tx.set_undeliverable(u["email"], u["status"], at=_dt(u["since"]))
    for table in ("tickets", "outbox"):  # an id once given is never given again
        _keep_sequence(db, table)
    done.people = int(db.execute("SELECT count(*) FROM people").fetchone()[0])


def _adopt_inbound(db: sqlite3.Connection, tx: _SqliteIngestTx, done: Adopted) -> set[str]:
    ids = set()
    # Every column but the raw message, which is read in pieces.
    columns = (
        "rowid AS rowid_, length(raw) AS raw_size, id, received_at, mail_from, rcpt_tos, peer, "
        "helo, smtputf8, forwarded, state, reason, processed_at, attempts, retry_at"
    )
    for row in _rows(db, "legacy_inbound", "received_at, id", columns):
        envelope = Envelope(
            mail_from=row["mail_from"],
            rcpt_tos=tuple(json.loads(row["rcpt_tos"])),
            peer=row["peer"],
            helo=row["helo"],
            smtputf8=bool(row["smtputf8"]),
            forwarded=forwarded_client(json.loads(row["forwarded"]) if row["forwarded"] else None),
        )
        tx.insert_inbound(
            row["id"],
            envelope,
            received_at=row["received_at"],
            size=row["raw_size"],
            pieces=blob_pieces(db, "legacy_inbound", "raw", row["rowid_"]),
        )
        db.execute(
            "UPDATE inbound SET state = ?, reason = ?, processed_at = ?, attempts = ?, "
            "retry_at = ? WHERE id = ?",
            (
                row["state"],
                row["reason"],
                row["processed_at"],
                row["attempts"],
                row["retry_at"],
                row["id"],
            ),
        )
        ids.add(row["id"])
        done.inbound += 1
    return ids


def _adopt_messages(
    db: sqlite3.Connection,
    tx: _SqliteIngestTx,
    root: Path | None,
    inbound: set[str],
    done: Adopted,
) -> None:
    # The legacy index on attachments (message_id) is gone (migration 009): read them at once.
    parts: dict[int, list[sqlite3.Row]] = {}
    for a in _rows(db, "legacy_attachments", "message_id, position"):
        parts.setdefault(a["message_id"], []).append(a)
    if parts and root is None:
        raise StoreError("attachments from before migration 009: [storage] attachments needed")
    blobs: dict[tuple[int, str], tuple[str, bytes]] = {}  # (owner, sha256): one file each
    for m in _rows(db, "legacy_messages", "id"):
        mail = ParsedMail(
            sender=Address(m["from_email"], m["from_name"]),
            to=(),
            cc=(),
            subject=m["subject"],
            message_id=m["message_id"],
            in_reply_to=(),
            references=(),
            body_text=m["body_text"],
            body_html=m["body_html"],
            body_digest=m["body_sha256"],
        )
        owner_id, _owner = tx.people.of_ticket(m["ticket_id"])
        stored = [_attachment(root, owner_id, a, blobs, done) for a in parts.get(m["id"], ())]
        tx.add_message(
            m["ticket_id"],
            mail,
            row_id=m["id"],
            inbound_id=m["inbound_id"] if m["inbound_id"] in inbound else None,
            reason=m["thread_reason"],
            attachments=stored,
            at=_dt(m["received_at"]),
            author=m["author"],
            auth=json.loads(m["auth"]) if m["auth"] is not None else None,
            flags=json.loads(m["flags"]),
        )
        done.messages += 1
        done.attachments += len(stored)


def _attachment(
    root: Path | None,
    owner: int,
    row: sqlite3.Row,
    blobs: dict[tuple[int, str], tuple[str, bytes]],
    done: Adopted,
) -> StoredAttachment:
    """The legacy attachment as a blob of `owner`, sealed into a new file the first time this
    owner's content comes (the tx's `_blob` counts the other uses)."""
    assert root is not None
    sha = row["sha256"]
    blob = blobs.get((owner, sha))
    if blob is None:
        try:
            content = _old_path(root, sha).read_bytes()
        except FileNotFoundError:
            # Gone before this version came: the metadata stays, its content reads as absent.
            done.missing_files += 1
            blob = secrets.token_hex(16), DataKey.generate().material
        else:
            name, key, _sha = save_blob(root, content)
            blob = name, key
        blobs[(owner, sha)] = blob
    return StoredAttachment(
        filename=row["filename"],
        content_type=row["content_type"],
        size=row["size"],
        sha256=sha,
        inline=bool(row["inline"]),
        blob=blob[0],
        key=blob[1],
        id=row["id"],
    )


def _adopt_outbox(db: sqlite3.Connection, tx: _SqliteIngestTx, o: sqlite3.Row) -> None:
    item = OutboxItem(
        kind=o["kind"],
        ticket_id=o["ticket_id"],
        to=Address(o["recipient"], o["recipient_name"]),
        message_id=o["message_id"],
        automatic=bool(o["automatic"]),
        context=json.loads(o["context"]),
        cc=tuple(json.loads(o["cc"])),
        in_reply_to=o["in_reply_to"],
        references=tuple(json.loads(o["refs"])),
    )
    outbox_id = tx.enqueue(item, at=_dt(o["created_at"]), row_id=o["id"])
    _owner, key = tx.people.of_ticket(o["ticket_id"])
    db.execute(
        "UPDATE outbox SET state = ?, attempts = ?, last_error = ?, reply = ?, "
        "next_attempt_at = ?, sent_at = ? WHERE id = ?",
        (
            o["state"],
            o["attempts"],
            key.seal_text(o["last_error"], OUTBOX_ERROR),
            key.seal_text(o["reply"], OUTBOX_ERROR),
            o["next_attempt_at"],
            o["sent_at"],
            outbox_id,
        ),
    )


def _keep_sequence(db: sqlite3.Connection, table: str) -> None:
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (f"legacy_{table}",))
    legacy = row.fetchone()
    if legacy is None:
        return
    updated = db.execute(
        "UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = ?", (legacy[0], table)
    ).rowcount
    if not updated:
        db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, legacy[0]))


def _old_path(root: Path, sha256: str) -> Path:
    return root / sha256[:2] / sha256


def _delete_old_files(root: Path) -> int:
    """Delete the files of the old layout under `root`: those the legacy rows named (sealed
    into new blobs by now) and any the old version left behind unreferenced (a message never
    committed), all content in clear. New blob files and temporaries have other names."""
    deleted = 0
    if not root.is_dir():
        return 0
    for folder in root.iterdir():
        if not folder.is_dir() or len(folder.name) != 2:
            continue
        for file in folder.iterdir():
            if _OLD_NAME.fullmatch(file.name) and file.name[:2] == folder.name:
                try:
                    file.unlink()
                    deleted += 1
                except FileNotFoundError:
                    pass  # another process deleting them too, or a re-run after a crash
    return deleted
