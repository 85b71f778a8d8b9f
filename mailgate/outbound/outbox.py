"""The outbound worker: claim due outbox rows, compose, deliver, retry with backoff.

A row is 'queued' until claimed ('sending', its attempt counted), then 'sent', 'failed' or
'queued' again with its next attempt pushed back: `retry_initial`, doubling up to
`retry_max`, until `max_lifetime` after it was queued (Postfix's maximal_queue_lifetime).
A 5xx fails it at once. Rows a crash left 'sending' are queued again at start
(at-least-once); a clean stop finishes what it claimed, so a restart sends nothing twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Literal

import structlog

from mailgate.config import OutboundConfig
from mailgate.errors import ConfigError, StoreUnavailable
from mailgate.log import mask_address
from mailgate.model import OutboxRow
from mailgate.outbound.compose import Composer, serialise
from mailgate.outbound.transports import DeliveryFailed, Transport
from mailgate.store import Store

log = structlog.get_logger(__name__)

BATCH = 10
POLL_SECONDS = 1.0  # rows queued by another process (the CLI's `reply`) are seen this fast
RETRY_SECONDS = 2.0
SHARE_WHILE_BUSY = 0.1  # of the event loop's time while intake is busy
MAX_PAUSE = 1.0


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
    ) -> None:
        self._store = store
        self._intake_busy = intake_busy
        self._composer = composer
        self._transport = transport
        self._config = config
        self._wake = wake or asyncio.Event()
        self._stopping = False

    def stop(self) -> None:
        """Finish the deliveries under way, then return from `run()`."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        requeued = await self._store.requeue_sending()
        if requeued:
            log.warning("outbox_requeued_after_crash", rows=requeued)
        while not self._stopping:
            self._wake.clear()
            try:
                rows = await self._store.claim_outbox(limit=BATCH)
                if rows:
                    started = time.monotonic()
                    results = await asyncio.gather(
                        *(self._deliver(row) for row in rows), return_exceptions=True
                    )
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

    async def _deliver(self, row: OutboxRow) -> None:
        item = row.item
        recipients = [item.to.email, *item.cc]
        try:
            message = serialise(self._composer.compose(item), recipients)
            await self._transport.send(message, sender=self._composer.sender, recipients=recipients)
        except ConfigError as exc:  # a broken template: ops can fix it, so retry later
            await self._retry_or_fail(row, f"template: {exc}")
        except DeliveryFailed as exc:
            if exc.permanent:
                await self._finish(row, "failed", str(exc))
            else:
                await self._retry_or_fail(row, str(exc))
        else:
            await self._finish(row, "sent", None)

    async def _retry_or_fail(self, row: OutboxRow, error: str) -> None:
        """Queue the next attempt; the last one falls at `max_lifetime`, then the mail fails."""
        now = datetime.now(UTC)
        deadline = row.created_at + timedelta(seconds=self._config.max_lifetime)
        if now >= deadline:
            await self._finish(row, "failed", f"gave up after {row.attempts} attempts: {error}")
            return
        delay = min(self._config.retry_initial * 2 ** (row.attempts - 1), self._config.retry_max)
        retry_at = min(now + timedelta(seconds=delay), deadline)
        await self._store.finish_outbox(row.id, "queued", error=error, retry_at=retry_at)
        log.warning(
            "outbox_deferred", outbox_id=row.id, attempts=row.attempts, delay=delay, error=error
        )

    async def _finish(
        self, row: OutboxRow, state: Literal["sent", "failed"], error: str | None
    ) -> None:
        await self._store.finish_outbox(row.id, state, error=error, retry_at=None)
        event = "outbox_sent" if state == "sent" else "outbox_failed"
        log.info(
            event,
            outbox_id=row.id,
            kind=row.item.kind,
            ticket_id=row.item.ticket_id,
            recipient=mask_address(row.item.to.email),
            attempts=row.attempts,
            error=error,
        )
