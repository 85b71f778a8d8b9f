"""Confirmation links: the GET shows a button, only the POST it sends acts.

A link in a mail (`/verify/{token}`, `/privacy/confirm/{token}`) is opened by more than its
reader: mail filters and link scanners fetch every URL they find, some before the mail is
even delivered. So a link's GET (and HEAD) never uses its token. It looks (`peek`): an
unknown token is 404, a used, expired or revoked one 410, a live one 200 with a page holding
a form and one button. Pressing the button POSTs the form back to the same URL, and only that
POST uses the token (`redeem`). A scanner that prefetches confirms nothing: it only GETs.

The POST must carry the page's hidden field, a CSRF value: HMAC-SHA256, under a key derived
from the daemon's secret (`outbound.secret_file`), of the route's purpose label and the SHA-256
of the path's token, compared in constant time. No session and no cookie: the value is bound
to the token in the path, so anyone who could GET the page can POST it, and nobody else
can make it. The purpose label keeps one route's value from passing on another. A form on
another site cannot confirm: it lacks that value (it cannot read our page, the same-origin
policy forbids it, and it cannot compute it without the secret), and when the browser names
the request's origin, a cross-site POST is refused (403) before the form is even read:

- `Sec-Fetch-Site` other than `same-origin` or `none` (the user's own navigation) is refused;
- `Origin` other than ours (`http.base_url`'s, or the one the request was addressed to,
  `Host`) is refused. `Origin: null` says nothing: browsers send it for our own form,
  since our pages set `Referrer-Policy: no-referrer` (Fetch, "append a request Origin
  header"); a sandboxed frame sends it too, and still lacks the CSRF value.

What stays true: the token in the path is the capability. Whoever holds the link can
confirm, by design; the button only asks that a person (or a program told to do so) press
it. A POST without the field, with a wrong one, from another site: 403, nothing used. The
body must be `application/x-www-form-urlencoded` (415 otherwise) of at most
`MAX_FORM_BYTES` (413); a POST without a body has no field (403). The pages send
`form-action 'self'` (CSP), so the form can only go back to us.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from urllib.parse import parse_qsl, quote, urlsplit

import structlog
from aiohttp import web

from mailgate.errors import MailgateError, StoreError
from mailgate.privacy.tokens import token_hash
from mailgate.store.base import TokenState

log = structlog.get_logger(__name__)

MAX_TOKEN_LENGTH = 128  # a longer one is unknown, looked up nowhere
MAX_FORM_BYTES = 4096  # the form holds one field of 64 characters
MAX_FORM_FIELDS = 16
CSRF_FIELD = "csrf"  # the hidden field's name in templates/page/confirm.html
_KEY_LABEL = b"mailgate confirmation csrf v1"  # the CSRF key is the secret's, for this only
_FORM = "application/x-www-form-urlencoded"

Refusal = Literal["used", "expired", "revoked", "unknown"]


@dataclass(frozen=True, slots=True)
class Confirmed:
    """The token was used: show `page` (a template under `templates/page/`), status 200."""

    page: str
    variables: Mapping[str, Any] = field(default_factory=dict)


Outcome = Confirmed | Refusal


@dataclass(frozen=True, slots=True)
class ConfirmHooks:
    """What a confirmation route does with the SHA-256 of its path's token.

    `peek` tells its state and changes nothing (GET, HEAD); `redeem` uses it (the POST, once
    its checks pass) and says what to show; `details`, if given, reads what the page of a
    live token may say besides (variables of `confirm.html`; never personal data). Each may
    raise StoreError: the page is a 503.
    """

    peek: Callable[[str], Awaitable[TokenState]]
    redeem: Callable[[str], Awaitable[Outcome]]
    details: Callable[[str], Awaitable[Mapping[str, Any]]] | None = None


class Page(Protocol):
    """Render `templates/page/{name}` with the security headers (`web._page`)."""

    def __call__(
        self, request: web.Request, name: str, status: int, /, **variables: Any
    ) -> web.Response: ...


class CsrfKey:
    """The CSRF values of confirmation forms, from the daemon's secret."""

    def __init__(self, secret: bytes) -> None:
        self._key = hmac.new(secret, _KEY_LABEL, hashlib.sha256).digest()

    def value(self, purpose: str, token_hash: str) -> str:
        message = f"{purpose}\0{token_hash}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def check(self, purpose: str, token_hash: str, given: str) -> bool:
        """Constant time in the value given."""
        expected = self.value(purpose, token_hash).encode()
        return hmac.compare_digest(expected, given.encode("utf-8", "surrogateescape"))


_Origin = tuple[str, str, int]


def _origin(url: str) -> _Origin | None:
    """(scheme, host, port) of an http(s) URL, default ports filled in; None if it is none."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts.scheme, parts.hostname.lower(), port or (443 if parts.scheme == "https" else 80)


class _Refused(MailgateError):
    """A POST refused before its token is used: the status, the page's reason, and (for the
    log) why, when the page's reason does not say it."""

    def __init__(self, status: int, reason: str, why: str | None = None) -> None:
        super().__init__(status, reason)
        self.status, self.reason, self.why = status, reason, why or reason


class ConfirmationRoute:
    """GET/HEAD `show` and POST `act` for one purpose; see the module's docstring."""

    def __init__(
        self,
        purpose: str,
        hooks: ConfirmHooks,
        *,
        csrf: CsrfKey,
        base_url: str,
        page: Page,
    ) -> None:
        self.purpose = purpose
        self._hooks = hooks
        self._csrf = csrf
        self._public = _origin(base_url)
        self._page = page

    def routes(self, path: str) -> list[web.RouteDef]:
        """`path` holds `{token}`; HEAD is answered as GET (aiohttp sends no body)."""
        return [web.get(path, self.show, allow_head=True), web.post(path, self.act)]

    def _refusal(self, request: web.Request, reason: Refusal) -> web.Response:
        status = 404 if reason == "unknown" else 410
        return self._page(
            request, "token_invalid.html", status, purpose=self.purpose, reason=reason
        )

    def _unavailable(self, request: web.Request, exc: StoreError) -> web.Response:
        log.error("confirmation_store_failed", purpose=self.purpose, error=str(exc))
        return self._page(
            request, "token_invalid.html", 503, purpose=self.purpose, reason="unavailable"
        )

    async def show(self, request: web.Request) -> web.Response:
        """The token's state, and for a live one the form; nothing is used."""
        token = request.match_info["token"]
        if len(token) > MAX_TOKEN_LENGTH:
            return self._refusal(request, "unknown")
        hashed = token_hash(token)
        try:
            state = await self._hooks.peek(hashed)
        except StoreError as exc:
            return self._unavailable(request, exc)
        log.info("confirmation_shown", purpose=self.purpose, state=state)
        if state != "live":
            return self._refusal(request, state)
        try:
            details = await self._hooks.details(hashed) if self._hooks.details else {}
        except StoreError as exc:
            return self._unavailable(request, exc)
        return self._page(
            request,
            "confirm.html",
            200,
            **details,
            purpose=self.purpose,
            # Relative to /…/{token}: the same URL, whatever prefix a proxy serves us under.
            action="./" + quote(token, safe=""),
            csrf=self._csrf.value(self.purpose, hashed),
        )

    async def act(self, request: web.Request) -> web.Response:
        """Use the token if the POST came from our form; otherwise change nothing."""
        token = request.match_info["token"]
        if len(token) > MAX_TOKEN_LENGTH:
            return self._refusal(request, "unknown")
        hashed = token_hash(token)
        try:
            if self._cross_site(request):
                raise _Refused(403, "forbidden", "cross_site")
            given = await _csrf_field(request)
            if given is None:
                raise _Refused(403, "forbidden", "no_csrf")
            if not self._csrf.check(self.purpose, hashed, given):
                raise _Refused(403, "forbidden", "wrong_csrf")
        except _Refused as refused:
            log.info("confirmation_refused", purpose=self.purpose, reason=refused.why)
            return self._page(
                request,
                "not_confirmed.html",
                refused.status,
                purpose=self.purpose,
                reason=refused.reason,
            )
        try:
            outcome = await self._hooks.redeem(hashed)
        except StoreError as exc:
            return self._unavailable(request, exc)
        if isinstance(outcome, Confirmed):
            log.info("confirmation_used", purpose=self.purpose, outcome="confirmed")
            return self._page(request, outcome.page, 200, **outcome.variables)
        log.info("confirmation_used", purpose=self.purpose, outcome=outcome)
        return self._refusal(request, outcome)

    def _cross_site(self, request: web.Request) -> bool:
        """What the browser says of the request's origin, when it says anything."""
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None and site.strip().lower() not in ("same-origin", "none"):
            return True
        origin = request.headers.get("Origin")
        if origin is None or origin.strip() == "null":
            return False  # not named: the CSRF value decides
        given = _origin(origin.strip())
        ours = {self._public, _origin(f"{request.scheme}://{request.host}")}
        return given is None or given not in ours


async def _csrf_field(request: web.Request) -> str | None:
    """The CSRF field of a bounded urlencoded body; None if it has none (or several).

    Raises:
        _Refused: 415 not a urlencoded form, 413 too large, 400 unreadable.
    """
    if not request.body_exists:
        return None
    if request.content_type != _FORM:
        raise _Refused(415, "unsupported")
    if request.content_length is not None and request.content_length > MAX_FORM_BYTES:
        raise _Refused(413, "too_large")
    body = bytearray()
    while len(body) <= MAX_FORM_BYTES:  # chunked bodies have no length to check first
        chunk = await request.content.read(MAX_FORM_BYTES + 1 - len(body))
        if not chunk:
            break
        body += chunk
    if len(body) > MAX_FORM_BYTES:
        raise _Refused(413, "too_large")
    try:
        fields = parse_qsl(
            body.decode("ascii"),
            keep_blank_values=True,
            max_num_fields=MAX_FORM_FIELDS,
            errors="strict",
        )
    except ValueError:  # not ASCII, not UTF-8 once decoded, too many fields
        raise _Refused(400, "malformed") from None
    values = [value for name, value in fields if name == CSRF_FIELD]
    return values[0] if len(values) == 1 else None
