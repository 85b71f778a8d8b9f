"""The audit log: when, by which command or link, about whom (a keyed hash), what in counts.

A minimal version for retention's purge runs and archive reads: the rights work owns the
audit table (migration 011) and `mailgate audit list`; until that table exists, `record`
writes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

from mailgate.store.sqlite import SqliteStore


async def record(
    store: SqliteStore, action: str, via: str, subject: str | None, counts: Mapping[str, int]
) -> None:
    """Record that `via` (a command, the scheduler, a link) did `action` about `subject` (a
    keyed hash, `privacy.archive.person_hash`, never an address), with `counts`."""
    await store.record_audit(action, via, subject, counts)
