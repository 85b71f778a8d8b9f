"""Privacy requests by mail in the SQLite store (migration 012): opened with the mail that
carries their link, confirmed once by it, then acted on (`privacy/requests.py` decides how).

A request is bound to its person, its action, its ticket and the address its link was mailed
to (the blind index then): a link whose person's address was corrected since, or whose
person is being erased, confirms nothing ('revoked'). The states are those of a
verification token: unknown, used (confirmed), revoked, expired, live.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from mailgate.model import PrivacyAction
from mailgate.privacy.keyring import Keyring
from mailgate.store.base import TokenState
from mailgate.store.labels import EMAIL

REQUEST = (
    "SELECT r.*, p.blind AS person_blind, p.state AS person_state, p.key_id, p.email "
    "FROM privacy_requests r JOIN people p ON p.id = r.person_id "
)


@dataclass(frozen=True, slots=True)
class Claim:
    """A confirmed request, as the engine acts on it: whose, what, on which ticket."""

    id: int
    person_id: int
    key_id: str
    ticket_id: int
    action: PrivacyAction
    email: str


def state(row: Mapping[str, Any] | sqlite3.Row, now: float) -> TokenState:
    """What a request's link is now; the same order as a verification token's."""
    if row["confirmed_at"] is not None:
        return "used"
    if row["revoked_at"] is not None:
        return "revoked"
    if bytes(row["person_blind"]) != bytes(row["blind"]) or row["person_state"] == "erasing":
        return "revoked"  # the address it was mailed to is no longer theirs, or they go
    return "expired" if row["expires_at"] <= now else "live"


def open_request(
    db: sqlite3.Connection,
    *,
    person_id: int,
    blind: bytes,
    ticket_id: int,
    action: PrivacyAction,
    token_hash: str,
    at: float,
    expires_at: float,
    message_id: str | None,
) -> int:
    """Store a new request; the person's older live links for the same action are revoked:
    only the latest mail's link confirms."""
    db.execute(
        "UPDATE privacy_requests SET revoked_at = ? WHERE person_id = ? AND action = ? "
        "AND confirmed_at IS NULL AND revoked_at IS NULL",
        (at, person_id, action),
    )
    row = db.execute(
        "INSERT INTO privacy_requests (person_id, ticket_id, action, blind, token_hash, "
        "message_id, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        (person_id, ticket_id, action, blind, token_hash, message_id, at, expires_at),
    ).fetchone()
    return int(row[0])


def revoke(db: sqlite3.Connection, hashes: str, message_ids: str, at: float) -> int:
    """Revoke the unconfirmed requests with these token hashes or carried by these mails
    (JSON arrays); return how many."""
    cursor = db.execute(
        "UPDATE privacy_requests SET revoked_at = ? WHERE confirmed_at IS NULL "
        "AND revoked_at IS NULL AND (token_hash IN (SELECT value FROM json_each(?)) "
        "OR message_id IN (SELECT value FROM json_each(?)))",
        (at, hashes, message_ids),
    )
    return int(cursor.rowcount)


def _claim(keys: Keyring, row: sqlite3.Row) -> Claim | None:
    key = keys.key(row["key_id"])
    email = key.open_text(bytes(row["email"]), EMAIL) if key is not None else None
    if email is None:
        return None
    return Claim(
        id=row["id"],
        person_id=row["person_id"],
        key_id=row["key_id"],
        ticket_id=row["ticket_id"],
        action=cast(PrivacyAction, row["action"]),
        email=email,
    )


def confirm(
    db: sqlite3.Connection, keys: Keyring, token_hash: str, now: float
) -> Claim | TokenState:
    """Use a live request's link once: mark it confirmed and return what to act on; otherwise
    its state ('unknown', 'used', 'revoked', 'expired'), and nothing changes."""
    row = db.execute(REQUEST + "WHERE r.token_hash = ?", (token_hash,)).fetchone()
    if row is None:
        return "unknown"
    found = state(row, now)
    if found != "live":
        return found
    claim = _claim(keys, row)
    if claim is None:  # their key is gone: an erasure under way in another process
        return "revoked"
    db.execute("UPDATE privacy_requests SET confirmed_at = ? WHERE id = ?", (now, row["id"]))
    return claim


def unfinished(db: sqlite3.Connection, keys: Keyring, request_id: int) -> Claim | None:
    """The request if it is confirmed and not yet acted on (its person still there)."""
    row = db.execute(
        REQUEST + "WHERE r.id = ? AND r.confirmed_at IS NOT NULL AND r.done_at IS NULL "
        "AND p.state != 'erasing'",
        (request_id,),
    ).fetchone()
    return _claim(keys, row) if row is not None else None


def reopen(db: sqlite3.Connection, request_id: int) -> bool:
    """Make a confirmed request's link usable again (carrying it out failed); False if it was
    carried out meanwhile or is gone."""
    cursor = db.execute(
        "UPDATE privacy_requests SET confirmed_at = NULL WHERE id = ? "
        "AND confirmed_at IS NOT NULL AND done_at IS NULL",
        (request_id,),
    )
    return cursor.rowcount == 1


def finish(db: sqlite3.Connection, request_id: int, at: float) -> None:
    db.execute("UPDATE privacy_requests SET done_at = ? WHERE id = ?", (at, request_id))
