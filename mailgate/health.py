"""What `/healthz` checks: the store answers, the SMTP listener accepts, ingest keeps up.

Each check is real and bounded by CHECK_SECONDS, and a check that fails says why:

- store: a read (`Store.queues`, which the other checks use) and an empty write transaction
  (the write lock taken and let go, nothing written): intake commits on the writer, so a
  database another process holds locked refuses mail even while reads still answer. A
  store call that hangs is asked once: the next check waits for the same call rather than
  queue another behind it (on the writer, each would hold up the commits after it).
- smtp: the listener is serving, and a connection to it gets the 220 greeting (a full
  listener answers 421). The probe's session is left out of the metrics (`metrics.py`).
- backlog: no message due for ingest has waited longer than `[http]
  health_max_backlog_age`. A message deferred to a later retry (DNS trouble, `[auth]
  retry_for`) is not behind until its retry time, so one sender's broken nameservers do not
  fail the daemon.

The outbox is reported, never judged: mail to a relay that refuses for days waits
legitimately. The body holds counts and ages only, no personal data and no error text from
below (a path, a query): the details go to the log, once when the state changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import structlog

from mailgate import metrics
from mailgate.model import HostPort, Queues
from mailgate.store import Store

log = structlog.get_logger(__name__)

CHECK_SECONDS = 2.0  # each check's bound; /healthz answers within about this
T = TypeVar("T")
_WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 - mapped away


@dataclass(frozen=True, slots=True)
class SmtpListener:
    """Where the SMTP listener is, and whether it is still serving (not draining)."""

    address: HostPort
    serving: Callable[[], bool]


@dataclass(frozen=True, slots=True)
class Report:
    ok: bool
    body: dict[str, Any]


class CheckFailed(Exception):
    """A check's failure; the text is the reason shown in the body."""


class _OneAtATime(Generic[T]):
    """One call under way at a time: while it runs, callers wait for it, each within its
    own bound; once it is done, the next caller starts a new one."""

    def __init__(self, call: Callable[[], Awaitable[T]]) -> None:
        self._call = call
        self._task: asyncio.Future[T] | None = None
        self._error: str | None = None  # the last error, logged once

    async def result(self) -> T:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._call())
        try:
            found = await asyncio.wait_for(asyncio.shield(self._task), CHECK_SECONDS)
        except TimeoutError:
            raise CheckFailed(f"no answer within {CHECK_SECONDS:g} s") from None
        except Exception as exc:  # noqa: BLE001 - any failure is a 503, never a 500
            # The body names the error only: its text may hold a path. The log has it.
            error = f"{type(exc).__name__}: {exc}"
            if error != self._error:
                log.warning("health_store_error", error=error)
            self._error = error
            raise CheckFailed(type(exc).__name__) from None
        self._error = None
        return found


async def _nothing_written(store: Store) -> None:
    await store.ingest(lambda _tx: None)


class Health:
    """The checks behind `/healthz`, and the queue read `/metrics` shares with them."""

    def __init__(self, store: Store, *, smtp: SmtpListener, max_backlog_age: float) -> None:
        self._read = _OneAtATime(store.queues)
        self._write = _OneAtATime(lambda: _nothing_written(store))
        self._smtp = smtp
        self._max_backlog_age = max_backlog_age
        self._failing: tuple[str, ...] | None = None  # the failing checks last time
        self._under_way: asyncio.Future[Report] | None = None

    async def queues(self) -> Queues | None:
        """The store's queues, or None if it did not answer in time."""
        try:
            return await self._read.result()
        except CheckFailed:
            return None

    async def check(self) -> Report:
        """Run the checks; callers that come while they run share them. /healthz answers
        anyone, so many requests at once must not open as many SMTP sessions (each taking
        one of `max_connections`) or write transactions: there is one of each at a time."""
        if self._under_way is None or self._under_way.done():
            self._under_way = asyncio.ensure_future(self._run())
        return await asyncio.shield(self._under_way)

    async def _run(self) -> Report:
        read, write, smtp = await asyncio.gather(
            _outcome(self._read.result()), _outcome(self._write.result()), _outcome(self._probe())
        )
        now = datetime.now(UTC)
        queues = read if isinstance(read, Queues) else None
        checks: dict[str, dict[str, Any]] = {
            "store": _failed(read if isinstance(read, CheckFailed) else write),
            "smtp": _failed(smtp),
            "backlog": self._backlog(queues, now),
        }
        failing = tuple(name for name, check in checks.items() if not check["ok"])
        body: dict[str, Any] = {"status": "failing" if failing else "ok", "checks": checks}
        if queues is not None:
            body["outbox"] = _outbox(queues, now)
        self._log_change(failing, checks)
        return Report(not failing, body)

    def _backlog(self, queues: Queues | None, now: datetime) -> dict[str, Any]:
        if queues is None:
            return {"ok": False, "reason": "the store did not answer"}
        inbound = queues.inbound
        behind = inbound.oldest_due is not None and (
            (now - inbound.oldest_due).total_seconds() > self._max_backlog_age
        )
        found: dict[str, Any] = {
            "ok": not behind,
            "messages": inbound.by_state.get("received", 0),
            # The longest a message due for ingest has waited.
            "waited_seconds": _age(inbound.oldest_due, now),
            "oldest_seconds": _age(inbound.oldest_pending, now),  # deferred ones included
            "max_seconds": self._max_backlog_age,
        }
        if behind:
            found["reason"] = "ingest is behind"
        return found

    async def _probe(self) -> None:
        """Connect to the SMTP listener, read its greeting, say QUIT.

        Raises:
            CheckFailed: not serving, no connection, or no 220 greeting within the bound.
        """
        if not self._smtp.serving():
            raise CheckFailed("not accepting connections")
        host = _WILDCARDS.get(self._smtp.address.host, self._smtp.address.host)
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            sock.setblocking(False)
            sock.bind((host, 0))  # the probe's own address, known before the server sees it
            client = sock.getsockname()
        except OSError as exc:
            sock.close()
            raise CheckFailed(f"cannot connect: {exc.strerror or exc}") from None
        with metrics.health_probe((client[0], client[1])):
            try:
                async with asyncio.timeout(CHECK_SECONDS):
                    greeting = await _greeting(sock, HostPort(host, self._smtp.address.port))
            except TimeoutError:
                raise CheckFailed(f"no greeting within {CHECK_SECONDS:g} s") from None
            except OSError as exc:
                raise CheckFailed(f"cannot connect: {exc.strerror or exc}") from None
        if greeting[:3] != b"220":
            # Our own reply (421: too many connections, descriptors low), never client text.
            code = greeting[:3].decode("ascii", "replace") or "nothing"
            raise CheckFailed(f"greeted with {code}, not 220")

    def _log_change(self, failing: tuple[str, ...], checks: dict[str, dict[str, Any]]) -> None:
        if failing == self._failing:
            return
        if failing:
            reasons = {name: checks[name].get("reason") for name in failing}
            log.warning("health_failing", **reasons)
        elif self._failing is not None:
            log.info("health_ok")
        self._failing = failing


async def _greeting(sock: socket.socket, server: HostPort) -> bytes:
    """Connect `sock` (bound, unconnected) to `server`; its first line, after which QUIT."""
    try:
        await asyncio.get_running_loop().sock_connect(sock, server)
        reader, writer = await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()  # not yet a transport's to close
        raise
    try:
        greeting = await reader.readline()
        if greeting[:3] == b"220":
            writer.write(b"QUIT\r\n")
            await reader.readline()
        return greeting
    finally:
        writer.close()
        with contextlib.suppress(OSError):  # the greeting is what counts
            await writer.wait_closed()


async def _outcome(check: Awaitable[T]) -> T | CheckFailed:
    try:
        return await check
    except CheckFailed as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - a check that breaks fails it: a 503, never a 500
        log.warning("health_check_broke", error=f"{type(exc).__name__}: {exc}")
        return CheckFailed(type(exc).__name__)


def _failed(outcome: object) -> dict[str, Any]:
    if isinstance(outcome, CheckFailed):
        return {"ok": False, "reason": str(outcome)}
    return {"ok": True}


def _outbox(queues: Queues, now: datetime) -> dict[str, Any]:
    outbox = queues.outbox
    return {
        "pending": outbox.by_state.get("queued", 0) + outbox.by_state.get("sending", 0),
        "failed": outbox.by_state.get("failed", 0),
        "oldest_seconds": _age(outbox.oldest_pending, now),
    }


def _age(since: datetime | None, now: datetime) -> float:
    return 0.0 if since is None else round(max(0.0, (now - since).total_seconds()), 1)
