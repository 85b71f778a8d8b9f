"""Erasure: a person's data destroyed so that no copy anywhere can reveal it again.

In order, each step durable before the next, so a crash anywhere is finished by `resume` at
the next start and never undone: (1) the person is marked 'erasing'; (2) what the law still
requires of them is copied to the archive (`archive`, when given); (3) their data key is
destroyed in the key store: from here on every copy of their values, in the database, its WAL
and any backup, is ciphertext without a key; (4) their rows are deleted and overwritten and
the WAL truncated, the names of their attachment files noted (`erased_files`) in the same
transaction, then their own row goes; (5) those files are removed, and the note with them. A
reader that keeps old pages in use at (3) or (4) (a backup under way) stops the erasure there,
the person still marked (KeyringError, StoreUnavailable): erasing again finishes it.

A crash after (3) leaves rows whose key is gone: the next open of the store deletes them
(`reconcile`, which writes their audit record); one after (4) leaves noted files, which
`resume` removes. `MAILGATE_CRASH_AT` (`crashpoints.py`) kills the process right after (1) or
(3), for the tests that prove it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from mailgate.crashpoints import crash_point
from mailgate.errors import StoreUnavailable
from mailgate.privacy import audit
from mailgate.store.blobs import remove_blobs
from mailgate.store.sqlite import PersonRef, SqliteStore
from mailgate.store.sqlite_erase import Deleted

Archive = Callable[[PersonRef], Awaitable[int]]


async def erase(
    store: SqliteStore, email: str, attachments: Path, *, archive: Archive | None = None
) -> Deleted | None:
    """Erase the person with this address; None if there is no such person."""
    person = await store.begin_erasure(email)
    if person is None:
        return None
    crash_point("erase.marked")
    return await finish(store, person, attachments, archive=archive)


async def finish(
    store: SqliteStore, person: PersonRef, attachments: Path, *, archive: Archive | None = None
) -> Deleted:
    if archive is not None:
        await archive(person)
    store.keys.destroy([person.key_id])
    crash_point("erase.key_destroyed")
    deleted = await store.delete_person(person)
    remove_blobs(attachments, deleted.blob_files)
    await store.forget_erased_files(deleted.blob_files)
    if not deleted.overwritten:
        raise StoreUnavailable(
            "the erased rows' old pages are still in the database's files while another"
            " connection reads it; erase again when it is done"
        )
    return deleted


async def resume(store: SqliteStore, attachments: Path, *, archive: Archive | None = None) -> int:
    """Finish the erasures a crash interrupted (each audited: via "resume", no subject, the
    address being sealed under a key that may be gone); return how many."""
    unfinished = await store.erasing()
    for person in unfinished:
        deleted = await finish(store, person, attachments, archive=archive)
        await audit.record(store, "erase", "resume", None, deleted.counts())
    leftover = await store.erased_files()
    if leftover:  # rows deleted (here, or by `reconcile` at open), files not yet unlinked
        remove_blobs(attachments, leftover)
        await store.forget_erased_files(leftover)
    return len(unfinished)
