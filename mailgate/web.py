"""The small HTTP surface (aiohttp): confirmation links, a health check, metrics and the
intake API.

`/verify/{token}` (a requester's address) and `/privacy/confirm/{token}` (a privacy request,
when the app is given its hooks) are confirmation routes (`confirm.py`): the GET shows a
button and uses nothing, the POST it sends confirms. Pages come from `templates/page/`
(autoescaped). Every response is uncacheable and sends no
Referer onwards, since the path holds a token; tokens are never logged. The listener limits
what clients can hold: `http.max_connections` at once, `header_timeout` to send a request's
headers, `keepalive_timeout` idle, so HTTP cannot use up the descriptors SMTP needs.

`/healthz` answers 200 or 503 with the checks of `health.py` as JSON, to anyone (a load
balancer, a monitor). `/metrics` (Prometheus text, `metrics.py`) answers only clients in
`[http] metrics_from`, judged by the connection's address alone, and never a request that
came through a proxy (it carries Forwarded or X-Forwarded-For): a reverse proxy on this
host connects from loopback, and would otherwise hand the metrics to the Internet.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server
from prometheus_client import CONTENT_TYPE_LATEST

from mailgate import metrics
from mailgate.api import IntakeApi
from mailgate.config import HttpConfig
from mailgate.confirm import ConfirmationRoute, Confirmed, ConfirmHooks, CsrfKey, Outcome
from mailgate.health import Health
from mailgate.model import HostPort
from mailgate.outbound.templates import Templates
from mailgate.privacy.requests import Done, PrivacyRequests
from mailgate.store import Store
from mailgate.text import clean_line

log = structlog.get_logger(__name__)

HTTP_STOP_SECONDS = 5.0  # a stop waits this long for requests under way
_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    # Forms post back to us only; no other site may frame a page with a button.
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
    ),
}
_TEMPLATES_KEY = web.AppKey("templates", Templates)
_HEALTH_KEY = web.AppKey("health", Health)
_HTTP_KEY = web.AppKey("http", HttpConfig)
# Headers a proxy adds: a request with one came through a proxy, whatever its address.
_PROXIED = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


def build_app(
    store: Store,
    templates: Templates,
    *,
    secret: bytes,
    base_url: str,
    privacy_confirm: ConfirmHooks | None = None,
    api: IntakeApi | None = None,
    health: Health | None = None,
    http: HttpConfig | None = None,
) -> web.Application:
    """The routes; `secret` keys the confirmation forms' CSRF values, `base_url` (the public
    `http.base_url`) names our origin. Without `privacy_confirm`, `/privacy/confirm/{token}`
    knows no token (404); without `api`, there is no `/api/` (`api.py`); without `health`
    and `http` (its `metrics_from`), there is no `/healthz` or `/metrics`."""
    app = web.Application(middlewares=[_headers_received])
    app[_TEMPLATES_KEY] = templates
    csrf = CsrfKey(secret)
    verification = ConfirmationRoute(
        "verification", _verification(store), csrf=csrf, base_url=base_url, page=_page
    )
    app.router.add_routes(verification.routes("/verify/{token}"))
    if privacy_confirm is None:
        app.router.add_route("*", "/privacy/confirm/{token}", _privacy_not_configured)
    else:
        privacy = ConfirmationRoute(
            "privacy", privacy_confirm, csrf=csrf, base_url=base_url, page=_page
        )
        app.router.add_routes(privacy.routes("/privacy/confirm/{token}"))
    if health is not None and http is not None:
        app[_HEALTH_KEY] = health
        app[_HTTP_KEY] = http
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/metrics", prometheus)
    if api is not None:
        app.router.add_routes(api.routes())
    return app


def privacy_hooks(requests: PrivacyRequests) -> ConfirmHooks:
    """The privacy route's hooks: a live link's page names the right asked for; its POST
    carries the request out and says what came of it (`privacy_done.html`)."""

    async def redeem(hashed: str) -> Outcome:
        outcome = await requests.redeem(hashed)
        if isinstance(outcome, Done):
            return Confirmed(
                "privacy_done.html", {"request": outcome.action, "outcome": outcome.outcome}
            )
        return outcome

    return ConfirmHooks(peek=requests.peek, redeem=redeem, details=requests.describe)


def _verification(store: Store) -> ConfirmHooks:
    """A live token verifies its requester once; anything else changes nothing."""

    async def redeem(hashed: str) -> Outcome:
        outcome, email = await store.redeem_token(hashed)
        if outcome == "verified":
            return Confirmed("verified.html", {"email": email or ""})
        return outcome

    return ConfirmHooks(peek=store.peek_token, redeem=redeem)


async def _privacy_not_configured(request: web.Request) -> web.Response:
    return _page(request, "token_invalid.html", 404, purpose="privacy", reason="unknown")


def _page(request: web.Request, name: str, status: int, /, **variables: Any) -> web.Response:
    # Autoescaping keeps markup out; `clean_line` keeps out what escaping lets through: bidi
    # overrides and zero-width characters in stored values (every page variable is one line).
    shown = {k: clean_line(v) if isinstance(v, str) else v for k, v in variables.items()}
    body = request.app[_TEMPLATES_KEY].page(name, shown)
    return web.Response(
        text=body, status=status, content_type="text/html", headers=_SECURITY_HEADERS
    )


async def healthz(request: web.Request) -> web.Response:
    report = await request.app[_HEALTH_KEY].check()
    return web.Response(
        text=json.dumps(report.body) + "\n",  # one line: the newline ends the body
        status=200 if report.ok else 503,
        content_type="application/json",
        headers=_SECURITY_HEADERS,
    )


async def prometheus(request: web.Request) -> web.Response:
    """The metrics, to `[http] metrics_from` only (see the module's docstring)."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
    allowed = request.app[_HTTP_KEY].metrics_allowed(ip)
    if not allowed or any(name in request.headers for name in _PROXIED):
        return web.Response(text="forbidden\n", status=403, headers=_SECURITY_HEADERS)
    queues = await request.app[_HEALTH_KEY].queues()
    return web.Response(
        body=metrics.exposition(queues, now=datetime.now(UTC)),
        headers={**_SECURITY_HEADERS, "Content-Type": CONTENT_TYPE_LATEST},
    )


@web.middleware
async def _headers_received(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tell the connection that a request's headers are complete: its header timer stops."""
    if isinstance(request.protocol, _Connection):
        request.protocol.headers_received()
    return await handler(request)


_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class _Gate:
    """The HTTP connections open at once, against `http.max_connections`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.refusing = False  # logged once each time the limit is reached, not per connection


class _Connection(RequestHandler):
    """aiohttp's HTTP/1.1 protocol with the two limits it does not have.

    Every connection holds a file descriptor, and aiohttp takes as many as clients open: 1,100
    idle ones used up the process's descriptors and the SMTP listener could accept nothing. So
    a connection past `max_connections` is answered 503 and closed at once, before aiohttp
    knows of it. And a new connection must complete its request headers within
    `header_timeout` (slowloris); aiohttp's keep-alive timer (`keepalive_timeout`) closes it
    when idle between requests, and an unfinished request after the first. A subclass rather
    than a wrapper around aiohttp's protocol factory, since a wrapper would have to forward
    every protocol method to count the close.
    """

    def __init__(
        self, manager: Server, *, gate: _Gate, header_timeout: float, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._gate = gate
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        gate = self._gate
        if gate.open >= gate.limit:
            if not gate.refusing:
                log.warning("http_connection_limit", max_connections=gate.limit)
            gate.refusing = True
            cast(asyncio.Transport, transport).write(_BUSY)
            transport.close()  # sends the 503, then closes: the descriptor is free again
            return
        gate.open += 1
        gate.refusing = False
        self._counted = True
        super().connection_made(transport)
        loop = asyncio.get_running_loop()
        self._header_timer = loop.call_later(self._header_timeout, self._headers_too_slow)

    def headers_received(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._counted:
            return  # refused: aiohttp never saw it
        self._counted = False
        self._gate.open -= 1
        self.headers_received()  # stops the timer
        super().connection_lost(exc)


@dataclass
class WebServer:
    """The listening HTTP surface; `close()` stops it."""

    address: HostPort
    _runner: web.AppRunner
    _listener: asyncio.Server

    async def close(self) -> None:
        """Stop accepting, close idle connections, give requests under way HTTP_STOP_SECONDS."""
        self._listener.close()
        await self._runner.cleanup()
        await self._listener.wait_closed()


async def start_web(config: HttpConfig, app: web.Application) -> WebServer:
    """Listen on `[http] listen` with the connection limits of `_Connection`.

    The listener is ours (`loop.create_server`), not aiohttp's TCPSite, so that the protocol
    is `_Connection`; the runner still serves the app and shuts its connections down.
    """
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=HTTP_STOP_SECONDS)
    await runner.setup()  # access logs would carry tokens: none
    manager = runner.server
    assert manager is not None
    gate = _Gate(config.max_connections)
    options: dict[str, Any] = {"keepalive_timeout": config.keepalive_timeout, "access_log": None}

    def connection() -> _Connection:
        return _Connection(
            manager,
            gate=gate,
            header_timeout=config.header_timeout,
            loop=asyncio.get_running_loop(),
            **options,
        )

    try:
        listener = await asyncio.get_running_loop().create_server(
            connection, config.listen.host, config.listen.port
        )
    except OSError:
        await runner.cleanup()
        raise
    host, port = listener.sockets[0].getsockname()[:2]
    return WebServer(HostPort(host, port), runner, listener)
