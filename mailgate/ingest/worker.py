"""The ingest worker: turns 'received' rows into tickets or quarantine, after the 250.

It runs in the daemon beside the SMTP listener, woken by intake commits and polling now and
then for rows requeued from the CLI. Rows are parsed in batches in the parser process; each
message's sender checks (DNS) then run on their own, so a slow answer holds up only its own
message; the messages whose checks are done are verified (DKIM, in the parser process again)
and applied in one transaction together with the rows' new state, so a crash at any point
leaves each row either untouched ('received', done again on restart) or completely done. A
message whose checks ran into DNS trouble stays 'received' and is checked again later, and so
does one whose attachment files cannot be written (a full disk), while the rest flows on.
The worker is the pipeline only: what a message does to tickets, and which mail follows, the
ticket rules decide (`tickets.py`), given the sender's trust verdict.

The daemon never holds raw messages: rows come without them, and the parser process reads
each one from the database itself (for the parse and again for DKIM), so what ingest costs
the daemon is bounded by what the parse made of a batch (`BATCH_BYTES`, `MAX_IN_FLIGHT_BYTES`).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import structlog

from mailgate import metrics
from mailgate.config import Config
from mailgate.errors import StoreUnavailable
from mailgate.ingest.auth import Authenticator, AuthResults, Lookup, VerifyJob
from mailgate.ingest.prepare import ParserCrashed, ParserPool, Source, prepare_all, verify_all
from mailgate.ingest.trust import UNCHECKED, Verdict, decide
from mailgate.live import Live
from mailgate.model import (
    ALREADY_PROCESSED,
    InboundRow,
    IngestOutcome,
    ParsedMail,
    StoredAttachment,
)
from mailgate.msgid import MessageIds
from mailgate.store import IngestTx, Store
from mailgate.tickets import Arrival, Proof, Tickets

log = structlog.get_logger(__name__)

BATCH = 64
# Raw bytes of one batch past its first row. The parser process reads one raw message at a
# time, but sends back what the parse made of the whole batch at once (bodies, as text).
BATCH_BYTES = 16 * 1024 * 1024
# While intake is busy, small batches: intake's commits queue behind each ingest transaction
# on the one writer, so a short transaction keeps the 250s flowing.
BATCH_WHILE_BUSY = 8
POLL_SECONDS = 5.0
RETRY_SECONDS = 2.0
# While intake is busy, ingest takes at most this share of the time: the 250s come first,
# and the backlog is worked off as soon as the load eases. Parsing runs in the parser process,
# so a twentieth of the event loop's time still ingests several hundred messages a second. (A
# tenth until the sealed store: its ingest transactions run more Python on the writer thread,
# holding the GIL longer, and intake at 10 connections fell from 0.76 to 0.71-0.76 of a
# discard server; at a twentieth it is 0.76-0.78, and the backlog drains as fast after.)
SHARE_WHILE_BUSY = 0.05
MAX_PAUSE = 1.0
# Messages whose sender checks are under way at once, and their raw bytes in all (what they
# hold is their parse, no more than that): the rest wait in the store. Of one source (the
# From's organisational domain), at most MAX_PER_SOURCE, DNS_PER_SOURCE of them asking DNS at
# once: a domain whose nameservers never answer holds a few slots for `dns_timeout`, not all.
MAX_IN_FLIGHT = 1024
MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024
MAX_PER_SOURCE = 128
DNS_PER_SOURCE = 16
# A message over its source's share waits this long in the store, no attempt counted.
THROTTLE_SECONDS = 2.0
# A message whose attachment files could not be written is prepared again after an eighth of
# the time it has waited, at least this long and at most ATTACHMENT_RETRY_MAX.
ATTACHMENT_RETRY = 2.0
ATTACHMENT_RETRY_MAX = 60.0
# A message whose checks ran into DNS trouble is checked again after this long (or an eighth
# of `[auth] retry_for`, if less), doubling up to AUTH_RETRY_MAX, until `retry_for`.
AUTH_RETRY_INITIAL = 15.0
AUTH_RETRY_MAX = 300.0


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A row, what the parser process made of it, and who the sender proved to be."""

    row: InboundRow
    mail: ParsedMail | None
    attachments: tuple[StoredAttachment, ...] = ()
    failure: str | None = None  # why it goes to quarantine
    retry: str | None = None  # why it must be prepared again later (attachment disk full)
    mentioned_ids: tuple[str, ...] = ()  # a bounce's strings shaped like our Message-IDs
    lookup: Lookup | None = None  # what DNS said ([auth] enabled)
    auth: AuthResults | None = None  # None: not checked ([auth] enabled = false)
    verdict: Verdict | None = None  # None (with a mail): undecided, check again later
    throttled: bool = False  # not checked: its source had too many checks under way


class IngestWorker:
    """Ingest rows; `run()` until `stop()`."""

    def __init__(
        self,
        store: Store,
        config: Config | Live[Config],
        *,
        parser: ParserPool,
        msgids: MessageIds,
        wake: asyncio.Event | None = None,
        mail_queued: asyncio.Event | None = None,
        intake_busy: Callable[[], bool] = lambda: False,
    ) -> None:
        self._store = store
        self._parser = parser
        live = Live.of(config)
        config = live.current
        self._tickets = Tickets(live, msgids)  # reads the accept list and agents live
        self._attachments = config.storage.attachments
        # Where the parser process reads raw mail, and the keys that open it.
        self._database = Source(store.path, store.keys.masters, store.keys.path)
        self._wake = wake or asyncio.Event()
        self._mail_queued = mail_queued or asyncio.Event()
        self._authenticator = (
            Authenticator(config.auth, trusted_peer=lambda ip: live.current.smtp.trusts(ip))
            if config.auth.enabled
            else None
        )
        self._retry_for = timedelta(seconds=config.auth.retry_for)
        self._intake_busy = intake_busy
        self._checks: dict[str, asyncio.Task[_Prepared]] = {}  # under way, by row id
        self._checks_bytes = 0  # their raw messages in all
        self._sources: collections.Counter[str] = collections.Counter()  # checks per source
        self._dns_slots: dict[str | None, asyncio.Semaphore] = {}  # DNS at once per source
        self._stopping = False

    def stop(self) -> None:
        """Finish the work under way, then return from `run()`; checks still waiting on DNS
        are dropped (their rows stay 'received' and are done again at the next start)."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        if self._authenticator is not None:
            log.info("authentication_dns", state=await self._authenticator.dns_state())
        try:
            while not self._stopping:
                self._wake.clear()
                try:
                    if not await self._step():
                        await self._idle()
                except StoreUnavailable as exc:
                    log.warning("ingest_store_unavailable", error=str(exc))
                    await asyncio.sleep(RETRY_SECONDS)
                except Exception:
                    log.exception("ingest_batch_failed")
                    await asyncio.sleep(RETRY_SECONDS)
        finally:
            for task in self._checks.values():
                task.cancel()
            await asyncio.gather(*self._checks.values(), return_exceptions=True)
            self._checks.clear()
            if self._authenticator is not None:
                self._authenticator.close()

    async def _step(self) -> bool:
        """Take in new rows and finish the messages whose checks are done; False if idle."""
        started = time.monotonic()
        busy = self._intake_busy()
        worked = False
        if len(self._checks) < MAX_IN_FLIGHT and self._checks_bytes < MAX_IN_FLIGHT_BYTES:
            rows = await self._store.pending_inbound(
                limit=min(BATCH_WHILE_BUSY if busy else BATCH, MAX_IN_FLIGHT - len(self._checks)),
                max_bytes=BATCH_BYTES,
                exclude=list(self._checks),
            )
            if rows:
                worked = True
                throttled = [
                    replace(item, throttled=True)
                    for item in await self._prepare(rows)
                    if not self._start(item)
                ]
                if throttled:
                    await self._finish(throttled)  # not checked: they wait in the store
                await asyncio.sleep(0)  # checks that need no DNS are done at once
        done = [task.result() for task in self._checks.values() if task.done()]
        if done:
            worked = True
            for item in done:
                del self._checks[item.row.id]
                self._checks_bytes -= item.row.size
                self._release(item)
            await self._finish(done)
        if worked and self._intake_busy():
            spent = time.monotonic() - started
            await asyncio.sleep(min(spent * (1 / SHARE_WHILE_BUSY - 1), MAX_PAUSE))
        return worked

    def _start(self, item: _Prepared) -> bool:
        """Start the sender checks of `item`; False if its source has too many under way.

        A sender whose domain's nameservers never answer must not hold every slot: at most
        MAX_PER_SOURCE messages of one source (the From's organisational domain) are in
        flight, DNS_PER_SOURCE of them asking DNS at once; more wait THROTTLE_SECONDS in the
        store (a burst from one provider is only delayed), never past `retry_for`.
        """
        source = self._source(item)
        final = datetime.now(UTC) >= item.row.received_at + self._retry_for
        if source is not None and self._sources[source] >= MAX_PER_SOURCE and not final:
            log.info("authentication_throttled", queue_id=item.row.id, in_flight=MAX_PER_SOURCE)
            return False
        if source is not None:
            self._sources[source] += 1
        self._checks[item.row.id] = asyncio.create_task(self._check(item, source))
        self._checks_bytes += item.row.size
        return True

    def _release(self, item: _Prepared) -> None:
        source = self._source(item)
        if source is None:
            return
        self._sources[source] -= 1
        if not self._sources[source]:
            del self._sources[source]
            self._dns_slots.pop(source, None)

    def _source(self, item: _Prepared) -> str | None:
        if item.mail is None or self._authenticator is None:
            return None
        return self._authenticator.source_of(item.mail)

    async def _idle(self) -> None:
        """Wait for new rows, a check that finishes, or the next poll."""
        wake = asyncio.create_task(self._wake.wait())
        try:
            await asyncio.wait(
                [wake, *self._checks.values()],
                timeout=POLL_SECONDS,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            wake.cancel()

    async def ingest(self, rows: Sequence[InboundRow]) -> list[IngestOutcome]:
        """Ingest `rows` now; each ends 'ingested', 'quarantined', or 'received' again if its
        sender checks must be retried later. Never lost.

        Raises:
            StoreUnavailable: nothing of the failed transaction was written; retry later.
        """
        prepared = await self._prepare(rows)
        return await self._finish(list(await asyncio.gather(*map(self._check, prepared))))

    async def _finish(self, items: list[_Prepared]) -> list[IngestOutcome]:
        """Verify the checked messages' signatures, decide, and apply them in one transaction."""
        items = await self._decide(items)
        try:
            outcomes = await self._store.ingest(
                lambda tx: [self._apply(tx, item) for item in items]
            )
        except StoreUnavailable:
            raise
        except Exception:  # noqa: BLE001 - one bad message must not hold up the batch
            outcomes = [await self._apply_alone(item) for item in items]
        for item, outcome in zip(items, outcomes, strict=True):
            _log_outcome(outcome)
            metrics.ingest_finished(outcome, received_at=item.row.received_at)
        if any(outcome.mails_queued for outcome in outcomes):
            self._mail_queued.set()
        return outcomes

    async def _prepare(self, rows: Sequence[InboundRow]) -> list[_Prepared]:
        """Parse in the parser process; if it dies, find the message that killed it."""
        try:
            results = await self._parser.run(
                prepare_all,
                self._database,
                [row.id for row in rows],
                self._attachments,
                [row.envelope.mail_from for row in rows],
            )
        except ParserCrashed as exc:  # or ParserTimedOut: a stalled parse is killed alike
            if len(rows) > 1:
                return [item for row in rows for item in await self._prepare([row])]
            log.error("parser_crashed", queue_id=rows[0].id, reason=exc.reason)
            return [_Prepared(rows[0], None, failure=exc.reason)]
        for row, r in zip(rows, results, strict=True):
            if r.retry is not None:
                log.warning("message_waits", queue_id=row.id, reason=r.retry)
        return [
            _Prepared(row, r.mail, r.attachments, r.failure, r.retry, r.mentioned_ids)
            for row, r in zip(rows, results, strict=True)
        ]

    async def _check(self, item: _Prepared, source: str | None = None) -> _Prepared:
        """Ask DNS what the sender's verdict needs; on its own, within the budget."""
        authenticator = self._authenticator
        if item.mail is None or authenticator is None:
            return item
        slots = self._dns_slots.setdefault(source, asyncio.Semaphore(DNS_PER_SOURCE))
        try:
            async with slots:
                lookup = await authenticator.lookup(item.mail, item.row.envelope)
        except Exception:  # a check that breaks proves nothing either way: check again later
            log.exception("authentication_failed", queue_id=item.row.id)
            return item
        return replace(item, lookup=lookup)

    async def _decide(self, items: list[_Prepared]) -> list[_Prepared]:
        """Verify DKIM in the parser process, then give each message its trust level."""
        authenticator = self._authenticator
        if authenticator is None:
            return [replace(item, verdict=UNCHECKED) for item in items]
        jobs = [(i.row.id, i.lookup.jobs) for i in items if i.lookup is not None and i.lookup.jobs]
        verified = iter(await self._verify(jobs))
        now = datetime.now(UTC)
        decided = []
        for item in items:
            if item.mail is None:
                decided.append(item)
                continue
            final = now >= item.row.received_at + self._retry_for
            if item.lookup is None:  # the check broke
                decided.append(replace(item, verdict=UNCHECKED if final else None))
                continue
            checked = next(verified) if item.lookup.jobs else {}
            auth = item.lookup.results(checked, authenticator.psl)
            verdict = decide(auth, item.mail.evidence, final=final)
            decided.append(replace(item, auth=auth, verdict=verdict))
        return decided

    async def _verify(self, jobs: list[tuple[str, list[VerifyJob]]]) -> list[dict[int, bool]]:
        """Verify signatures in the parser process; a message that kills it verifies nothing."""
        if not jobs:
            return []
        try:
            return await self._parser.run(verify_all, self._database, jobs)
        except ParserCrashed as exc:
            if len(jobs) > 1:
                return [found for job in jobs for found in await self._verify([job])]
            log.error("dkim_verification_crashed", reason=exc.reason)
            return [{}]

    async def _apply_alone(self, item: _Prepared) -> IngestOutcome:
        try:
            return await self._store.ingest(lambda tx: self._apply(tx, item))
        except StoreUnavailable:
            raise
        except Exception as exc:
            log.exception("ingest_failed", queue_id=item.row.id)
            failed = _Prepared(item.row, None, failure=f"ingest failed: {type(exc).__name__}")
            return await self._store.ingest(lambda tx: self._apply(tx, failed))

    def _apply(self, tx: IngestTx, item: _Prepared) -> IngestOutcome:
        """Write one message's outcome; runs inside the store's transaction, on its writer.

        The pipeline's steps come first (done already, to wait, to quarantine, a repeat
        delivery, to check again later); the ticket rules (`tickets.py`) do the rest.
        """
        row, mail, now = item.row, item.mail, datetime.now(UTC)
        state = tx.inbound_state(row.id)
        if state != "received":  # done meanwhile (a replay racing the daemon): nothing to do
            return IngestOutcome(row.id, state or "ingested", reason=ALREADY_PROCESSED)
        if item.retry is not None:
            return self._wait(tx, row, item.retry, now)
        if mail is None:
            tx.finish_inbound(row.id, "quarantined", reason=item.failure, at=now)
            return IngestOutcome(row.id, "quarantined", reason=item.failure)
        seen = self._tickets.seen(tx, mail)  # a repeat delivery needs no sender checks
        if seen.duplicate_of is not None:
            tx.finish_inbound(
                row.id, "ingested", reason="duplicate", at=now, ticket_id=seen.duplicate_of
            )
            return IngestOutcome(row.id, "ingested", seen.duplicate_of, duplicate=True)
        if item.throttled:
            tx.defer_inbound(
                row.id, retry_at=now + timedelta(seconds=THROTTLE_SECONDS), count=False
            )
            return IngestOutcome(row.id, "received", reason="throttled")
        if item.verdict is None:
            return self._defer(tx, row, now)
        arrival = Arrival(
            mail,
            _proof(item.verdict, item.auth),
            envelope_sender=row.envelope.mail_from,
            received_at=row.received_at,
            inbound_id=row.id,
            recipients=row.envelope.rcpt_tos,
            attachments=item.attachments,
            mentioned_ids=item.mentioned_ids,
        )
        filed = self._tickets.take_mail(tx, arrival, seen=seen, at=now)
        tx.finish_inbound(row.id, "ingested", reason="bounce" if filed.bounce else None, at=now)
        return IngestOutcome(
            row.id,
            "ingested",
            filed.ticket_id,
            created=filed.created,
            mails_queued=filed.mails_queued,
        )

    def _wait(self, tx: IngestTx, row: InboundRow, reason: str, now: datetime) -> IngestOutcome:
        """Something on our side (a full attachment disk) keeps this message from becoming a
        ticket now: leave it 'received' and prepare it again later, with no attempt counted
        (attempts are its sender checks'). It waits no longer than the trouble lasts plus a
        retry interval, which grows with how long it has waited already."""
        waited = (now - row.received_at).total_seconds()
        delay = min(max(ATTACHMENT_RETRY, waited / 8), ATTACHMENT_RETRY_MAX)
        tx.defer_inbound(row.id, retry_at=now + timedelta(seconds=delay), count=False)
        return IngestOutcome(row.id, "received", reason=reason)

    def _defer(self, tx: IngestTx, row: InboundRow, now: datetime) -> IngestOutcome:
        """DNS trouble: leave the row 'received' and check it again later, as an MTA defers;
        the last check falls at `retry_for` after it arrived, and that one decides."""
        initial = min(AUTH_RETRY_INITIAL, self._retry_for.total_seconds() / 8)
        delay = timedelta(seconds=min(initial * 2**row.attempts, AUTH_RETRY_MAX))
        retry_at = min(now + delay, row.received_at + self._retry_for)
        tx.defer_inbound(row.id, retry_at=retry_at)
        log.info(
            "authentication_deferred",
            queue_id=row.id,
            attempts=row.attempts + 1,
            retry_in=round((retry_at - now).total_seconds(), 1),
        )
        return IngestOutcome(row.id, "received", reason="authentication deferred")


def _proof(verdict: Verdict, auth: AuthResults | None) -> Proof:
    """The trust verdict and the checks behind it, in the ticket rules' terms."""
    if auth is None:  # [auth] enabled = false
        return Proof(verdict.trust, tuple(verdict.flags))
    return Proof(
        verdict.trust,
        tuple(verdict.flags),
        checks=auth.as_json(),
        covered=auth.covered,
        partial_body=any(s.partial_body for s in auth.signatures),
        forged_results=bool(auth.forged_results),
    )


def _log_outcome(outcome: IngestOutcome) -> None:
    if outcome.state == "received":
        return  # deferred, logged as such
    if outcome.state == "quarantined":
        log.warning("message_quarantined", queue_id=outcome.inbound_id, reason=outcome.reason)
    elif outcome.duplicate:
        log.info("message_duplicate", queue_id=outcome.inbound_id, ticket_id=outcome.ticket_id)
    elif outcome.ticket_id is not None:
        event = "ticket_created" if outcome.created else "ticket_updated"
        log.info(event, queue_id=outcome.inbound_id, ticket_id=outcome.ticket_id)
