"""The small HTTP surface (aiohttp): verification links and a health check.

Pages come from `templates/page/` (autoescaped). Every response is uncacheable and sends no
Referer onwards, since the path holds a token; tokens are never logged.
"""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web

from mailgate.config import HttpConfig
from mailgate.errors import StoreError
from mailgate.model import HostPort
from mailgate.outbound.templates import Templates
from mailgate.privacy.tokens import token_hash
from mailgate.store import Store
from mailgate.text import clean_line

log = structlog.get_logger(__name__)

MAX_TOKEN_LENGTH = 128
_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
}
_STORE_KEY = web.AppKey("store", Store)
_TEMPLATES_KEY = web.AppKey("templates", Templates)


def build_app(store: Store, templates: Templates) -> web.Application:
    app = web.Application()
    app[_STORE_KEY] = store
    app[_TEMPLATES_KEY] = templates
    # No HEAD: link checkers send it, and it must not use up the token.
    app.router.add_get("/verify/{token}", verify, allow_head=False)
    app.router.add_get("/healthz", healthz)
    return app


def _page(request: web.Request, name: str, status: int, **variables: Any) -> web.Response:
    # Autoescaping keeps markup out; `clean_line` keeps out what escaping lets through: bidi
    # overrides and zero-width characters in stored values (every page variable is one line).
    shown = {k: clean_line(v) if isinstance(v, str) else v for k, v in variables.items()}
    body = request.app[_TEMPLATES_KEY].page(name, shown)
    return web.Response(
        text=body, status=status, content_type="text/html", headers=_SECURITY_HEADERS
    )


async def verify(request: web.Request) -> web.Response:
    """A valid token verifies its requester once; anything else changes nothing."""
    token = request.match_info["token"]
    if len(token) > MAX_TOKEN_LENGTH:
        return _page(request, "token_invalid.html", 404, reason="unknown")
    try:
        outcome, email = await request.app[_STORE_KEY].redeem_token(token_hash(token))
    except StoreError as exc:
        log.error("verification_store_failed", error=str(exc))
        return _page(request, "token_invalid.html", 503, reason="unavailable")
    log.info("verification_link", outcome=outcome)
    if outcome == "verified":
        return _page(request, "verified.html", 200, email=email)
    return _page(
        request, "token_invalid.html", 404 if outcome == "unknown" else 410, reason=outcome
    )


async def healthz(_request: web.Request) -> web.Response:
    return web.Response(text="ok\n", headers=_SECURITY_HEADERS)


async def start_web(config: HttpConfig, app: web.Application) -> tuple[web.AppRunner, HostPort]:
    """Listen on `[http] listen`; return the runner (to clean up) and the bound address."""
    runner = web.AppRunner(app, access_log=None)  # access logs would carry tokens
    await runner.setup()
    site = web.TCPSite(runner, config.listen.host, config.listen.port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    host, port = runner.addresses[0][:2]
    return runner, HostPort(host, port)
