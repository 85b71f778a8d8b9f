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
from dataclasses import dataclass

import structlog

from mailgate.config import Config
from mailgate.ingest.prepare import ParserPool
from mailgate.ingest.worker import IngestWorker
from mailgate.intake import Intake
from mailgate.model import HostPort
from mailgate.msgid import message_ids
from mailgate.outbound.compose import Composer
from mailgate.outbound.outbox import OutboundWorker
from mailgate.outbound.templates import Templates
from mailgate.outbound.transports import transport_for
from mailgate.smtp import start_smtp
from mailgate.smtp_session import MailgateSMTP
from mailgate.store import open_store
from mailgate.web import build_app, start_web

log = structlog.get_logger(__name__)

WORKER_STOP_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class Listening:
    """Where the daemon listens, once it does (ports may have been 0)."""

    smtp: HostPort
    http: HostPort


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
    on_ready: Callable[[Listening], None] = lambda _: None,
) -> None:
    """Run the daemon until `shutdown()` returns."""
    templates = Templates(config.outbound.templates)
    templates.check()  # a broken template stops the start (exit 78), naming file and line
    msgids = message_ids(config)
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(open_store(config.storage.database))
        config.storage.attachments.mkdir(parents=True, exist_ok=True)

        committed, mail_queued = asyncio.Event(), asyncio.Event()
        sessions: set[MailgateSMTP] = set()
        intake = Intake(store, on_committed=committed, senders=lambda: len(sessions))

        outbound = OutboundWorker(
            store,
            Composer(config, templates),
            transport_for(config.outbound, local_hostname=config.smtp.hostname),
            config.outbound,
            wake=mail_queued,
            intake_busy=intake.busy,
        )
        outbound_task = asyncio.create_task(outbound.run(), name="outbound-worker")
        stack.push_async_callback(_stop_worker, outbound, outbound_task)

        parser = ParserPool()
        stack.callback(parser.close)
        await parser.start()
        worker = IngestWorker(
            store,
            config,
            parser=parser,
            msgids=msgids,
            wake=committed,
            mail_queued=mail_queued,
            intake_busy=intake.busy,
        )
        # Started before listening: it first ingests what a crash left 'received'.
        worker_task = asyncio.create_task(worker.run(), name="ingest-worker")
        stack.push_async_callback(_stop_worker, worker, worker_task)

        intake.start()
        stack.push_async_callback(intake.stop)

        listener = await start_smtp(
            config.smtp,
            intake,
            sessions=sessions,
            spool=config.storage.database.parent,
            attachments=config.storage.attachments,
        )
        stack.push_async_callback(listener.drain, config.smtp.drain_timeout)

        runner, http_address = await start_web(config.http, build_app(store, templates))
        stack.push_async_callback(runner.cleanup)

        on_ready(Listening(listener.address, http_address))
        sd_notify("READY=1")
        log.info("daemon_started", smtp=str(listener.address), http=str(http_address))
        await shutdown()
        sd_notify("STOPPING=1")
        log.info("daemon_stopping")
    log.info("daemon_stopped")


async def _stop_worker(worker: IngestWorker | OutboundWorker, task: asyncio.Task[None]) -> None:
    worker.stop()
    try:
        await asyncio.wait_for(task, WORKER_STOP_SECONDS)
    except TimeoutError:
        # Ingest: the batch rolls back and is redone on start. Outbound: rows left 'sending'
        # are sent again on start (at-least-once).
        log.warning("worker_cancelled", worker=task.get_name())
