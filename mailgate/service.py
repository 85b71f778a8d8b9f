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
from dataclasses import asdict, dataclass

import structlog

from mailgate.config import Config
from mailgate.errors import StoreError
from mailgate.ingest.prepare import ParserPool
from mailgate.ingest.worker import IngestWorker
from mailgate.intake import Intake
from mailgate.model import HostPort
from mailgate.msgid import MessageIds, daemon_secret
from mailgate.outbound.compose import Composer
from mailgate.outbound.outbox import OutboundWorker, stop_seconds
from mailgate.outbound.templates import Templates
from mailgate.outbound.transports import transport_for
from mailgate.privacy import retention, rights
from mailgate.privacy.requests import PrivacyRequests
from mailgate.smtp import start_smtp
from mailgate.smtp_session import MailgateSMTP
from mailgate.store import SqliteStore, store_for
from mailgate.tickets import Tickets
from mailgate.tls import ServerTls
from mailgate.web import HTTP_STOP_SECONDS, build_app, privacy_hooks, start_web

log = structlog.get_logger(__name__)

INGEST_STOP_SECONDS = 30.0  # past it the batch is cancelled; it rolls back and is redone
STOP_MARGIN = 10.0  # intake's last commit, the parser process's exit, closing the store


def stop_budget(config: Config) -> float:
    """The longest a clean stop takes, in seconds; systemd's TimeoutStopSec must cover it.

    The steps run one after the other: the retention purge's step under way, HTTP, the SMTP
    drain, ingest's batch, the outbound deliveries past DATA (the relay's `outbound.timeout`),
    the rest. `deploy/mailgate.service`
    is checked against this for the default config (tests/test_outbox.py), and the daemon tells
    systemd its own figure when it stops (EXTEND_TIMEOUT_USEC), for configs that need more.
    """
    return (
        HTTP_STOP_SECONDS
        + retention.STOP_SECONDS
        + config.smtp.drain_timeout
        + INGEST_STOP_SECONDS
        + stop_seconds(config.outbound)
        + STOP_MARGIN
    )


@dataclass(frozen=True, slots=True)
class Listening:
    """Where the daemon listens, once it does (ports may have been 0)."""

    smtp: HostPort
    http: HostPort
    smtp_tls: HostPort | None = None  # [smtp] tls_listen


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
    for warning in config.warnings:
        log.warning("config_deprecated", detail=warning)
    # An unreadable or invalid certificate stops the start (exit 78), naming the key. A
    # reload swaps it with `server_tls.load(cert, key)`.
    smtp = config.smtp
    server_tls = ServerTls(smtp.tls_cert, smtp.tls_key) if smtp.tls_cert and smtp.tls_key else None
    secret = daemon_secret(config)
    msgids = MessageIds(secret, config.smtp.hostname)
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(store_for(config))
        if store.adopted:
            log.info("legacy_rows_adopted", **asdict(store.adopted))
        config.storage.attachments.mkdir(parents=True, exist_ok=True)
        await _finish_erasures(store, config)
        requests = PrivacyRequests(store, config, Tickets(config, msgids))
        await _finish_exports(requests)

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
            attachments=config.storage.attachments,
        )
        outbound_task = asyncio.create_task(outbound.run(), name="outbound-worker")
        stack.push_async_callback(
            _stop_worker, outbound, outbound_task, stop_seconds(config.outbound)
        )

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
        stack.push_async_callback(_stop_worker, worker, worker_task, INGEST_STOP_SECONDS)

        intake.start()
        stack.push_async_callback(intake.stop)

        listener = await start_smtp(
            config.smtp,
            intake,
            sessions=sessions,
            spool=config.storage.database.parent,
            attachments=config.storage.attachments,
            tls=server_tls,
        )
        stack.push_async_callback(listener.drain, config.smtp.drain_timeout)

        app = build_app(
            store,
            templates,
            secret=secret,
            base_url=config.http.base_url,
            # Without a privacy address, the route knows no link (404).
            privacy_confirm=privacy_hooks(requests) if config.privacy.address else None,
        )
        web_server = await start_web(config.http, app)
        stack.push_async_callback(web_server.close)
        http_address = web_server.address

        # Retention, daily; stopped first (its step under way finishes or is cut: each is
        # safe to cut).
        purger = retention.Scheduler(config, store)
        purge_task = asyncio.create_task(purger.run(), name="retention")
        stack.push_async_callback(_stop_worker, purger, purge_task, retention.STOP_SECONDS)

        on_ready(Listening(listener.address, http_address, listener.tls_address))
        sd_notify("READY=1")
        tls_address = {"smtp_tls": str(listener.tls_address)} if listener.tls_address else {}
        log.info(
            "daemon_started", smtp=str(listener.address), http=str(http_address), **tls_address
        )
        await shutdown()
        sd_notify(f"STOPPING=1\nEXTEND_TIMEOUT_USEC={int(stop_budget(config) * 1e6)}")
        log.info("daemon_stopping")
    log.info("daemon_stopped")


async def _finish_erasures(store: SqliteStore, config: Config) -> None:
    """Erasures a crash cut short are finished before anything else reads the store. One
    that cannot be finished now (the archive unavailable) does not stop the daemon: the
    person's state stays 'erasing' and the scheduler's purge tries again."""
    try:
        finished = await rights.finish_erasures(store, config)
    except StoreError as exc:
        log.error("erasures_unfinished", error=f"{type(exc).__name__}: {exc}")
        return
    if finished:
        log.info("erasures_finished", count=finished)


async def _finish_exports(requests: PrivacyRequests) -> None:
    """Exports confirmed before a crash are mailed now. One that cannot be made now does not
    stop the daemon: it stays confirmed and the next start tries again."""
    try:
        exported = await requests.finish_confirmed()
    except (StoreError, OSError) as exc:  # the store, or the attachments' disk
        log.error("privacy_exports_unfinished", error=f"{type(exc).__name__}: {exc}")
        return
    if exported:
        log.info("privacy_exports_finished", count=exported)


async def _stop_worker(
    worker: IngestWorker | OutboundWorker | retention.Scheduler,
    task: asyncio.Task[None],
    seconds: float,
) -> None:
    worker.stop()
    try:
        await asyncio.wait_for(task, seconds)
    except TimeoutError:
        # Ingest: the batch rolls back and is redone on start. Outbound: only if writing the
        # cut deliveries' rows hung; rows left 'sending' are sent again on start. Retention:
        # the purge's step is cut; the next run does it again.
        log.warning("worker_cancelled", worker=task.get_name())
