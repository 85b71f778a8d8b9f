"""Wiring and lifecycle: start in order, tell systemd, drain and stop in reverse.

The shutdown trigger comes from the caller (signals in the CLI, an Event in tests), as in
hypercorn's `serve(..., shutdown_trigger=...)`.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import structlog

from mailgate.config import Config
from mailgate.ingest.prepare import ParserPool
from mailgate.ingest.worker import IngestWorker
from mailgate.intake import Intake
from mailgate.model import HostPort
from mailgate.smtp import MailgateSMTP, start_smtp
from mailgate.store import open_store

log = structlog.get_logger(__name__)

WORKER_STOP_SECONDS = 30.0


def sd_notify(state: str) -> None:
    """Tell systemd our state (Type=notify); a no-op outside systemd."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    if target.startswith("@"):
        target = "\0" + target[1:]  # abstract socket namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(target)
        sock.sendall(state.encode())


async def serve(
    config: Config,
    *,
    shutdown: Callable[[], Awaitable[object]],
    on_ready: Callable[[HostPort], None] = lambda _: None,
) -> None:
    """Run the daemon until `shutdown()` returns."""
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(open_store(config.storage.database))
        config.storage.attachments.mkdir(parents=True, exist_ok=True)

        parser = ParserPool()
        stack.callback(parser.close)
        await parser.start()
        committed = asyncio.Event()
        sessions: set[MailgateSMTP] = set()
        intake = Intake(store, on_committed=committed, senders=lambda: len(sessions))
        worker = IngestWorker(store, config, parser=parser, wake=committed, intake_busy=intake.busy)
        # Started before listening: it first ingests what a crash left 'received'.
        worker_task = asyncio.create_task(worker.run(), name="ingest-worker")
        stack.push_async_callback(_stop_worker, worker, worker_task)

        intake.start()
        stack.push_async_callback(intake.stop)

        listener = await start_smtp(config.smtp, intake, sessions=sessions)
        stack.push_async_callback(listener.drain, config.smtp.drain_timeout)

        on_ready(listener.address)
        sd_notify("READY=1")
        log.info("daemon_started", smtp=str(listener.address))
        await shutdown()
        sd_notify("STOPPING=1")
        log.info("daemon_stopping")
    log.info("daemon_stopped")


async def _stop_worker(worker: IngestWorker, task: asyncio.Task[None]) -> None:
    worker.stop()
    try:
        await asyncio.wait_for(task, WORKER_STOP_SECONDS)
    except TimeoutError:
        log.warning("ingest_worker_cancelled")  # its batch rolls back and is redone on start
