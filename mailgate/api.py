"""The chat-bot intake API: `POST /api/tickets` files a request through the ticket rules.

A bot holding a token (`[http] api_tokens` lists their SHA-256 digests) sends what a person
typed: name, address, subject, text, and optionally the ticket it follows up. The address is
the person's word, not the bot's proof: `Tickets.open_or_follow_up` files it as an
unauthenticated mail from that address would be (the verification mail while unverified, the
acknowledgement of a new ticket, within the automatic-mail limits), and a `ticket_id` joins
only a ticket whose requester is that address. Any other `ticket_id`, someone else's or none
at all, opens a new ticket and is answered alike (201, the new id), so the API tells no more
of other people's tickets than mail does. What a forged From can do by mail, a bot can do
here; nothing beyond it.

Answers are JSON, errors `{"error": ..., "field": ...}`; the OpenAPI document at
`/api/openapi.json` describes them and is built from the same limits the checks use. With no
token configured the API is off: every `/api/` path answers 404, as if it did not exist.
The token bucket of each token lives in memory: a restart refills it.
"""

from __future__ import annotations

import asyncio
import json
import json.scanner
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn

import structlog
from aiohttp import web

from mailgate.addresses import EmailNotValidError, validate_address
from mailgate.config import Config
from mailgate.errors import StoreError
from mailgate.model import Address
from mailgate.privacy.tokens import token_hash
from mailgate.store import Store
from mailgate.text import clean_body
from mailgate.tickets import Tickets

log = structlog.get_logger(__name__)

MAX_NAME = 200  # characters (code points, as JSON Schema's maxLength counts)
MAX_SUBJECT = 250
MAX_EMAIL = 254  # RFC 5321's path limit less its angle brackets
MAX_TICKET_ID = 2**63 - 1  # SQLite's integer
STORE_RETRY_AFTER = 30  # seconds, when the store is unavailable
# Bodies read and filed at once, over all tokens: each may hold a few times its size in
# memory while it is parsed (up to `smtp.max_message_size`), so a burst of the rate limit's
# requests must wait its turn. More get 503 with Retry-After at once.
BODIES_AT_ONCE = 4
BUSY_RETRY_AFTER = 1  # seconds
# A body must arrive within this many seconds in all, and never pause longer than
# `http.header_timeout` (the slowloris guard of the headers): a trickling client holds a
# slot that long at most.
BODY_SECONDS = 60.0
_FIELDS = ("name", "email", "subject", "body", "ticket_id")
_REQUIRED = ("name", "email", "subject", "body")
_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")  # RFC 6750 section 2.1, b64token


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """What the API reads of the config, for each request (so a reload can change it)."""

    tokens: frozenset[str]  # accepted digests; empty: the API is off
    rate_limit: int  # requests per minute per token
    max_body: int  # bytes of a request body (`smtp.max_message_size`)
    body_pause: float  # longest pause while the body arrives (`http.header_timeout`)

    @classmethod
    def of(cls, config: Config) -> ApiSettings:
        return cls(
            config.http.api_tokens,
            config.http.api_rate_limit,
            config.smtp.max_message_size,
            config.http.header_timeout,
        )


class RateLimiter:
    """A token bucket per API token: `rate_limit` requests at once, refilled at that many per
    minute. Only digests the config accepts get a bucket, so memory is bounded by the config."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # digest: (tokens, when)

    def take(self, digest: str, per_minute: int) -> float:
        """Take one request from `digest`'s bucket: 0 if allowed, else the seconds to wait."""
        now = self._clock()
        tokens, since = self._buckets.get(digest, (float(per_minute), now))
        tokens = min(float(per_minute), tokens + (now - since) * per_minute / 60)
        if tokens < 1:
            self._buckets[digest] = (tokens, now)
            return (1 - tokens) * 60 / per_minute
        self._buckets[digest] = (tokens - 1, now)
        return 0.0


class _Refused(Exception):
    """A request answered with an error; `field` names the body field at fault."""

    def __init__(
        self,
        status: int,
        error: str,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status, error)
        self.status, self.error, self.field = status, error, field
        self.headers = dict(headers or {})


def _refuse(status: int, error: str, *, field: str | None = None) -> NoReturn:
    raise _Refused(status, error, field=field)


@dataclass(frozen=True, slots=True)
class _Request:
    requester: Address
    subject: str
    body: str
    ticket_id: int | None


class IntakeApi:
    """The routes under `/api/`; `settings` is read for each request (reload swaps it)."""

    def __init__(
        self,
        store: Store,
        tickets: Tickets,
        *,
        settings: Callable[[], ApiSettings],
        base_url: str,
        mail_queued: asyncio.Event | None = None,
    ) -> None:
        self._store = store
        self._tickets = tickets
        self._settings = settings
        self._base_url = base_url
        self._mail_queued = mail_queued or asyncio.Event()
        self._limiter = RateLimiter()
        self._bodies = asyncio.Semaphore(BODIES_AT_ONCE)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.route("*", "/api/tickets", self._tickets_route),
            web.route("*", "/api/openapi.json", self._openapi_route),
        ]

    async def _openapi_route(self, request: web.Request) -> web.Response:
        settings = self._settings()
        if not settings.tokens:
            return _error(404, "not found")
        if request.method not in ("GET", "HEAD"):
            return _error(405, "method not allowed", headers={"Allow": "GET, HEAD"})
        return _json(200, openapi_document(settings, self._base_url))

    async def _tickets_route(self, request: web.Request) -> web.Response:
        settings = self._settings()
        try:
            if not settings.tokens:
                _refuse(404, "not found")
            if request.method != "POST":
                raise _Refused(405, "method not allowed", headers={"Allow": "POST"})
            digest = self._authorise(request, settings)
            if self._bodies.locked():
                raise _Refused(
                    503,
                    "busy with other requests; try again shortly",
                    headers={"Retry-After": str(BUSY_RETRY_AFTER)},
                )
            async with self._bodies:
                parsed = _validate(await _read_json(request, settings))
                filed = await self._store.ingest(
                    lambda tx: self._tickets.open_or_follow_up(
                        tx,
                        parsed.requester,
                        parsed.subject,
                        parsed.body,
                        parsed.ticket_id,
                        at=datetime.now(UTC),
                    )
                )
        except _Refused as refused:
            # An unknown field's name is the client's text: logged as such, not as given.
            field = refused.field if refused.field in (None, *_FIELDS) else "(unknown)"
            log.info("api_request_refused", status=refused.status, field=field)
            return _error(
                refused.status, refused.error, field=refused.field, headers=refused.headers
            )
        except StoreError as exc:
            log.warning("api_store_unavailable", error=type(exc).__name__)
            return _error(
                503,
                "the ticket store is unavailable; try again later",
                headers={"Retry-After": str(STORE_RETRY_AFTER)},
            )
        if filed.mails_queued:
            self._mail_queued.set()
        log.info(
            "api_ticket_filed",
            ticket_id=filed.ticket_id,
            created=filed.created,
            mails_queued=filed.mails_queued,
            token=digest[:8],  # names the token to its operator, tells no one else anything
        )
        return _json(201, {"ticket_id": filed.ticket_id})

    def _authorise(self, request: web.Request, settings: ApiSettings) -> str:
        """The digest of the request's bearer token, once it is accepted and within its rate.

        The digest is looked up in a set: the lookup's time depends on the digest, not on the
        token, and finding tokens whose digests share a prefix with an accepted one is a
        preimage search, so timing tells an attacker nothing they can use.
        """
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        challenge = 'Bearer realm="mailgate"'
        if not scheme:
            raise _Refused(
                401, "a bearer token is required", headers={"WWW-Authenticate": challenge}
            )
        token = token.strip()
        digest = token_hash(token) if _BEARER_TOKEN.fullmatch(token) else ""
        if scheme.lower() != "bearer" or digest not in settings.tokens:
            raise _Refused(
                401,
                "the bearer token is not accepted",
                headers={"WWW-Authenticate": f'{challenge}, error="invalid_token"'},
            )
        wait = self._limiter.take(digest, settings.rate_limit)
        if wait:
            raise _Refused(429, "too many requests", headers={"Retry-After": str(math.ceil(wait))})
        return digest


async def _read_json(request: web.Request, settings: ApiSettings) -> dict[str, Any]:
    """The body's JSON object, read up to `settings.max_body` bytes (this route's limit, not
    aiohttp's `client_max_size`, which keeps guarding the small forms of the other routes),
    within BODY_SECONDS and without a pause longer than `settings.body_pause` (408)."""
    if request.content_type != "application/json" or (
        request.charset is not None and request.charset.lower() not in ("utf-8", "utf8")
    ):
        _refuse(415, "the body must be application/json (UTF-8)")
    limit = settings.max_body
    if request.content_length is not None and request.content_length > limit:
        _refuse(413, f"the body is larger than {limit} bytes")
    raw = bytearray()
    try:
        async with asyncio.timeout(BODY_SECONDS):
            while chunk := await asyncio.wait_for(request.content.readany(), settings.body_pause):
                raw += chunk
                if len(raw) > limit:
                    _refuse(413, f"the body is larger than {limit} bytes")
    except TimeoutError:
        _refuse(408, "the body did not arrive in time")
    try:
        return _flat_object(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, StopIteration):
        _refuse(400, "the body is not valid JSON")


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


_SPACE = re.compile(r"[ \t\n\r]*")  # RFC 8259's whitespace
# JSON's own parser for one value at a time; NaN and Infinity are not JSON.
_VALUE: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(
    json.JSONDecoder(parse_constant=_no_constant)  # type: ignore[arg-type] # typeshed's is wrong
)
_KEY: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]


def _skip(text: str, at: int) -> int:
    """The index past the whitespace at `at`."""
    return _SPACE.match(text, at).end()  # type: ignore[union-attr] # matches even nothing


def _flat_object(text: str) -> dict[str, Any]:
    """The JSON object `text` holds, member by member; a member that is an object or an
    array is refused unread, since no field takes one.

    `json.loads` of the whole document would cost up to 150 times its size in memory and
    seconds of the event loop (8 MiB of `[[[...]]]` 900 deep: 400 MB, 2 s; a million keys,
    a million `{}`): one request could stall SMTP and take the daemon's memory. Here each
    member is read once, and the work ends at the first member no field takes.

    Raises:
        ValueError, StopIteration: not JSON (a key twice is not either: which one was meant?).
    """
    at = _skip(text, 0)
    if text[at : at + 1] != "{":
        _refuse(400, "the body must be a JSON object")
    found: dict[str, Any] = {}
    at = _skip(text, at + 1)
    if text[at : at + 1] == "}":
        at += 1
    else:
        separator = ","
        while separator == ",":
            if text[at : at + 1] != '"':
                raise ValueError("a key must be a string")
            key, at = _KEY(text, at + 1)
            at = _skip(text, at)
            if text[at : at + 1] != ":":
                raise ValueError("a colon must follow a key")
            at = _skip(text, at + 1)
            if key not in _FIELDS:
                _refuse(400, "unknown field", field=key[:100])
            if key in found:
                raise ValueError("a key appears twice")
            if text[at : at + 1] in ("[", "{"):
                _wrong_type(key)
            found[key], at = _VALUE(text, at)
            at = _skip(text, at)
            separator, at = text[at : at + 1], at + 1
            if separator not in (",", "}"):
                raise ValueError("a comma or a closing brace must follow a value")
            at = _skip(text, at) if separator == "," else at
    if _skip(text, at) != len(text):
        raise ValueError("text after the object")
    return found


def _validate(value: dict[str, Any]) -> _Request:
    """The request's fields (known ones only: `_flat_object`), checked exactly as the
    OpenAPI document says."""
    for key in _REQUIRED:
        if key not in value:
            _refuse(400, "missing field", field=key)
    name = _string(value, "name", 0, MAX_NAME)
    email = _string(value, "email", 1, MAX_EMAIL)
    try:
        email = validate_address(email)
    except EmailNotValidError:
        _refuse(400, "not a valid address", field="email")
    subject = _string(value, "subject", 1, MAX_SUBJECT)
    body = _string(value, "body", 1, None)
    if not clean_body(body).strip():
        _refuse(400, "must hold text", field="body")
    ticket_id = value.get("ticket_id")
    if "ticket_id" in value and (
        isinstance(ticket_id, bool)
        or not isinstance(ticket_id, int)
        or not 1 <= ticket_id <= MAX_TICKET_ID
    ):
        _wrong_type("ticket_id")
    # Name and subject are cleaned by the rules (`text.clean_line`: CR, LF, controls, bidi).
    return _Request(Address(email, name or None), subject, body, ticket_id)


def _string(value: dict[str, Any], key: str, least: int, most: int | None) -> str:
    text = value[key]
    if not isinstance(text, str):
        _wrong_type(key)
    if len(text) < least or (most is not None and len(text) > most):
        limits = f"{least} to {most}" if most is not None else f"at least {least}"
        _refuse(400, f"must be {limits} characters long", field=key)
    try:
        text.encode("utf-8")  # JSON lets `\ud800` through alone; the store could not keep it
    except UnicodeEncodeError:
        _refuse(400, "must be text (a lone surrogate is not)", field=key)
    return text


def _wrong_type(key: str) -> NoReturn:
    if key == "ticket_id":
        _refuse(400, f"must be an integer from 1 to {MAX_TICKET_ID}", field=key)
    _refuse(400, "must be a string", field=key)


def _json(status: int, document: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(document, status=status, headers={**_HEADERS, **(headers or {})})


def _error(
    status: int,
    error: str,
    *,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    document = {"error": error} if field is None else {"error": error, "field": field}
    return _json(status, document, headers)


def openapi_document(settings: ApiSettings, base_url: str) -> dict[str, Any]:
    """The API as OpenAPI 3.1, its limits those `_validate` checks."""

    def error(description: str, **headers: str) -> dict[str, Any]:
        response: dict[str, Any] = {
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        if headers:
            response["headers"] = {
                name: {"description": text, "schema": {"type": "string"}}
                for name, text in headers.items()
            }
        return response

    def text(least: int, most: int | None, description: str) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "string", "minLength": least, "description": description}
        if most is not None:
            schema["maxLength"] = most
        return schema

    retry = "seconds to wait before trying again"
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mailgate intake API",
            "version": "1",
            "description": (
                "Tickets from a chat-bot, filed by the same rules as mail. The address is"
                " the customer's word: it gets the verification mail while unverified."
            ),
        },
        "servers": [{"url": base_url}],
        "security": [{"bearer": []}],
        "paths": {
            "/api/tickets": {
                "post": {
                    "operationId": "fileTicket",
                    "summary": "Open a ticket, or follow up one of the same requester",
                    "description": (
                        "A `ticket_id` that names a ticket of this address adds the message"
                        " to it (reopening it if closed). Any other `ticket_id` opens a new"
                        " ticket, answered alike. Name and subject are kept on one line:"
                        " CR, LF, control and bidi characters are removed. The body may be"
                        f" up to {settings.max_body} bytes of JSON."
                    ),
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/TicketRequest"}
                            }
                        },
                    },
                    "responses": {
                        "201": {
                            "description": "Filed: the ticket it went to",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Filed"}
                                }
                            },
                        },
                        "400": error("Not valid JSON, or a field is wrong (named in `field`)"),
                        "401": error(
                            "No bearer token, or one not accepted",
                            **{"WWW-Authenticate": "the Bearer challenge"},
                        ),
                        "404": error("The API is off: no token is configured"),
                        "408": error(
                            f"The body did not arrive within {BODY_SECONDS:g} s, or paused"
                            f" longer than {settings.body_pause:g} s"
                        ),
                        "413": error(f"The body is larger than {settings.max_body} bytes"),
                        "415": error("The body is not application/json (UTF-8)"),
                        "429": error(
                            f"More than {settings.rate_limit} requests a minute with this token",
                            **{"Retry-After": retry},
                        ),
                        "503": error(
                            "The ticket store is unavailable, or other requests are being"
                            " read and filed",
                            **{"Retry-After": retry},
                        ),
                    },
                }
            }
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "TicketRequest": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": list(_REQUIRED),
                    "properties": {
                        "name": text(0, MAX_NAME, "the customer's name; may be empty"),
                        "email": {
                            **text(1, MAX_EMAIL, "the customer's address"),
                            "format": "email",
                        },
                        "subject": text(1, MAX_SUBJECT, "one line"),
                        "body": {
                            **text(1, None, "the message; must hold visible text"),
                            "pattern": r"\S",
                        },
                        "ticket_id": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_TICKET_ID,
                            "description": "the ticket this follows up",
                        },
                    },
                },
                "Filed": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["ticket_id"],
                    "properties": {"ticket_id": {"type": "integer", "minimum": 1}},
                },
                "Error": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["error"],
                    "properties": {
                        "error": {"type": "string"},
                        "field": {"type": "string", "description": "the field at fault"},
                    },
                },
            },
        },
    }
