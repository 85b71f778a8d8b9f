"""Retention: each kind of record kept for its period (`[retention]`), then removed.

`purge(now=...)` applies every period, counted back from `now`, in this order:

0. erasures a crash or a stop left unfinished (people marked 'erasing') are finished
   (`erasure.resume`, with the archive hook), so the daemon's first run after a start
   completes them;
1. rows of the simple categories, in short batches (`store/sqlite_retention.py`): raw bytes
   of ingested messages and quarantined messages (`raw_messages`), envelopes of ingested
   messages and outbox rows sent or failed (`delivery_log`), verification tokens and
   privacy requests' links no longer usable (`identification`; counted as `identification`
   and `privacy_requests`), audit records (`audit`);
2. records whose `closed_tickets` period ended: tickets closed that long ago still in the
   database (deleted by erasure's code) and archived records (key destroyed, row deleted);
3. tickets closed for `active_after_close`: copied to the archive, then deleted;
4. people never verified, with no open ticket, first seen `unverified_requesters` ago: erased
   (`privacy/erasure.py`), their closed tickets still within their period archived first;
5. the attachment files that no row names any more; the WAL of the database and of the
   archive truncated, so no deleted page stays in either.

Every step is safe to cut short (a crash, a stop) and to run again. The clock is a parameter:
the daemon's scheduler and `mailgate purge` pass `clock()`, tests a moment of their choosing.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from mailgate.addresses import address_key
from mailgate.config import Config
from mailgate.errors import ConfigError
from mailgate.live import Live
from mailgate.privacy import audit, erasure
from mailgate.privacy.archive import archive_ticket, archiver
from mailgate.store.archive import ArchiveStore, open_archive
from mailgate.store.blobs import remove_blobs, sweep
from mailgate.store.labels import ERASED
from mailgate.store.sqlite import PersonRef, SqliteStore
from mailgate.store.sqlite_retention import CATEGORIES, Cutoffs

log = structlog.get_logger(__name__)

# The categories a purge reports, in its order. `envelopes` and `quarantined` are kept for
# `delivery_log` and `raw_messages`; `archived` counts tickets moved to the archive,
# `closed_tickets` the records destroyed at the end of their period, `files` attachment files
# removed (a dry run does not count files: which ones go is known only as rows go).
COUNTS = (
    "erasures_resumed",
    *CATEGORIES,
    "closed_tickets",
    "archived",
    "unverified_requesters",
    "files",
)

_NOW = "MAILGATE_NOW"  # undocumented: lets the test suite move the retention clock
DAY = 24 * 3600.0
FIRST_RUN = 2.0  # seconds after the daemon is ready
STOP_SECONDS = 5.0  # a stop lets the step under way finish this long, then cancels it


def clock() -> datetime:
    """The retention clock: now, unless MAILGATE_NOW names another moment (ISO 8601).

    The one reader of MAILGATE_NOW.
    """
    given = os.environ.get(_NOW)
    if not given:
        return datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(given)
    except ValueError:
        raise ConfigError(f"{_NOW}: not an ISO 8601 time: {given!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _ours(config: Config, email: str) -> bool:
    """Agents and mailgate's own addresses are never erased as unverified requesters."""
    return (
        email == ERASED
        or config.agents.includes(email)
        or config.smtp.accepts(email)
        or address_key(email) == address_key(config.outbound.sender)
    )


async def _unverified(config: Config, store: SqliteStore, before: float) -> list[PersonRef]:
    people = await store.unverified_people(before)
    return [person for person, email in people if not _ours(config, email)]


async def purge(
    config: Config,
    store: SqliteStore,
    archive: ArchiveStore,
    *,
    now: datetime,
    dry_run: bool = False,
    via: str = "purge",
    stopping: Callable[[], bool] = lambda: False,
) -> dict[str, int]:
    """Apply every retention period as of `now`; return how many of each were removed (with
    `dry_run`, how many are due, and nothing changes). See the module's docstring."""
    periods = config.retention

    def cutoff(period_of: str) -> float:
        return float(getattr(periods, period_of).before(now).timestamp())

    cutoffs = Cutoffs(
        now=now.timestamp(),
        raw_messages=cutoff("raw_messages"),
        delivery_log=cutoff("delivery_log"),
        identification=cutoff("identification"),
        audit=cutoff("audit"),
    )
    ended, inactive = cutoff("closed_tickets"), cutoff("active_after_close")
    unverified = cutoff("unverified_requesters")
    counts = dict.fromkeys(COUNTS, 0)
    hook = archiver(store, archive, periods, now=now)

    async def keep(person: PersonRef) -> int:
        kept = await hook(person)
        counts["archived"] += kept
        return kept

    if dry_run:
        counts["erasures_resumed"] = len(await store.erasing())
        counts.update(await store.count_due(cutoffs))
        archived_due = await archive.destroy_closed_before(ended, dry_run=True)
        counts["closed_tickets"] = len(await store.closed_tickets(before=ended)) + archived_due
        counts["archived"] = len(await store.closed_tickets(before=inactive, since=ended))
        people = await _unverified(config, store, unverified)
        counts["unverified_requesters"] = len(people)
        for person in people:  # their tickets closed more recently go by erasure's hook
            counts["archived"] += len(
                await store.closed_tickets(since=inactive, requester=person.id)
            )
        return counts

    counts["erasures_resumed"] = await erasure.resume(
        store, config.storage.attachments, archive=keep
    )
    counts.update(await store.expire(cutoffs, stopping=stopping))
    files: list[str] = []
    # Records at the end of their period, wherever they are.
    for ticket_id, _closed in await store.closed_tickets(before=ended):
        if stopping():
            break
        deleted = await store.delete_tickets([ticket_id])
        counts["closed_tickets"] += deleted.tickets
        files += deleted.blob_files
    counts["closed_tickets"] += await archive.destroy_closed_before(ended)
    # Purpose achieved, record still required: to the archive.
    for ticket_id, closed_at in await store.closed_tickets(before=inactive, since=ended):
        if stopping():
            break
        await archive_ticket(store, archive, ticket_id, closed_at, "retention")
        deleted = await store.delete_tickets([ticket_id])
        counts["archived"] += deleted.tickets
        files += deleted.blob_files
    # Never verified, nothing open: erased, what the law requires archived first.
    for person in await _unverified(config, store, unverified):
        if stopping():
            break
        if await store.begin_unverified_erasure(person, unverified):
            deleted = await erasure.finish(store, person, config.storage.attachments, archive=keep)
            counts["unverified_requesters"] += 1
            counts["files"] += len(deleted.blob_files)
    counts["files"] += remove_blobs(config.storage.attachments, files)
    # Files no row names (a message never committed, an erasure cut short). The grace is in
    # real time: it spares files of messages being ingested now, whatever `now` says.
    counts["files"] += sweep(config.storage.attachments, await store.blob_names())
    if any(counts.values()):
        await store.checkpoint()
        await archive.checkpoint()
    await audit.record(store, "purge", via, None, counts)
    return counts


async def purge_now(
    config: Config,
    store: SqliteStore,
    *,
    now: datetime,
    dry_run: bool = False,
    via: str = "purge",
    stopping: Callable[[], bool] = lambda: False,
) -> dict[str, int]:
    """`purge` with the configured archive, opened for the run and closed after."""
    async with open_archive(config.retention.archive, store.keys) as archive:
        return await purge(
            config, store, archive, now=now, dry_run=dry_run, via=via, stopping=stopping
        )


class Scheduler:
    """Runs the purge in the daemon: `FIRST_RUN` seconds after start, then once a day.

    A failed run is logged and tried again the next day; `stop()` ends the loop (the purge
    under way stops after its current step).
    """

    def __init__(
        self, config: Config | Live[Config], store: SqliteStore, *, interval: float = DAY
    ) -> None:
        # The periods, agents and accept list of each run are those current then (a reload).
        self._live = Live.of(config)
        self._store = store
        self._interval = interval
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        delay = FIRST_RUN
        while not await self._stopped_within(delay):
            delay = self._interval
            try:
                counts = await purge_now(
                    self._live.current,
                    self._store,
                    now=clock(),
                    via="scheduler",
                    stopping=self._stop.is_set,
                )
            except Exception as exc:  # noqa: BLE001 - logged; the next day tries again
                log.error("retention_failed", error=f"{type(exc).__name__}: {exc}")
                continue
            log.info("retention_purged", **counts)

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            return False
        return True
