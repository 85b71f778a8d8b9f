"""Durable receive with group commit: the only thing smtp.py calls.

`Intake.receive` returns a queue id only after the raw bytes and envelope are committed
(fsynced). One writer task takes whatever sessions have queued, waits a few milliseconds for
the other connected sessions, commits the batch as one transaction and answers each waiting
session; while a commit is in flight the next batch gathers. A lone sender never waits.
A large message comes as a spool file (`spool.py`), which the store copies in pieces within
the same transaction: a batch costs memory only for its small messages.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from mailgate.errors import StoreError, StoreUnavailable
from mailgate.model import Envelope
from mailgate.spool import Spooled
from mailgate.store import Store
from mailgate.trace import new_queue_id

log = structlog.get_logger(__name__)

MAX_BATCH = 256
# Bytes of message in one commit (past its first message): how long a commit holds the writer
# (a spooled message is copied into the database inside it), and what SQLite copies of the
# small ones it binds. A commit and its fsync cost the same for 16 MiB as for 64.
MAX_BATCH_BYTES = 16 * 1024 * 1024
BUSY_SECONDS = 0.25  # intake counts as busy this long after a commit
COMMIT_DELAY = 0.005  # the longest a commit waits for other sessions' messages


@dataclass(slots=True)
class _Pending:
    queue_id: str
    envelope: Envelope
    raw: bytes | Spooled
    done: asyncio.Future[None]

    @property
    def size(self) -> int:
        return self.raw.size if isinstance(self.raw, Spooled) else len(self.raw)


class Intake:
    """Group-committing front door of the store. Start with `start()`, stop with `stop()`."""

    def __init__(
        self,
        store: Store,
        *,
        on_committed: asyncio.Event | None = None,
        senders: Callable[[], int] = lambda: 1,
    ) -> None:
        self._store = store
        self._senders = senders
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._on_committed = on_committed
        self._last_commit = -BUSY_SECONDS

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write_forever(), name="intake-writer")

    async def stop(self) -> None:
        """Commit what is queued, then stop the writer."""
        while not self._queue.empty():
            await self._commit(self._fill([]))
        if self._writer:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)

    async def receive(
        self, envelope: Envelope, raw: bytes | Spooled, *, queue_id: str | None = None
    ) -> str:
        """Commit one message durably and return its queue id (`queue_id`, if the caller
        named one already: the SMTP session's Received field does).

        A spooled `raw` must stay open until this returns (the caller holds it).

        Raises:
            StoreUnavailable: it was not committed (the store is down or full); answer 451.
            StoreError: the store refused this message's data; answer 451.
        """
        pending = _Pending(
            queue_id or new_queue_id(), envelope, raw, asyncio.get_running_loop().create_future()
        )
        self._queue.put_nowait(pending)
        # A session cancelled here cancels only its own future; the batch commits regardless
        # (the writer skips futures that are already done).
        await pending.done
        return pending.queue_id

    def busy(self) -> bool:
        """Tell whether messages arrived recently; background work then yields to intake."""
        return time.monotonic() - self._last_commit < BUSY_SECONDS

    def _fill(self, batch: list[_Pending]) -> list[_Pending]:
        """Add what is queued to `batch`, up to the batch limits."""
        size = sum(p.size for p in batch)
        while len(batch) < MAX_BATCH and size < MAX_BATCH_BYTES and not self._queue.empty():
            item = self._queue.get_nowait()
            batch.append(item)
            size += item.size
        return batch

    async def _write_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = self._fill([await self._queue.get()])
            # Commit delay with siblings, as PostgreSQL's commit_delay/commit_siblings: while
            # other sessions are connected, wait a moment for their messages to share this
            # commit. A lone sender never waits.
            deadline = loop.time() + COMMIT_DELAY
            while (
                len(batch) < min(self._senders(), MAX_BATCH)
                and sum(p.size for p in batch) < MAX_BATCH_BYTES
            ):
                try:
                    async with asyncio.timeout_at(deadline):
                        item = await self._queue.get()
                except TimeoutError:
                    break
                batch.append(item)
                self._fill(batch)
            await self._commit(batch)

    async def _commit(self, batch: list[_Pending]) -> None:
        committed = await self._store_batch(batch)
        if not committed:
            return
        self._last_commit = time.monotonic()
        for p in committed:
            if not p.done.done():
                p.done.set_result(None)
        if self._on_committed is not None:
            self._on_committed.set()

    async def _store_batch(self, batch: list[_Pending]) -> list[_Pending]:
        """Commit `batch`; return what was committed, having failed the waits of the rest.

        The store being unavailable (down, full, I/O error) fails everyone: nothing would
        commit. Any other failure can be one message's data (a value the driver cannot
        store), so each message is then committed alone and only the one at fault fails:
        one session's input never costs another session its 250.
        """
        try:
            await self._store.receive([(p.queue_id, p.envelope, p.raw) for p in batch])
        except StoreUnavailable as exc:
            log.error("intake_commit_failed", batch=len(batch), error=repr(exc))
            self._fail(batch, exc)
            return []
        except Exception as exc:  # noqa: BLE001 - every waiting session must get an answer
            if len(batch) == 1:
                log.error("intake_message_refused", error=repr(exc))
                self._fail(batch, StoreError(f"message refused by the store: {exc!r}"))
                return []
            log.warning("intake_batch_refused", batch=len(batch), error=repr(exc))
            committed: list[_Pending] = []
            for p in batch:
                committed += await self._store_batch([p])
            return committed
        return batch

    @staticmethod
    def _fail(batch: list[_Pending], error: Exception) -> None:
        for p in batch:
            if not p.done.done():
                p.done.set_exception(error)
