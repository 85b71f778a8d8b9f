"""Retention in the SQLite store: what is due, by its time, and its removal in short batches.

`privacy/retention.py` decides the moments (`Cutoffs`: each period counted back from the
purge's `now`); this finds and removes the rows older than them. Each batch is one short
transaction of at most `BATCH` rows, so intake's commits never wait long behind a purge.
Deleted pages are overwritten (`secure_delete`); the caller truncates the WAL at the end.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

BATCH = 500


@dataclass(frozen=True, slots=True)
class Cutoffs:
    """Unix times: a row older than its category's cutoff is due."""

    now: float
    raw_messages: float
    delivery_log: float
    identification: float
    audit: float


# category -> (count of what is due, the removal of one batch of it). Each names :limit and
# the cutoffs as parameters; the times compared are those the indexes of migration 010 hold.
# An inbound row is timed from when ingest finished with it (`processed_at`, always set then).
_RAW_DUE = (
    "FROM inbound WHERE state = 'ingested' AND raw IS NOT NULL AND processed_at < :raw_messages"
)
_QUARANTINED_DUE = "FROM inbound WHERE state = 'quarantined' AND processed_at < :raw_messages"
# An ingested message's envelope (client address, HELO, envelope addresses) is a record of
# service use: it goes with the delivery log. The ticket keeps the message.
_ENVELOPE_DUE = "FROM inbound WHERE state = 'ingested' AND processed_at < :delivery_log"
# A sent row from when it was sent; a failed one from its last attempt.
_OUTBOX_DUE = (
    "FROM outbox WHERE (state = 'sent' AND sent_at < :delivery_log) "
    "OR (state = 'failed' AND next_attempt_at < :delivery_log)"
)
# A token is an identification record from its making to its last use; a live one is kept.
_TOKENS_DUE = (
    "FROM verification_tokens WHERE created_at < :identification "
    "AND max(coalesce(used_at, 0), coalesce(revoked_at, 0)) < :identification "
    "AND (expires_at < :now OR used_at IS NOT NULL OR revoked_at IS NOT NULL)"
)
# A privacy request's link (migration 012) is one too, from its making to its last use; one
# that can still be used, or confirmed and not yet carried out, is kept.
_REQUESTS_DUE = (
    "FROM privacy_requests WHERE created_at < :identification "
    "AND max(coalesce(confirmed_at, 0), coalesce(done_at, 0), coalesce(revoked_at, 0)) "
    "< :identification AND (done_at IS NOT NULL OR revoked_at IS NOT NULL "
    "OR (confirmed_at IS NULL AND expires_at < :now))"
)
_AUDIT_DUE = "FROM audit WHERE at < :audit"


def _batch(statement: str, due: str) -> str:
    """`statement` on the rows of one batch of `due` (constant text; values are parameters)."""
    return f"{statement} (SELECT rowid {due} LIMIT :limit)"


_CATEGORIES: dict[str, tuple[str, str]] = {
    "raw_messages": (_RAW_DUE, _batch("UPDATE inbound SET raw = NULL WHERE rowid IN", _RAW_DUE)),
    "quarantined": (
        _QUARANTINED_DUE,
        _batch("DELETE FROM inbound WHERE rowid IN", _QUARANTINED_DUE),
    ),
    "envelopes": (_ENVELOPE_DUE, _batch("DELETE FROM inbound WHERE rowid IN", _ENVELOPE_DUE)),
    "delivery_log": (_OUTBOX_DUE, _batch("DELETE FROM outbox WHERE rowid IN", _OUTBOX_DUE)),
    "identification": (
        _TOKENS_DUE,
        _batch("DELETE FROM verification_tokens WHERE rowid IN", _TOKENS_DUE),
    ),
    "privacy_requests": (
        _REQUESTS_DUE,
        _batch("DELETE FROM privacy_requests WHERE rowid IN", _REQUESTS_DUE),
    ),
    "audit": (_AUDIT_DUE, _batch("DELETE FROM audit WHERE rowid IN", _AUDIT_DUE)),
}
CATEGORIES = tuple(_CATEGORIES)


def has_table(db: sqlite3.Connection, name: str) -> bool:
    row = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
    return row.fetchone() is not None


def _params(cutoffs: Cutoffs, limit: int = BATCH) -> dict[str, float]:
    return {
        "now": cutoffs.now,
        "raw_messages": cutoffs.raw_messages,
        "delivery_log": cutoffs.delivery_log,
        "identification": cutoffs.identification,
        "audit": cutoffs.audit,
        "limit": limit,
    }


def _present(db: sqlite3.Connection, category: str) -> bool:
    # The audit table comes with its own migration; a database without it has none to purge.
    return category != "audit" or has_table(db, "audit")


def count_due(db: sqlite3.Connection, cutoffs: Cutoffs) -> dict[str, int]:
    """How many rows of each category are due (a dry run); changes nothing."""
    params = _params(cutoffs)
    return {
        category: int(db.execute(f"SELECT count(*) {due}", params).fetchone()[0])
        if _present(db, category)
        else 0
        for category, (due, _remove) in _CATEGORIES.items()
    }


def remove_batch(db: sqlite3.Connection, cutoffs: Cutoffs, limit: int = BATCH) -> dict[str, int]:
    """Remove up to `limit` due rows of each category, inside a transaction; how many went.

    Raw bytes go before envelopes, so a row due for both is counted as both.
    """
    params = _params(cutoffs, limit)
    return {
        category: db.execute(remove, params).rowcount if _present(db, category) else 0
        for category, (_due, remove) in _CATEGORIES.items()
    }


# -- tickets and people ------------------------------------------------------------------------

CLOSED = (
    "SELECT id, closed_at FROM tickets WHERE status = 'closed' "
    "AND (:before IS NULL OR closed_at < :before) AND (:since IS NULL OR closed_at >= :since) "
    "AND (:requester IS NULL OR requester_id = :requester) ORDER BY closed_at, id"
)

# People never verified, created before :before, active (a restricted person's data is kept
# as it is: storage only), with no open ticket of theirs or that they take part in and no
# mail on its way to them. Agents and mailgate's own addresses are left out by the caller,
# who can read the addresses.
_UNVERIFIED = (
    "FROM people p "
    "WHERE p.verified_at IS NULL AND p.created_at < :before AND p.state = 'active' "
    "AND NOT EXISTS (SELECT 1 FROM tickets t WHERE t.requester_id = p.id AND t.status = 'open') "
    "AND NOT EXISTS (SELECT 1 FROM participants x JOIN tickets t ON t.id = x.ticket_id "
    "                WHERE x.person_id = p.id AND t.status = 'open') "
    "AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.recipient_id = p.id "
    "                AND o.state IN ('queued', 'sending'))"
)
UNVERIFIED = f"SELECT p.id, p.key_id, p.email, p.name {_UNVERIFIED} ORDER BY p.id"
_MARK_UNVERIFIED = (
    f"UPDATE people SET state = 'erasing' WHERE id IN (SELECT p.id {_UNVERIFIED} "  # noqa: S608 - constant text
    "AND p.id = :id) RETURNING key_id"
)


def mark_unverified(db: sqlite3.Connection, person_id: int, before: float) -> str | None:
    """Mark the person 'erasing' if they are still an unverified requester due for erasure
    (checked again inside the transaction: they may have verified, or written, meanwhile);
    return their key id, or None."""
    row = db.execute(_MARK_UNVERIFIED, {"before": before, "id": person_id}).fetchone()
    return None if row is None else str(row[0])
