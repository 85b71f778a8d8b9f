"""Confirmation links ask for a click: the GET shows a button, only the POST it sends acts.

First the mechanism on its own (`confirm.py`), through the privacy route's hooks on a real
aiohttp server on loopback, with a trivial request book; then the verification link in the
real daemon, where the requester's state is read back from the CLI and the store.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urljoin, urlsplit

import pytest
import structlog
from aiohttp import test_utils

from mailgate.config import Config
from mailgate.confirm import MAX_FORM_BYTES, Confirmed, ConfirmHooks, CsrfKey, Outcome
from mailgate.errors import StoreUnavailable
from mailgate.outbound.templates import Templates
from mailgate.privacy.tokens import token_hash
from mailgate.store import store_for
from mailgate.store.base import TokenState
from mailgate.web import build_app
from tests import browser
from tests.conftest import REPO, Relay, Running, daemon_running, mail, open_test_store
from tests.test_outbound import VERIFY_SUBJECT, link_path, url, verified

SECRET = b"s" * 64
PUBLIC = "https://support.example.com/help"  # http.base_url: a proxy serves us there


@dataclass
class RequestBook:
    """The privacy hooks at their simplest: live tokens, each carried out once."""

    live: set[str] = field(default_factory=set)
    done: list[str] = field(default_factory=list)  # the hashes redeemed, in order
    live_for_any: bool = False  # peek: every token is live (to render hostile paths)
    shown: str = "erase"

    def add(self, token: str) -> str:
        self.live.add(token_hash(token))
        return token

    async def peek(self, hashed: str) -> TokenState:
        if hashed in self.done:
            return "used"
        return "live" if hashed in self.live or self.live_for_any else "unknown"

    async def redeem(self, hashed: str) -> Outcome:
        state = await self.peek(hashed)
        if state != "live":
            return state
        self.live.discard(hashed)
        self.done.append(hashed)
        # Any names: `name`, `status`, `request` are template variables like the others.
        variables = {"kind": self.shown, "name": "Ann", "status": "done", "request": "r"}
        return Confirmed("privacy_done.html", variables)


@dataclass
class Site:
    book: RequestBook
    base: str  # http://127.0.0.1:port

    def link(self, token: str) -> str:
        return f"{self.base}/privacy/confirm/{token}"


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    """The app on aiohttp's test server (loopback, a free port), a real store behind it."""
    templates = tmp_path / "templates"
    shutil.copytree(REPO / "templates", templates)
    (templates / "page" / "privacy_done.html").write_text(
        "<p>Done: {{ kind }} ({{ name }}, {{ status }}, {{ request }})</p>\n"
    )
    book = RequestBook()
    hooks = ConfirmHooks(peek=book.peek, redeem=book.redeem)
    async with open_test_store(tmp_path / "db.sqlite") as store:
        app = build_app(
            store, Templates(templates), secret=SECRET, base_url=PUBLIC, privacy_confirm=hooks
        )
        async with test_utils.TestServer(app, host="127.0.0.1") as server:
            yield Site(book, str(server.make_url("")).rstrip("/"))


async def test_the_get_shows_a_button_and_only_its_post_confirms(site: Site) -> None:
    """GET and HEAD look; the button's POST carries the request out, once; then 410."""
    link = site.link(site.book.add("T" * 43))
    for _ in range(3):
        shown = await browser.fetch(link)
        assert shown.status == 200
        assert (await browser.fetch(link, method="HEAD")).status == 200
    assert site.book.done == []

    done = await browser.press_button(link, shown.page)
    assert (done.status, done.page) == (200, "<p>Done: erase (Ann, done, r)</p>")
    assert site.book.done == [token_hash("T" * 43)]

    gone = await browser.fetch(link)
    assert gone.status == 410
    assert "already been used: your request was confirmed" in gone.page
    assert (await browser.press_button(link, shown.page)).status == 410
    assert (await browser.fetch(site.link("U" * 43))).status == 404
    assert (await browser.fetch(site.link("U" * 500))).status == 404


async def test_a_post_without_the_pages_value_confirms_nothing(site: Site) -> None:
    """No body, no field, a forged value, another token's, the verification route's value
    for this token, the field twice, a non-ASCII value: 403, and the request stays live."""
    token, other = site.book.add("T" * 43), site.book.add("O" * 43)
    link = site.link(token)
    right = browser.the_form((await browser.fetch(link)).page).fields["csrf"]
    others = browser.the_form((await browser.fetch(site.link(other))).page).fields["csrf"]
    verification_value = CsrfKey(SECRET).value("verification", token_hash(token))
    assert len({right, others, verification_value}) == 3
    forms: list[dict[str, str] | bytes | None] = [
        None,
        {"confirm": "yes"},
        {"csrf": "0" * 64},
        {"csrf": right[:-1]},
        {"csrf": others},
        {"csrf": verification_value},
        f"csrf={right}&csrf={right}".encode(),
        {"csrf": "\u00e9" * 64},
    ]
    with structlog.testing.capture_logs() as logs:
        for form in forms:
            headers = dict(browser.SAME_ORIGIN)
            if isinstance(form, bytes):
                headers["Content-Type"] = "application/x-www-form-urlencoded"
            refused = await browser.fetch(link, method="POST", data=form, headers=headers)
            assert refused.status == 403, form
            assert "Nothing was confirmed" in refused.page
    assert site.book.done == []
    assert (await browser.confirm(link)).status == 200
    # The log says why, and holds neither the token nor a CSRF value.
    assert [e["reason"] for e in logs if e["event"] == "confirmation_refused"] == [
        "no_csrf",
        "no_csrf",
        *["wrong_csrf"] * 4,
        "no_csrf",
        "wrong_csrf",
    ]
    assert token not in repr(logs) and right not in repr(logs)


async def test_a_cross_site_post_is_refused_even_with_the_right_value(site: Site) -> None:
    """Sec-Fetch-Site and Origin, when the browser sends them, must say it is our page."""
    refused_headers = [
        {"Origin": "https://evil.example"},
        {"Origin": "https://support.example.com.evil.example"},
        {"Origin": "http://support.example.com"},  # our host, another scheme
        {"Origin": "not a url"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},  # a sibling subdomain is another site
        {"Origin": "null", "Sec-Fetch-Site": "cross-site"},  # a sandboxed frame elsewhere
        {"Origin": "https://evil.example", "Sec-Fetch-Site": "same-origin"},
    ]
    token = site.book.add("T" * 43)
    link = site.link(token)
    value = browser.the_form((await browser.fetch(link)).page).fields["csrf"]
    for headers in refused_headers:
        refused = await browser.fetch(link, method="POST", data={"csrf": value}, headers=headers)
        assert refused.status == 403, headers
    assert site.book.done == []

    accepted_headers = [
        browser.SAME_ORIGIN,  # our own page under Referrer-Policy: no-referrer
        {"Origin": "https://SUPPORT.example.com:443"},  # http.base_url's origin
        {"Origin": site.base},  # the origin the request was addressed to (Host)
        {"Sec-Fetch-Site": "none"},  # the user's own navigation
        {},  # no word from the client (curl, older browsers over plain HTTP)
    ]
    for n, headers in enumerate(accepted_headers):
        link = site.link(site.book.add(f"{n}" * 43))
        value = browser.the_form((await browser.fetch(link)).page).fields["csrf"]
        accepted = await browser.fetch(link, method="POST", data={"csrf": value}, headers=headers)
        assert accepted.status == 200, headers
    assert len(site.book.done) == len(accepted_headers)


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 1000):
        yield data[start : start + 1000]


async def test_only_small_urlencoded_bodies_are_read(site: Site) -> None:
    """415 for another type, 413 past MAX_FORM_BYTES (announced or chunked), 400 for a body
    no form encodes; nothing is used. A form of exactly the limit is read."""
    link = site.link(site.book.add("T" * 43))
    value = browser.the_form((await browser.fetch(link)).page).fields["csrf"]
    form = "application/x-www-form-urlencoded"
    right = f"csrf={value}&pad=".encode()
    big = right + b"x" * (MAX_FORM_BYTES + 1 - len(right))
    cases: list[tuple[int, object, str]] = [
        (415, b'{"csrf": "%s"}' % value.encode(), "application/json"),
        (415, right, "multipart/form-data; boundary=x"),
        (415, right, "text/plain"),
        (413, big, form),
        (413, chunks(big), form),
        (400, right + b"\xff", form),
        (400, right + b"%ff", form),  # not UTF-8 once decoded
        (400, right + b"&x=" * 16, form),  # too many fields
    ]
    for status, body, content_type in cases:
        headers = {**browser.SAME_ORIGIN, "Content-Type": content_type}
        answer = await browser.fetch(link, method="POST", data=body, headers=headers)  # type: ignore[arg-type]
        assert answer.status == status, (status, content_type)
        assert "Nothing was confirmed" in answer.page
    assert site.book.done == []

    exact = right + b"x" * (MAX_FORM_BYTES - len(right))
    headers = {**browser.SAME_ORIGIN, "Content-Type": f"{form}; charset=utf-8"}
    answer = await browser.fetch(link, method="POST", data=exact, headers=headers)
    assert answer.status == 200


async def test_the_page_escapes_everything_and_posts_back_to_its_own_url(site: Site) -> None:
    """Whatever the path holds, the form's action is relative and resolves to the page's
    own URL; markup in the path or in a confirmed page's variables is shown as text; every
    page is uncacheable, sends no Referer and may post its form only to us."""
    site.book.live_for_any = True
    site.book.shown = '"><script>alert(1)</script>'
    hostile = '"><img src=x onerror=alert(1)>'
    link = site.link(quote(hostile, safe=""))
    shown = await browser.fetch(link)
    assert shown.status == 200
    assert "<img" not in shown.page and "onerror=alert(1)>" not in shown.page
    form = browser.the_form(shown.page)
    assert form.action.startswith("./") and ":" not in form.action
    target, page = urlsplit(urljoin(link, form.action)), urlsplit(link)
    assert (target.scheme, target.netloc) == (page.scheme, page.netloc)
    assert unquote(target.path) == unquote(page.path) == f"/privacy/confirm/{hostile}"
    headers = shown.headers
    assert headers["Cache-Control"] == "no-store"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["X-Content-Type-Options"] == "nosniff"
    policy = [d.strip() for d in headers["Content-Security-Policy"].split(";")]
    assert {"default-src 'none'", "form-action 'self'", "frame-ancestors 'none'"} <= set(policy)

    done = await browser.press_button(link, shown.page)
    assert done.status == 200
    assert "<script>" not in done.page
    assert "&#34;&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in done.page
    assert done.headers["Content-Security-Policy"] == headers["Content-Security-Policy"]


async def test_a_store_that_cannot_answer_is_a_503(tmp_path: Path) -> None:
    async def peek(_hashed: str) -> TokenState:
        raise StoreUnavailable("database is locked")

    async def redeem(_hashed: str) -> Outcome:
        raise StoreUnavailable("database is locked")

    async with open_test_store(tmp_path / "db.sqlite") as store:
        app = build_app(
            store,
            Templates(REPO / "templates"),
            secret=SECRET,
            base_url=PUBLIC,
            privacy_confirm=ConfirmHooks(peek=peek, redeem=redeem),
        )
        async with test_utils.TestServer(app, host="127.0.0.1") as server:
            link = str(server.make_url("/privacy/confirm/" + "T" * 43))
            shown = await browser.fetch(link)
            value = CsrfKey(SECRET).value("privacy", token_hash("T" * 43))
            posted = await browser.fetch(
                link, method="POST", data={"csrf": value}, headers=browser.SAME_ORIGIN
            )
    assert (shown.status, posted.status) == (503, 503)
    assert "cannot check the link just now" in posted.page


# -- the verification link in the daemon ------------------------------------------------------


async def first_link(running: Running, relay: Relay) -> str:
    await running.send(mail(sender="ann@example.org"))
    await relay.wait_for(2)
    [sent] = [r for r in relay.received if VERIFY_SUBJECT in r.message["Subject"]]
    return url(running, link_path(sent))


async def stored_state(config: Config, link: str) -> tuple[bool, TokenState]:
    async with store_for(config) as store:
        requester = await store.get_requester("ann@example.org")
        state = await store.peek_token(token_hash(link.rsplit("/", 1)[1]))
    assert requester is not None
    return requester.verified, state


async def test_opening_the_link_verifies_nobody(relay: Relay, relay_config: Config) -> None:
    """What a scanner does (GET, HEAD, again and again) leaves the requester unverified and
    the token live; the page's button then verifies."""
    async with daemon_running(relay_config) as running:
        link = await first_link(running, relay)
        for method in ("HEAD", "GET", "GET", "HEAD", "GET"):
            assert (await browser.fetch(link, method=method)).status == 200
        assert not verified(running, "ann@example.org")  # `mailgate requesters show`
        listed = running.cli("requesters", "list")
        assert listed.returncode == 0, listed.stderr
        assert await stored_state(running.config, link) == (False, "live")

        done = await browser.confirm(link)
        assert done.status == 200
        assert verified(running, "ann@example.org")
        assert await stored_state(running.config, link) == (True, "used")
        assert (await browser.fetch(link)).status == 410


async def test_a_forged_or_cross_site_post_verifies_nobody(
    relay: Relay, relay_config: Config
) -> None:
    """403 without the page's value, with a forged one, or from another site with the right
    one; the token stays live and the button still works."""
    async with daemon_running(relay_config) as running:
        link = await first_link(running, relay)
        page = (await browser.fetch(link)).page
        value = browser.the_form(page).fields["csrf"]
        attempts: list[tuple[dict[str, str] | None, dict[str, str]]] = [
            (None, browser.SAME_ORIGIN),
            ({"csrf": "f" * 64}, browser.SAME_ORIGIN),
            ({"csrf": value}, {"Origin": "https://evil.example"}),
            ({"csrf": value}, {"Sec-Fetch-Site": "cross-site", "Origin": "null"}),
        ]
        for form, headers in attempts:
            refused = await browser.fetch(link, method="POST", data=form, headers=headers)
            assert refused.status == 403, (form, headers)
            assert "Nothing was confirmed" in refused.page
        assert not verified(running, "ann@example.org")
        assert await stored_state(running.config, link) == (False, "live")
        assert (await browser.press_button(link, page)).status == 200
        assert verified(running, "ann@example.org")
