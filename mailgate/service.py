"""Wiring and lifecycle: start in order, tell systemd, drain and stop in reverse.

The shutdown trigger comes from the caller (signals in the CLI, an Event in tests), as in
hypercorn's `serve(..., shutdown_trigger=...)`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass

import structlog

from mailgate.api import ApiSettings, IntakeApi
from mailgate.config import Config
from mailgate.errors import ConfigError, StoreError
from mailgate.health import Health, SmtpListener
from mailgate.ingest.prepare import ParserPool
from mailgate.ingest.worker import IngestWorker
from mailgate.intake import Intake
from mailgate.live import Live
from mailgate.model import HostPort, Queues
from mailgate.msgid import MessageIds, daemon_secret
from mailgate.outbound.compose import Composer
from mailgate.outbound.outbox import OutboundWorker, stop_seconds
from mailgate.outbound.templates import Templates
from mailgate.outbound.transports import transport_for
from mailgate.privacy import retention, rights
from mailgate.privacy.requests import PrivacyRequests
from mailgate.reload import reload
from mailgate.smtp import start_smtp
from mailgate.smtp_session import MailgateSMTP
from mailgate.store import SqliteStore, store_for
from mailgate.systemd import notify, reloading, under_systemd, watchdog_interval
from mailgate.tickets import Tickets
from mailgate.tls import ServerTls
from mailgate.web import HTTP_STOP_SECONDS, build_app, privacy_hooks, start_web

log = structlog.get_logger(__name__)

INGEST_STOP_SECONDS = 30.0  # past it the batch is cancelled; it rolls back and is redone
STOP_MARGIN = 10.0  # intake's last commit, the parser process's exit, closing the store
STATUS_SECONDS = 5.0  # how often systemd's STATUS= line is refreshed (one cheap query)


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


async def serve(
    config: Config,
    *,
    shutdown: Callable[[], Awaitable[object]],
    on_ready: Callable[[Listening], None] = lambda _: None,
    reloads: asyncio.Event | None = None,
) -> None:
    """Run the daemon until `shutdown()` returns (what it returns, a signal's name, is
    logged); each time `reloads` is set, reload the config file and the templates."""
    live = Live(config)
    templates = Templates(config.outbound.templates)
    templates.check()  # a broken template stops the start (exit 78), naming file and line
    for warning in config.warnings:
        log.warning("config_deprecated", detail=warning)
    # An unreadable or invalid certificate stops the start (exit 78), naming the key; a
    # reload that keeps TLS on swaps it for the next handshakes.
    smtp = config.smtp
    server_tls = ServerTls(smtp.tls_cert, smtp.tls_key) if smtp.tls_cert and smtp.tls_key else None
    if server_tls is not None:
        live.on_change(lambda new: _swap_certificate(server_tls, new))
    secret = daemon_secret(config)
    msgids = MessageIds(secret, config.smtp.hostname)
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(store_for(config))
        if store.adopted:
            log.info("legacy_rows_adopted", **asdict(store.adopted))
        config.storage.attachments.mkdir(parents=True, exist_ok=True)
        await _finish_erasures(store, config)
        tickets = Tickets(live, msgids)
        requests = PrivacyRequests(store, config, tickets)
        await _finish_exports(requests)

        committed, mail_queued = asyncio.Event(), asyncio.Event()
        sessions: set[MailgateSMTP] = set()
        intake = Intake(store, on_committed=committed, senders=lambda: len(sessions))

        async def status() -> str:
            return await _status(store, sessions)

        # Pings from here to the end of the stop (the drain included), while the store is open.
        pulse = asyncio.create_task(_keep_alive(status), name="systemd-watchdog")
        stack.push_async_callback(_cancel, pulse)

        outbound = OutboundWorker(
            store,
            Composer(config, templates),
            transport_for(config.outbound, local_hostname=config.smtp.hostname),
            config.outbound,
            wake=mail_queued,
            intake_busy=intake.busy,
            attachments=config.storage.attachments,
        )
        await outbound.recover()  # before READY=1: no row stays 'sending' from a crash
        outbound_task = asyncio.create_task(outbound.run(), name="outbound-worker")
        stack.push_async_callback(
            _stop_worker, outbound, outbound_task, stop_seconds(config.outbound)
        )

        parser = ParserPool()
        stack.callback(parser.close)
        await parser.start()
        worker = IngestWorker(
            store,
            live,
            parser=parser,
            msgids=msgids,
            wake=committed,
            mail_queued=mail_queued,
            intake_busy=intake.busy,
        )
        # Started before listening: it first ingests what a crash left 'received' (those rows
        # are its queue: READY=1 does not wait for them, however many there are).
        worker_task = asyncio.create_task(worker.run(), name="ingest-worker")
        stack.push_async_callback(_stop_worker, worker, worker_task, INGEST_STOP_SECONDS)

        intake.start()
        stack.push_async_callback(intake.stop)

        listener = await start_smtp(
            live,
            intake,
            sessions=sessions,
            spool=config.storage.database.parent,
            attachments=config.storage.attachments,
            tls=server_tls,
        )
        stack.push_async_callback(lambda: listener.drain(live.current.smtp.drain_timeout))

        app = build_app(
            store,
            templates,
            secret=secret,
            base_url=config.http.base_url,
            # Without a privacy address, the route knows no link (404).
            privacy_confirm=privacy_hooks(requests) if config.privacy.address else None,
            # Read at each request: a reload's tokens and limits hold for the next one.
            api=IntakeApi(
                store,
                tickets,
                settings=lambda: ApiSettings.of(live.current),
                base_url=config.http.base_url,
                mail_queued=mail_queued,
            ),
            health=Health(
                store,
                smtp=SmtpListener(listener.address, listener.server.is_serving),
                max_backlog_age=config.http.health_max_backlog_age,
            ),
            http=config.http,
        )
        web_server = await start_web(config.http, app)
        stack.push_async_callback(web_server.close)
        http_address = web_server.address

        # Retention, daily; stopped first (its step under way finishes or is cut: each is
        # safe to cut).
        purger = retention.Scheduler(live, store)
        purge_task = asyncio.create_task(purger.run(), name="retention")
        stack.push_async_callback(_stop_worker, purger, purge_task, retention.STOP_SECONDS)

        on_ready(Listening(listener.address, http_address, listener.tls_address))
        notify("READY=1", f"STATUS={await status()}")
        tls_address = {"smtp_tls": str(listener.tls_address)} if listener.tls_address else {}
        log.info(
            "daemon_started", smtp=str(listener.address), http=str(http_address), **tls_address
        )
        reloader = asyncio.create_task(_reload_on(reloads, live, templates, status), name="reload")
        reason = await shutdown()
        await _cancel(reloader)  # a reload under way is cut before it applies: the old stays
        notify("STOPPING=1", f"EXTEND_TIMEOUT_USEC={int(stop_budget(live.current) * 1e6)}")
        log.info("daemon_stopping", **({"signal": reason} if isinstance(reason, str) else {}))
    log.info("daemon_stopped")


def status_line(queues: Queues, sessions: int) -> str:
    """systemd's STATUS=: the work waiting, as `systemctl status` shows it."""
    inbound, outbox = queues.inbound.by_state, queues.outbox.by_state
    return (
        f"{sessions} SMTP sessions; inbound {inbound.get('received', 0)} to ingest; "
        f"outbox {outbox.get('queued', 0)} queued, {outbox.get('sending', 0)} sending, "
        f"{outbox.get('failed', 0)} failed"
    )


async def _status(store: SqliteStore, sessions: set[MailgateSMTP]) -> str:
    try:
        return status_line(await store.queues(), len(sessions))
    except StoreError as exc:
        return f"{len(sessions)} SMTP sessions; store unavailable ({type(exc).__name__})"


async def _keep_alive(status: Callable[[], Awaitable[str]]) -> None:
    """WATCHDOG=1 at half of WATCHDOG_USEC and a fresh STATUS= every STATUS_SECONDS, sent
    from the event loop: a loop that is stuck sends no ping and systemd restarts the daemon.
    A status query slower than the ping interval is given up (the pings must go on)."""
    if not under_systemd():
        return
    ping = watchdog_interval()
    tick = min(ping, STATUS_SECONDS) if ping else STATUS_SECONDS
    loop = asyncio.get_running_loop()
    next_status = loop.time() + STATUS_SECONDS
    while True:
        await asyncio.sleep(tick)
        if ping:
            notify("WATCHDOG=1")
        if loop.time() >= next_status:
            next_status = loop.time() + STATUS_SECONDS
            try:
                notify(f"STATUS={await asyncio.wait_for(status(), tick)}")
            except TimeoutError:
                pass


async def _reload_on(
    reloads: asyncio.Event | None,
    live: Live[Config],
    templates: Templates,
    status: Callable[[], Awaitable[str]],
) -> None:
    """Reload each time `reloads` is set (SIGHUPs that come during a reload make one more)."""
    if reloads is None:
        return
    while True:
        await reloads.wait()
        reloads.clear()
        notify(reloading())
        try:
            await reload(live, templates)
        except Exception:  # a reload's own fault must not stop the daemon
            log.exception("reload_failed")
        notify("READY=1", f"STATUS={await status()}")


def _swap_certificate(server_tls: ServerTls, config: Config) -> None:
    """A reload's callback: the new config's certificate from the next handshake on.
    `reload` loaded it once already, so only a file changed in between can fail here:
    logged, and the certificate in use stays. (TLS is not switched on or off live:
    `reload.merge` keeps such a change for a restart.)"""
    smtp = config.smtp
    if smtp.tls_cert is None or smtp.tls_key is None:
        return
    try:
        server_tls.load(smtp.tls_cert, smtp.tls_key)
    except ConfigError as exc:
        log.error("tls_certificate_kept", error=str(exc))


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


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
