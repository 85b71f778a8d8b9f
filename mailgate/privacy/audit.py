"""The audit log: every export, erasure, restriction, objection, correction, archive read,
quarantine purge and purge run leaves a record of when, which command or link, whom (a keyed
hash of the address, never the address) and what was done, in counts.

The subject hash is an HMAC under the index key (`Keyring.keyed_hash`, purpose "audit") of
the address's comparison key, so every spelling of an address names the same subject, the
same address always does (an auditor holding the address finds its records with the key at
hand: `mailgate audit list --subject EMAIL`), and the log alone names no one. An erased
person's records stay: the hash without the address reveals nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from mailgate.addresses import address_key
from mailgate.model import AuditRecord
from mailgate.privacy.keyring import Keyring

if TYPE_CHECKING:
    from mailgate.store.sqlite import SqliteStore

# An erasure's reason is kept only as one of these categories, never as the text given.
REASONS = ("request", "under-16", "other")


def subject_hash(keys: Keyring, email: str) -> str:
    """The audit log's name for the person with this address."""
    return keys.keyed_hash(address_key(email).encode(), "audit")


def reason_category(text: str | None) -> str:
    """The category of an erasure's reason: none given is the person's request."""
    if text is None or not text.strip():
        return "request"
    folded = text.strip().lower().replace("_", "-").replace(" ", "-")
    if folded in ("under-16", "under16", "u16"):
        return "under-16"
    return "request" if folded == "request" else "other"


def entry(
    keys: Keyring,
    action: str,
    via: str,
    subject: str | None,
    counts: Mapping[str, int],
    *,
    reason: str | None = None,
    hashed: str | None = None,
) -> AuditRecord:
    """The record of an action on the person with the address `subject` (None: no person, or
    one known only by `hashed`, their subject hash: an archived record's requester)."""
    return AuditRecord(
        at=datetime.now(UTC),
        action=action,
        via=via,
        subject=subject_hash(keys, subject) if subject is not None else hashed,
        counts={name: int(n) for name, n in counts.items()},
        reason=reason,
    )


async def record(
    store: SqliteStore,
    action: str,
    via: str,
    subject: str | None,
    counts: Mapping[str, int],
    *,
    reason: str | None = None,
    hashed: str | None = None,
) -> None:
    """Write one audit record; `subject` is the person's address (hashed here) or None."""
    record = entry(store.keys, action, via, subject, counts, reason=reason, hashed=hashed)
    await store.add_audit(record)
