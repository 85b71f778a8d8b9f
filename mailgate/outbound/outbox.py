"""The outbound worker: claim due outbox rows, compose, deliver, retry with backoff.

A row is 'queued' until claimed ('sending', its attempt counted), then 'sent', 'failed' or
'queued' again with its next attempt pushed back: `retry_initial`, doubling up to
`retry_max`, until `max_lifetime` after it was queued (Postfix's maximal_queue_lifetime).
A 5xx fails it at once. Rows a crash left 'sending' are queued again at start
(at-least-once); a clean stop leaves no row 'sending', so a restart sends nothing twice (see
`OutboundWorker.stop`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import structlog

from mailgate import metrics
from mailgate.config import OutboundConfig
from mailgate.errors import ConfigError, StoreUnavailable
from mailgate.log import mask_address
from mailgate.model import Address, OutboxRow
from mailgate.outbound.compose import Composer, serialise
from mailgate.outbound.refusals import record_refusals
from mailgate.outbound.transports import DeliveryFailed, Handover, Refusal, Transport
from mailgate.store import IngestTx, Store
from mailgate.store.blobs import remove_blobs
from mailgate.store.labels import ERASED

log = structlog.get_logger(__name__)

BATCH = 10
POLL_SECONDS = 1.0  # rows queued by another process (the CLI's `reply`) are seen this fast
RETRY_SECONDS = 2.0
SHARE_WHILE_BUSY = 0.1  # of the event loop's time while intake is busy
MAX_PAUSE = 1.0
CUT_GRACE = 2.0  # after `outbound.timeout`: the relay's answer to the final dot, on its way
RECORD_SECONDS = 3.0  # for the cut deliveries' rows to be written
UNCONFIRMED = (
    "unconfirmed: a stop cut the wait for the relay's answer after DATA; the relay may have "
    "the mail, so it is not sent again unless `mailgate outbox retry` says so"
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """One attempt: what to record, why, and what the relay said."""

    state: Literal["sent", "failed", "retry"]
    error: str | None = None
    reply: str | None = None  # the relay's whole reply text
    refused: tuple[Refusal, ...] = ()  # recipients the relay refused at once


def stop_seconds(config: OutboundConfig) -> float:
    """The longest a stop of the outbound worker takes: a delivery past DATA has the relay's
    whole `timeout` to answer the final dot, then it is cut; its row is written after that."""
    return config.timeout + CUT_GRACE + RECORD_SECONDS


class OutboundWorker:
    """Deliver the outbox; `run()` until `stop()`."""

    def __init__(
        self,
        store: Store,
        composer: Composer,
        transport: Transport,
        config: OutboundConfig,
        *,
        wake: asyncio.Event | None = None,
        intake_busy: Callable[[], bool] = lambda: False,
        attachments: Path | None = None,
    ) -> None:
        self._store = store
        self._attachments = attachments  # [storage] attachments: a privacy export's sealed zip
        self._intake_busy = intake_busy
        self._composer = composer
        self._transport = transport
        self._config = config
        self._wake = wake or asyncio.Event()
        self._stopping = False
        self._under_way: dict[asyncio.Task[None], Handover] = {}
        self._sender = Address(composer.sender, "Mail relay")  # of the refusal notes

    def stop(self) -> None:
        """Claim nothing more; settle the deliveries under way, then return from `run()`.

        A delivery that has not sent DATA yet is cut at once: the relay has nothing (it drops
        a transaction without its final dot), so the row is queued again and sent after the
        restart. One past DATA is given the relay's whole `timeout` (and `CUT_GRACE`) to be
        answered, as it would have without the stop, and recorded as it ends. If it is still
        waiting then, it is cut and its row marked failed, 'unconfirmed': the relay may hold
        the mail, and sending it again blindly is what a clean stop must not do. No row stays
        'sending', so the restart sends nothing twice.
        """
        self._stopping = True
        self._wake.set()
        for task, handover in self._under_way.items():
            if not handover.committed and not handover.done:
                task.cancel()
        if self._under_way:
            loop = asyncio.get_running_loop()
            loop.call_later(self._config.timeout + CUT_GRACE, self._cut_all)

    def _cut_all(self) -> None:
        for task, handover in self._under_way.items():
            if not handover.done:
                task.cancel()

    async def recover(self) -> None:
        """Queue again what a crash left 'sending' (the daemon does this before it is ready,
        and before `run()`)."""
        requeued = await self._store.requeue_sending()
        if requeued:
            log.warning("outbox_requeued_after_crash", rows=requeued)

    async def run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                rows = await self._store.claim_outbox(limit=BATCH)
                if rows and self._stopping:  # the stop came during the claim
                    for row in rows:
                        await self._put_back(row)
                    break
                if rows:
                    started = time.monotonic()
                    results = await self._deliver_all(rows)
                    for row, result in zip(rows, results, strict=True):
                        if isinstance(result, Exception):  # left 'sending' until a restart
                            log.error("outbox_delivery_crashed", outbox_id=row.id, exc_info=result)
                    if self._intake_busy():  # the 250s come first, as for ingest
                        spent = time.monotonic() - started
                        await asyncio.sleep(min(spent * (1 / SHARE_WHILE_BUSY - 1), MAX_PAUSE))
                    continue
                due = await self._store.next_outbox_due()
            except StoreUnavailable as exc:
                log.warning("outbox_store_unavailable", error=str(exc))
                await asyncio.sleep(RETRY_SECONDS)
                continue
            wait = POLL_SECONDS
            if due is not None:
                wait = min(wait, max(0.0, (due - datetime.now(UTC)).total_seconds()))
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                pass

    async def _deliver_all(self, rows: list[OutboxRow]) -> list[BaseException | None]:
        """Deliver `rows` at once, each as a task that `stop()` can cut."""
        tasks = {}
        for row in rows:
            handover = Handover()
            tasks[asyncio.create_task(self._deliver(row, handover))] = handover
        self._under_way = tasks
        try:
            return await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._under_way = {}

    async def _deliver(self, row: OutboxRow, handover: Handover) -> None:
        try:
            outcome = await self._attempt(row, handover)
        except asyncio.CancelledError:
            handover.done = True
            await self._record_cut(row, handover)
            raise
        handover.done = True  # only the outcome is left to write: a stop lets it be
        metrics.outbound_attempted()
        if outcome.state == "retry":
            await self._retry_or_fail(row, outcome)
        else:
            await self._finish(row, outcome)

    async def _attachment(self, row: OutboxRow) -> bytes | Outcome | None:
        """What the mail attaches: a privacy export's zip, opened from its sealed blob (which
        the store removes once the mail is sent or has failed); an Outcome if it is gone."""
        item = row.item
        if item.kind != "privacy_export" or item.context.get("too_large"):
            return None
        content = None
        if item.context.get("export_blob") and self._attachments is not None:
            content = await self._store.outbox_attachment(row.id, self._attachments)
        if content is None:
            return Outcome("failed", "the export is no longer stored; ask for a new one")
        return content

    async def _attempt(self, row: OutboxRow, handover: Handover) -> Outcome:
        # A Cc'd participant erased since the mail was queued is no recipient any more.
        item = replace(row.item, cc=tuple(a for a in row.item.cc if a != ERASED))
        recipients = [item.to.email, *item.cc]
        attachment = await self._attachment(row)
        if isinstance(attachment, Outcome):
            return attachment
        try:
            message = serialise(self._composer.compose(item, attachment=attachment), recipients)
        except ConfigError as exc:  # a broken template: ops can fix it, so retry later
            return Outcome("retry", f"template: {exc}")
        except Exception as exc:  # noqa: BLE001 - this row's data cannot make a mail
            # A value that cannot be encoded, an error a template raises on this row's data:
            # the same row fails the same way each time, so it fails now, with the reason,
            # rather than stay 'sending' until a restart.
            log.error("outbox_composition_failed", outbox_id=row.id, error=type(exc).__name__)
            return Outcome("failed", f"composition failed: {type(exc).__name__}: {exc}")
        try:
            delivery = await self._transport.send(
                message, sender=self._composer.sender, recipients=recipients, handover=handover
            )
        except DeliveryFailed as exc:
            state: Literal["failed", "retry"] = "failed" if exc.permanent else "retry"
            return Outcome(state, str(exc), exc.reply, exc.refused)
        if not delivery.refused:
            return Outcome("sent", None, delivery.reply)
        # Taken for some recipients, refused for others: sent, but not silently so.
        error = f"refused {len(delivery.refused)} of {len(recipients)} recipients: " + "; ".join(
            f"<{r.recipient}> {r.code}" for r in delivery.refused
        )
        return Outcome("sent", error, delivery.reply, delivery.refused)

    async def _record_cut(self, row: OutboxRow, handover: Handover) -> None:
        """A stop cut this delivery: record what the relay may have (see `stop`)."""
        if handover.delivered:
            await self._finish(row, Outcome("sent"))
        elif handover.committed:
            await self._finish(row, Outcome("failed", UNCONFIRMED))
        else:
            await self._put_back(row)

    async def _put_back(self, row: OutboxRow) -> None:
        """Queue a row again, due at once: a stop came before the relay got anything."""
        await self._store.finish_outbox(
            row.id, "queued", error="stopped before DATA", retry_at=datetime.now(UTC)
        )
        log.info("outbox_put_back", outbox_id=row.id)

    async def _retry_or_fail(self, row: OutboxRow, outcome: Outcome) -> None:
        """Queue the next attempt; the last one falls at `max_lifetime`, then the mail fails.

        Refusals are recorded (marks, the ticket's note) only with the final outcome: a
        recipient refused on each of ten attempts is noted once."""
        now = datetime.now(UTC)
        deadline = row.created_at + timedelta(seconds=self._config.max_lifetime)
        error = outcome.error or ""
        if now >= deadline:
            error = f"gave up after {row.attempts} attempts: {error}"
            await self._finish(row, Outcome("failed", error, outcome.reply, outcome.refused))
            return
        delay = min(self._config.retry_initial * 2 ** (row.attempts - 1), self._config.retry_max)
        retry_at = min(now + timedelta(seconds=delay), deadline)
        await self._store.finish_outbox(
            row.id, "queued", error=error, retry_at=retry_at, reply=outcome.reply
        )
        metrics.outbound_finished(row.item.kind, "queued")
        log.warning(
            "outbox_deferred", outbox_id=row.id, attempts=row.attempts, delay=delay, error=error
        )

    async def _finish(self, row: OutboxRow, outcome: Outcome) -> None:
        state = outcome.state
        assert state != "retry"
        link_lost = row.item.kind in ("verification", "privacy_confirm") and state == "failed"
        if (outcome.refused or link_lost) and row.item.ticket_id is not None:
            await self._store.ingest(lambda tx: self._record(tx, row, outcome))
        else:  # a system mail leaves no trace of its recipient: no mark, no note
            await self._store.finish_outbox(
                row.id, state, error=outcome.error, retry_at=None, reply=outcome.reply
            )
        blob = row.item.context.get("export_blob")
        if isinstance(blob, str) and blob and self._attachments is not None:
            # Its row went in the transaction above; a crash before this leaves a sealed file
            # whose key went with the row, which the blob sweep removes.
            remove_blobs(self._attachments, [blob])
        metrics.outbound_finished(row.item.kind, state)
        event = "outbox_sent" if state == "sent" else "outbox_failed"
        log.info(
            event,
            outbox_id=row.id,
            kind=row.item.kind,
            ticket_id=row.item.ticket_id,
            recipient=mask_address(row.item.to.email),
            attempts=row.attempts,
            refused=len(outcome.refused),
            error=outcome.error,
        )

    def _record(self, tx: IngestTx, row: OutboxRow, outcome: Outcome) -> None:
        """The outcome with what follows from it, in one transaction: the relay's refusals
        (marks, a note on the ticket), and a verification mail that never arrived revokes
        its link (it failed: a stored row must not hold a usable token)."""
        now = datetime.now(UTC)
        delivered = outcome.state == "sent"
        if outcome.refused:
            record_refusals(
                tx, row.item, outcome.refused, delivered=delivered, sender=self._sender, at=now
            )
        elif not delivered:
            tx.revoke_tokens(message_ids=[row.item.message_id], at=now)
        state: Literal["sent", "failed"] = "sent" if delivered else "failed"
        tx.finish_outbox(row.id, state, error=outcome.error, retry_at=None, reply=outcome.reply)
