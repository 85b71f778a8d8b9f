"""Erasure: a person's data destroyed so that no copy anywhere can reveal it again.

In order, each step durable before the next, so a crash anywhere is finished by `resume` at
the next start and never undone: (1) the person is marked 'erasing'; (2) what the law still
requires of them is copied to the archive (`archive`, when given); (3) their data key is
destroyed in the key store: from here on every copy of their values, in the database, its WAL
and any backup, is ciphertext without a key; (4) their rows are deleted and overwritten and
the WAL truncated; (5) their attachment files are removed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

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
    return await finish(store, person, attachments, archive=archive)


async def finish(
    store: SqliteStore, person: PersonRef, attachments: Path, *, archive: Archive | None = None
) -> Deleted:
    if archive is not None:
        await archive(person)
    store.keys.destroy([person.key_id])
    deleted = await store.delete_person(person)
    remove_blobs(attachments, deleted.blob_files)
    return deleted


async def resume(store: SqliteStore, attachments: Path, *, archive: Archive | None = None) -> int:
    """Finish the erasures a crash interrupted; return how many."""
    unfinished = await store.erasing()
    for person in unfinished:
        await finish(store, person, attachments, archive=archive)
    return len(unfinished)
