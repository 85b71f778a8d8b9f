"""The requester's rights as operations: restriction, objection, correction, erasure (the
export is `export.py`). The CLI and a confirmed privacy request by mail both call these; each
writes its audit record (with the change itself where the store can: one transaction).

Restricted (`people.state = 'restricted'`) means stored, and nothing more: incoming mail is
still kept (tickets are created and followed up as before), but no automatic mail goes to the
person (`reactions.py`: no verification, no acknowledgement) and their tickets are left out of
statistics (`stats.py`). An agent's reply written by hand still goes: a person who wrote in
asked for an answer, and an agent who sends one acts on the ticket, not a machine. An
objection records when, and restricts; lifting a restriction withdraws the objection too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

from mailgate.config import Config
from mailgate.privacy import audit, erasure
from mailgate.privacy.archive import archiver
from mailgate.store import IngestTx
from mailgate.store.archive import open_archive
from mailgate.store.sqlite import PersonRef, SqliteStore
from mailgate.store.sqlite_rights import Change, Correction, Restriction

T = TypeVar("T")


async def restriction(
    store: SqliteStore, email: str, change: Change, *, via: str
) -> Restriction | None:
    """Restrict (`restrict`), record an objection (`object`) or lift both (`unrestrict`);
    None if there is no such person."""
    record = audit.entry(store.keys, change, via, email, {})
    return await store.set_restriction(email, change, record)


async def correct(
    store: SqliteStore,
    email: str,
    *,
    name: str | None,
    new_email: str | None,
    via: str,
    then: Callable[[IngestTx, Correction], T],
) -> tuple[Correction, T] | None:
    """Correct the person's name and/or address; `then` queues what follows (the mail that
    verifies a new address) in the same transaction. A new address is audited under both the
    old address's hash and the new one's, so either finds the record."""
    records = [audit.entry(store.keys, "correct", via, email, {})]
    if new_email is not None:
        records.append(audit.entry(store.keys, "correct", via, new_email, {}))
    return await store.correct_person(
        email, name=name, new_email=new_email, audit=records, then=then
    )


@dataclass(frozen=True, slots=True)
class Erased:
    counts: dict[str, int]
    reason: str


@asynccontextmanager
async def _archive_first(store: SqliteStore, config: Config) -> AsyncIterator[erasure.Archive]:
    """What of an erased person the law still requires goes to the archive first: their closed
    tickets within `closed_tickets` (`privacy/archive.py`). A ticket still open is not an
    inquiry that was settled: it is closed and erased with the rest."""
    async with open_archive(config.retention.archive, store.keys) as archive:
        yield archiver(store, archive, config.retention)


async def erase(
    store: SqliteStore, email: str, config: Config, *, via: str, reason: str | None
) -> Erased | None:
    """Erase the person with this address (`reason` as given; only its category is kept);
    None if there is no such person."""
    category = audit.reason_category(reason)
    tickets = await store.ticket_counts(email)
    if tickets is None:
        return None
    async with _archive_first(store, config) as archive:
        deleted = await erasure.erase(store, email, config.storage.attachments, archive=archive)
    if deleted is None:  # erased by someone else in between
        return None
    counts = {**deleted.counts(), "open_tickets": tickets["open"]}
    await audit.record(store, "erase", via, email, counts, reason=category)
    return Erased(counts, category)


async def erase_marked(
    store: SqliteStore, person: PersonRef, email: str, config: Config, *, via: str
) -> Erased:
    """Finish the erasure of a person already marked 'erasing' (a privacy request confirmed
    by its link is marked in the transaction that confirms it), archiving first what the law
    still requires, and audit it: their own request, so the reason is `request`."""
    async with _archive_first(store, config) as archive:
        deleted = await erasure.finish(store, person, config.storage.attachments, archive=archive)
    counts = deleted.counts()
    await audit.record(store, "erase", via, email, counts, reason="request")
    return Erased(counts, "request")


async def finish_erasures(store: SqliteStore, config: Config) -> int:
    """Finish the erasures a crash cut short (before serving, before any privacy command).
    The archive is opened only when there is one to finish."""
    if not await store.erasing():
        return await erasure.resume(store, config.storage.attachments)  # leftover files only
    async with _archive_first(store, config) as archive:
        return await erasure.resume(store, config.storage.attachments, archive=archive)
