"""The requester's rights in the SQLite store: what is read for an export, a restriction or a
correction (each written with its audit record in one transaction), the audit log, and the
rows statistics are computed from.

Reads that must see one moment (an export, the statistics) run in a read transaction of a
connection of their own (`snapshot`), beside the writer, as WAL allows.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from mailgate.errors import StoreError
from mailgate.model import AuditRecord
from mailgate.privacy.keyring import Keyring
from mailgate.privacy.sealing import DataKey
from mailgate.store.labels import (
    ATTACHMENT,
    AUTH,
    BLOB_KEY,
    BODY,
    EMAIL,
    HTML,
    NAME,
    OUTBOX,
    SENDER,
    SUBJECT,
)

T = TypeVar("T")
Change = Literal["restrict", "unrestrict", "object"]


class AddressTaken(StoreError):
    """A correction named an address that another person has."""


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts is not None else None


def snapshot(path: Path, work: Callable[[sqlite3.Connection], T]) -> T:
    """Run `work` in one read transaction on a connection of its own (call it in a thread)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout = 10000")
        db.execute("BEGIN")
        try:
            return work(db)
        finally:
            db.execute("ROLLBACK")
    finally:
        db.close()


def _person(db: sqlite3.Connection, keys: Keyring, email: str) -> sqlite3.Row | None:
    """The person with this address, unless their erasure has begun."""
    row: sqlite3.Row | None = db.execute(
        "SELECT * FROM people WHERE blind = ? AND state != 'erasing'", (keys.blind(email),)
    ).fetchone()
    return row


def insert_audit(db: sqlite3.Connection, record: AuditRecord) -> int:
    row = db.execute(
        "INSERT INTO audit (at, action, via, subject, counts, reason) VALUES (?, ?, ?, ?, ?, ?) "
        "RETURNING id",
        (
            record.at.timestamp(),
            record.action,
            record.via,
            record.subject,
            json.dumps(dict(record.counts), sort_keys=True),
            record.reason,
        ),
    ).fetchone()
    return int(row[0])


def audit_records(db: sqlite3.Connection, since: datetime | None) -> list[AuditRecord]:
    rows = db.execute(
        "SELECT * FROM audit WHERE at >= ? ORDER BY at, id",
        (since.timestamp() if since else 0.0,),
    )
    return [
        AuditRecord(
            at=datetime.fromtimestamp(row["at"], UTC),
            action=row["action"],
            via=row["via"],
            subject=row["subject"],
            counts=json.loads(row["counts"]),
            reason=row["reason"],
            id=row["id"],
        )
        for row in rows
    ]


# -- restriction, objection ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Restriction:
    """A person's processing state before and after a change (no personal data)."""

    before: str
    objected_before: bool
    after: str
    objected_after: bool

    @property
    def changed(self) -> bool:
        return (self.before, self.objected_before) != (self.after, self.objected_after)


_CHANGES: dict[Change, str] = {
    "restrict": "UPDATE people SET state = 'restricted' WHERE id = ?",
    "object": (
        "UPDATE people SET state = 'restricted', objected_at = coalesce(objected_at, ?2) "
        "WHERE id = ?1"
    ),
    # Lifting the restriction withdraws the objection too: processing goes on as before.
    "unrestrict": "UPDATE people SET state = 'active', objected_at = NULL WHERE id = ?",
}


def set_restriction(
    db: sqlite3.Connection, keys: Keyring, email: str, change: Change, audit: AuditRecord
) -> Restriction | None:
    """Restrict, lift the restriction or record an objection, with its audit record."""
    row = _person(db, keys, email)
    if row is None:
        return None
    params: Sequence[object] = (row["id"], time.time()) if change == "object" else (row["id"],)
    db.execute(_CHANGES[change], params)
    after = db.execute(
        "SELECT state, objected_at FROM people WHERE id = ?", (row["id"],)
    ).fetchone()
    result = Restriction(
        before=row["state"],
        objected_before=row["objected_at"] is not None,
        after=after["state"],
        objected_after=after["objected_at"] is not None,
    )
    insert_audit(db, _with_counts(audit, {"people": int(result.changed)}))
    return result


def _with_counts(record: AuditRecord, counts: Mapping[str, int]) -> AuditRecord:
    return AuditRecord(
        at=record.at,
        action=record.action,
        via=record.via,
        subject=record.subject,
        counts=dict(counts),
        reason=record.reason,
    )


# -- correction ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Correction:
    """What a correction changed; `ticket_id` is the person's latest ticket (for the mail that
    verifies a new address), None if they have none."""

    name: bool
    email: bool
    tokens_revoked: int
    ticket_id: int | None


def correct_person(
    db: sqlite3.Connection,
    keys: Keyring,
    email: str,
    *,
    name: str | None,
    new_email: str | None,
    audit: Sequence[AuditRecord],
) -> Correction | None:
    """Change the person's name and/or address (its blind index too); a new address is
    unverified, its old tokens revoked and its undeliverable mark cleared.

    Raises:
        AddressTaken: another person has `new_email`.
    """
    row = _person(db, keys, email)
    if row is None:
        return None
    key = keys.key(row["key_id"])
    if key is None:
        raise StoreError("that person's key is destroyed")
    renamed = moved = False
    revoked = 0
    if name is not None:
        db.execute(
            "UPDATE people SET name = ? WHERE id = ?", (key.seal_text(name, NAME), row["id"])
        )
        renamed = True
    if new_email is not None:
        blind = keys.blind(new_email)
        if blind != bytes(row["blind"]):
            other = db.execute("SELECT 1 FROM people WHERE blind = ?", (blind,)).fetchone()
            if other is not None:
                raise AddressTaken(f"another person has {new_email}")
            moved = True
            revoked = db.execute(
                "UPDATE verification_tokens SET revoked_at = ? WHERE person_id = ? "
                "AND used_at IS NULL AND revoked_at IS NULL",
                (time.time(), row["id"]),
            ).rowcount
        # A new spelling of the same address (case) keeps its verification.
        db.execute(
            "UPDATE people SET blind = ?, email = ?, "
            "verified_at = CASE WHEN ?3 THEN NULL ELSE verified_at END, "
            "undeliverable = CASE WHEN ?3 THEN NULL ELSE undeliverable END, "
            "undeliverable_since = CASE WHEN ?3 THEN NULL ELSE undeliverable_since END "
            "WHERE id = ?4",
            (blind, key.seal_text(new_email, EMAIL), moved, row["id"]),
        )
    latest = db.execute(
        "SELECT max(id) FROM tickets WHERE requester_id = ?", (row["id"],)
    ).fetchone()[0]
    counts = {"name": int(renamed), "email": int(moved), "tokens_revoked": revoked}
    for record in audit:
        insert_audit(db, _with_counts(record, counts))
    return Correction(renamed, moved, revoked, int(latest) if latest is not None else None)


def ticket_counts(db: sqlite3.Connection, keys: Keyring, email: str) -> dict[str, int] | None:
    """The person's tickets by status; None if there is no such person."""
    row = _person(db, keys, email)
    if row is None:
        return None
    counts = {"open": 0, "closed": 0}
    for status, n in db.execute(
        "SELECT status, count(*) FROM tickets WHERE requester_id = ? GROUP BY status",
        (row["id"],),
    ):
        counts[status] = n
    return counts


# -- erased files ----------------------------------------------------------------------------


def forget_erased_files(db: sqlite3.Connection, names: Sequence[str]) -> None:
    db.execute(
        "DELETE FROM erased_files WHERE name IN (SELECT value FROM json_each(?))",
        (json.dumps(list(names)),),
    )


# -- export ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportFile:
    """An attachment's sealed file and the key that opens it."""

    attachment_id: int
    blob: str
    key: DataKey = field(repr=False)


@dataclass(frozen=True, slots=True)
class PersonRecord:
    """What the store holds of one person, as the export document's parts (times ISO 8601),
    and the attachment files to copy beside it."""

    requester: dict[str, Any]
    verification: dict[str, Any]
    tickets: list[dict[str, Any]]
    contributions: list[dict[str, Any]]
    outgoing: list[dict[str, Any]]
    requests: list[dict[str, Any]]
    participant_of: list[int]
    files: list[ExportFile]


class _Keys:
    """Data keys by id, each looked up once."""

    def __init__(self, keys: Keyring) -> None:
        self._keys = keys
        self._seen: dict[str, DataKey | None] = {}

    def __call__(self, key_id: str | None) -> DataKey | None:
        if not key_id:
            return None
        if key_id not in self._seen:
            self._seen[key_id] = self._keys.key(key_id)
        return self._seen[key_id]


def person_record(
    db: sqlite3.Connection, keys: Keyring, email: str, audit_subject: str
) -> PersonRecord | None:
    """Everything stored of the person with this address: their record, their tickets with
    every message (another person's or an agent's identity withheld), their own messages on
    other tickets, the mail sent about their tickets (no tokens), their verification tokens'
    times and the audit log's records of their requests (`audit_subject` finds them)."""
    person = _person(db, keys, email)
    if person is None:
        return None
    key_of = _Keys(keys)
    key = key_of(person["key_id"])
    if key is None:
        return None
    pid = int(person["id"])
    requester = {
        "email": key.open_text(bytes(person["email"]), EMAIL),
        "name": key.open_text(_opt_bytes(person["name"]), NAME),
        "created_at": _iso(person["created_at"]),
        "state": person["state"],
        "restricted": person["state"] == "restricted",
        "objected": person["objected_at"] is not None,
        "objected_at": _iso(person["objected_at"]),
        "undeliverable": person["undeliverable"],
        "undeliverable_since": _iso(person["undeliverable_since"]),
    }
    tokens = [
        {
            "created_at": _iso(t["created_at"]),
            "expires_at": _iso(t["expires_at"]),
            "used_at": _iso(t["used_at"]),
            "revoked_at": _iso(t["revoked_at"]),
        }
        for t in db.execute(
            "SELECT created_at, expires_at, used_at, revoked_at FROM verification_tokens "
            "WHERE person_id = ? ORDER BY created_at, id",
            (pid,),
        )
    ]
    verification = {
        "verified": person["verified_at"] is not None,
        "verified_at": _iso(person["verified_at"]),
        "tokens": tokens,
    }
    files: list[ExportFile] = []
    attachments = _attachments(db, key_of, pid, files)
    tickets: dict[int, dict[str, Any]] = {}
    for t in db.execute(
        "SELECT * FROM tickets WHERE requester_id = ? ORDER BY id", (pid,)
    ).fetchall():
        tickets[t["id"]] = {
            "id": t["id"],
            "subject": key.open_text(bytes(t["subject"]), SUBJECT),
            "status": t["status"],
            "created_at": _iso(t["created_at"]),
            "updated_at": _iso(t["updated_at"]),
            "closed_at": _iso(t["closed_at"]),
            "reopened": t["reopened"],
            "flags": json.loads(t["flags"]),
            "messages": [],
        }
    contributions: list[dict[str, Any]] = []
    for m in db.execute(
        "SELECT m.*, p.key_id AS owner_key FROM messages m "
        "JOIN tickets t ON t.id = m.ticket_id JOIN people p ON p.id = t.requester_id "
        "WHERE t.requester_id = ?1 OR m.sender_id = ?1 ORDER BY m.received_at, m.id",
        (pid,),
    ):
        message = _message(m, key_of, pid, attachments.get(m["id"], []))
        if m["ticket_id"] in tickets:
            tickets[m["ticket_id"]]["messages"].append(message)
        else:
            contributions.append(message)
    outgoing = [
        _outgoing(o, key_of)
        for o in db.execute(
            "SELECT o.*, p.key_id AS owner_key FROM outbox o "
            "JOIN tickets t ON t.id = o.ticket_id JOIN people p ON p.id = t.requester_id "
            "WHERE t.requester_id = ?1 OR o.recipient_id = ?1 ORDER BY o.id",
            (pid,),
        )
    ]
    requests = [
        {"at": _iso(a["at"]), "action": a["action"], "via": a["via"], "reason": a["reason"]}
        for a in db.execute(
            "SELECT at, action, via, reason FROM audit WHERE subject = ? ORDER BY at, id",
            (audit_subject,),
        )
    ]
    participant_of = [
        row[0]
        for row in db.execute(
            "SELECT ticket_id FROM participants WHERE person_id = ? ORDER BY ticket_id", (pid,)
        )
    ]
    return PersonRecord(
        requester=requester,
        verification=verification,
        tickets=list(tickets.values()),
        contributions=contributions,
        outgoing=outgoing,
        requests=requests,
        participant_of=participant_of,
        files=files,
    )


def _opt_bytes(value: object) -> bytes | None:
    return None if value is None else bytes(cast(bytes, value))


def _attachments(
    db: sqlite3.Connection, key_of: _Keys, pid: int, files: list[ExportFile]
) -> dict[int, list[dict[str, Any]]]:
    """The attachments of the messages the export holds, by message; their files to `files`."""
    found: dict[int, list[dict[str, Any]]] = {}
    for a in db.execute(
        "SELECT a.*, b.name AS blob, b.key AS blob_key, bp.key_id AS blob_owner, "
        "tp.key_id AS owner_key FROM attachments a "
        "JOIN messages m ON m.id = a.message_id JOIN tickets t ON t.id = m.ticket_id "
        "JOIN people tp ON tp.id = t.requester_id "
        "JOIN blobs b ON b.id = a.blob_id JOIN people bp ON bp.id = b.owner_id "
        "WHERE t.requester_id = ?1 OR m.sender_id = ?1 ORDER BY a.message_id, a.position",
        (pid,),
    ):
        owner = key_of(a["owner_key"])
        meta = json.loads(owner.open(bytes(a["meta"]), ATTACHMENT)) if owner else {}
        blob_owner = key_of(a["blob_owner"])
        if blob_owner is not None:
            name = a["blob"]
            blob_key = DataKey(blob_owner.open(bytes(a["blob_key"]), f"{BLOB_KEY}:{name}"))
            files.append(ExportFile(a["id"], name, blob_key))
        found.setdefault(a["message_id"], []).append(
            {
                "id": a["id"],
                "position": a["position"],
                "filename": meta.get("filename"),
                "content_type": a["content_type"],
                "size": a["size"],
                "sha256": meta.get("sha256"),
                "inline": bool(a["inline"]),
            }
        )
    return found


def _message(
    m: sqlite3.Row, key_of: _Keys, pid: int, attachments: list[dict[str, Any]]
) -> dict[str, Any]:
    owner = key_of(m["owner_key"])

    def opened(column: str, label: str) -> str | None:
        value = m[column]
        return owner.open_text(bytes(value), label) if owner and value is not None else None

    own = m["sender_id"] == pid
    sender = None
    if own:  # another person's address or an agent's is theirs, not the requester's
        sender_key = key_of(m["sender_key"])
        if sender_key is not None:
            address, display = json.loads(sender_key.open(bytes(m["sender"]), SENDER))
            sender = {"email": address, "name": display}
    auth = opened("auth", AUTH)
    return {
        "id": m["id"],
        "ticket_id": m["ticket_id"],
        "author": m["author"],
        "from_requester": own,
        "sender": sender,
        "received_at": _iso(m["received_at"]),
        "message_id": m["message_id"],
        "thread_reason": m["thread_reason"],
        "subject": opened("subject", SUBJECT),
        "body_text": opened("body_text", BODY),
        "body_html": opened("body_html", HTML),
        "flags": json.loads(m["flags"]),
        "trust": json.loads(auth).get("trust") if auth else None,
        "attachments": attachments,
        # The raw message as it arrived, if still kept (retention removes it): only their own,
        # another sender's holds other addresses.
        "inbound_id": m["inbound_id"] if own else None,
    }


def _outgoing(o: sqlite3.Row, key_of: _Keys) -> dict[str, Any]:
    owner = key_of(o["owner_key"])
    mail: dict[str, Any] = (
        json.loads(owner.open(bytes(o["mail"]), OUTBOX)) if owner else {"to": [None], "cc": []}
    )
    return {  # the template's variables are left out: a queued verification's token is one
        "kind": o["kind"],
        "ticket_id": o["ticket_id"],
        "to": mail["to"][0],
        "cc": list(mail["cc"]),
        "state": o["state"],
        "automatic": bool(o["automatic"]),
        "attempts": o["attempts"],
        "created_at": _iso(o["created_at"]),
        "sent_at": _iso(o["sent_at"]),
    }


# -- statistics ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TicketFacts:
    """One ticket as statistics see it: times and the requester's domain, nothing else."""

    created_at: float
    closed_at: float | None
    reopened: int
    first_customer: float | None
    first_response: float | None
    domain: str


def ticket_facts(db: sqlite3.Connection, keys: Keyring, since: float) -> list[TicketFacts]:
    """The tickets opened or closed since `since` whose requester has not restricted
    processing, objected to it, or begun to be erased."""
    facts = []
    key_of = _Keys(keys)
    for row in db.execute(
        "SELECT t.created_at, t.closed_at, t.reopened, p.key_id, p.email, f.first_customer, "
        "(SELECT min(a.received_at) FROM messages a WHERE a.ticket_id = t.id "
        " AND a.author = 'agent' AND a.received_at >= f.first_customer) AS first_response "
        "FROM tickets t JOIN people p ON p.id = t.requester_id "
        "LEFT JOIN (SELECT ticket_id, min(received_at) AS first_customer FROM messages "
        "      WHERE author = 'customer' GROUP BY ticket_id) f ON f.ticket_id = t.id "
        "WHERE p.state = 'active' AND p.objected_at IS NULL "
        "AND (t.created_at >= ?1 OR t.closed_at >= ?1) ORDER BY t.id",
        (since,),
    ):
        key = key_of(row["key_id"])
        email = key.open_text(bytes(row["email"]), EMAIL) if key else None
        facts.append(
            TicketFacts(
                created_at=row["created_at"],
                closed_at=row["closed_at"],
                reopened=row["reopened"],
                first_customer=row["first_customer"],
                first_response=row["first_response"],
                domain=(email or "").rpartition("@")[2].lower(),
            )
        )
    return facts
