"""The chat-bot intake API (`POST /api/tickets`) on a real `mailgate serve`, over loopback.

One daemon serves the module (a high rate limit, a 64 KiB body limit); the rate limit and the
API switched off get daemons of their own. What a user sees is checked where they would see
it: the ticket through `mailgate tickets show`, the mails through `mailgate outbox list` and
the file transport's .eml files, the daemon's own log for what it must not say.
"""

from __future__ import annotations

import http.client
import io
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest

from mailgate.api import (
    BODIES_AT_ONCE,
    MAX_NAME,
    MAX_SUBJECT,
    MAX_TICKET_ID,
    RateLimiter,
)
from mailgate.config import load_config
from mailgate.privacy.tokens import token_hash
from tests.conftest import SubprocessDaemon, daemon_running, fill_disk, run_cli, tmpfs, write_config

TOKEN = "bot-token-for-the-tests"  # noqa: S105 - a test's token, its digest in the config
OTHER_TOKEN = "a-token-nobody-configured"  # noqa: S105
MAX_BODY = 64 * 1024
GENEROUS = 30.0
VALID = {"name": "Ann Api", "email": "ann.api@example.org", "subject": "Printer", "body": "Hi."}


def api_config(rate: int = 100_000) -> dict[str, Any]:
    return {
        "http_extra": f'api_tokens = ["{token_hash(TOKEN)}"]\napi_rate_limit = {rate}\n',
        "max_message_size": MAX_BODY,
    }


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SubprocessDaemon]:
    daemon = SubprocessDaemon(tmp_path_factory.mktemp("api"), log_level="info", **api_config())
    daemon.start()
    yield daemon
    daemon.kill()


def request(
    daemon: SubprocessDaemon,
    body: bytes | Any = None,
    *,
    method: str = "POST",
    path: str = "/api/tickets",
    token: str | None = TOKEN,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, Mapping[str, str], Any]:
    """One request; the status, headers and JSON answer (every answer of the API is JSON)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    sent = {"Content-Type": "application/json"} if data is not None else {}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    sent.update(headers or {})
    call = urllib.request.Request(
        f"http://127.0.0.1:{daemon.http_port}{path}", data=data, method=method, headers=sent
    )
    try:
        with urllib.request.urlopen(call, timeout=GENEROUS) as response:  # noqa: S310 - loopback
            status, answer, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, answer, raw = error.code, error.headers, error.read()
    assert answer["Content-Type"].startswith("application/json"), (status, raw)
    return status, answer, json.loads(raw)


def cli_json(daemon: SubprocessDaemon, *args: str) -> Any:
    result = run_cli("--config", str(daemon.config_path), *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def mails_to(daemon: SubprocessDaemon, ticket_id: int) -> list[str]:
    return sorted(
        r["kind"] for r in cli_json(daemon, "outbox", "list") if r["ticket_id"] == ticket_id
    )


def test_a_request_opens_a_ticket_with_its_mails(api: SubprocessDaemon) -> None:
    """201 with the new ticket's id; the ticket is the customer's, unauthenticated (the
    address is the bot's word for it), and the verification mail and the acknowledgement go
    to that address; the log names neither address nor text."""
    fields = {**VALID, "email": "carol.api@example.org", "subject": "Re: Jam\u202e\r\nBcc: x"}
    status, _headers, answer = request(api, fields)
    assert status == 201
    ticket_id = answer["ticket_id"]
    ticket = cli_json(api, "tickets", "show", str(ticket_id))
    assert (ticket["subject"], ticket["requester"], ticket["flags"]) == (
        "Jam Bcc: x",  # one line: no reply prefix, bidi override, CR or LF
        {"name": "Ann Api", "email": "carol.api@example.org"},
        ["unauthenticated"],
    )
    assert [(m["body_text"], m["auth"]["trust"]) for m in ticket["messages"]] == [
        ("Hi.", "unauthenticated")
    ]
    assert mails_to(api, ticket_id) == ["ticket_created", "verification"]
    outbox = api.folder / "var" / "outbox"
    deadline = time.monotonic() + GENEROUS
    while len([p for p in outbox.glob("*.eml") if b"carol.api@" in p.read_bytes()]) < 2:
        assert time.monotonic() < deadline, "the mails were not sent"
        time.sleep(0.05)
    log = (api.folder / "daemon.log").read_text()
    assert f'"ticket_id": {ticket_id}' in log and "api_ticket_filed" in log
    assert "carol.api" not in log and "Ann Api" not in log and "Jam" not in log


def test_a_follow_up_joins_only_a_ticket_of_the_same_requester(api: SubprocessDaemon) -> None:
    """`ticket_id` of the same address (another spelling too) adds to that ticket, with no
    new acknowledgement; another address naming it, or a number that names no ticket, gets a
    ticket of its own, answered alike, and the first ticket is untouched."""
    first = request(api, {**VALID, "email": "dora.api@example.org"})[2]["ticket_id"]
    again = request(api, {**VALID, "email": "Dora.API@example.org", "ticket_id": first})
    assert (again[0], again[2]) == (201, {"ticket_id": first})
    other = request(api, {**VALID, "email": "eve.api@example.org", "ticket_id": first})
    nowhere = request(api, {**VALID, "email": "eve.api@example.org", "ticket_id": MAX_TICKET_ID})
    assert other[0] == nowhere[0] == 201
    assert len({first, other[2]["ticket_id"], nowhere[2]["ticket_id"]}) == 3
    messages = cli_json(api, "tickets", "show", str(first))["messages"]
    assert [(m["from"]["email"], m["thread_reason"]) for m in messages] == [
        ("dora.api@example.org", "new"),
        ("Dora.API@example.org", "references"),
    ]
    assert mails_to(api, first) == ["ticket_created", "verification"]  # the first request's
    eves = cli_json(api, "tickets", "show", str(other[2]["ticket_id"]))
    assert eves["requester"]["email"] == "eve.api@example.org"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**VALID, "extra": 1}, "extra"),
        ({k: v for k, v in VALID.items() if k != "email"}, "email"),
        ({**VALID, "name": None}, "name"),
        ({**VALID, "name": "x" * (MAX_NAME + 1)}, "name"),
        ({**VALID, "email": "not an address"}, "email"),
        ({**VALID, "email": "=?utf-8?q?victim=40example.com=3e?=@evil.example"}, "email"),
        ({**VALID, "email": 7}, "email"),
        ({**VALID, "subject": ""}, "subject"),
        ({**VALID, "subject": "s" * (MAX_SUBJECT + 1)}, "subject"),
        ({**VALID, "body": " \n\x00 "}, "body"),
        ({**VALID, "body": ["Hi."]}, "body"),
        ({**VALID, "ticket_id": True}, "ticket_id"),
        ({**VALID, "ticket_id": 0}, "ticket_id"),
        ({**VALID, "ticket_id": 1.0}, "ticket_id"),
        ({**VALID, "ticket_id": "1"}, "ticket_id"),
        ({**VALID, "ticket_id": MAX_TICKET_ID + 1}, "ticket_id"),
    ],
)
def test_a_bad_field_is_named(api: SubprocessDaemon, body: dict[str, Any], field: str) -> None:
    status, _headers, answer = request(api, body)
    assert (status, answer.get("field")) == (400, field), answer


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"{", None),
        (b"[]", None),
        (b'"text"', None),
        (b"\xff\xfe{}", None),
        (b'{"name": NaN}', None),
        (b'{"name": "a", "name": "b"}', None),
        (b"[" * 30_000 + b"]" * 30_000, None),  # deeper than the parser goes
        (json.dumps({**VALID, "body": "\ud800"}).encode(), "body"),  # a lone surrogate
    ],
)
def test_a_body_that_is_no_json_object_is_refused(
    api: SubprocessDaemon, raw: bytes, field: str | None
) -> None:
    status, _headers, answer = request(api, raw)
    assert (status, answer.get("field")) == (400, field), answer


def test_no_or_a_wrong_token_is_answered_401(api: SubprocessDaemon) -> None:
    """No header, another token, another scheme, a malformed value: 401 with the Bearer
    challenge, and no ticket made."""
    before = len(cli_json(api, "tickets", "list"))
    for token, header in [
        (None, None),
        (OTHER_TOKEN, None),
        (None, f"Basic {TOKEN}"),
        (None, "Bearer"),
        (None, f"Bearer {TOKEN} extra"),
        (None, "Bearer \u00e9t\u00e9"),
    ]:
        headers = {"Authorization": header} if header else {}
        status, answer_headers, answer = request(api, VALID, token=token, headers=headers)
        assert status == 401, (header, answer)
        assert answer_headers["WWW-Authenticate"].startswith("Bearer"), header
    assert len(cli_json(api, "tickets", "list")) == before


def test_a_body_over_the_message_size_is_413(api: SubprocessDaemon) -> None:
    """Past `smtp.max_message_size`, declared or streamed (chunked, no Content-Length)."""
    big = json.dumps({**VALID, "body": "x" * MAX_BODY}).encode()
    assert request(api, big)[0] == 413
    connection = http.client.HTTPConnection("127.0.0.1", api.http_port, timeout=GENEROUS)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
    connection.request(
        "POST", "/api/tickets", iter([big[:1000], big[1000:]]), headers, encode_chunked=True
    )
    response = connection.getresponse()
    assert (response.status, json.loads(response.read())["error"]) == (
        413,
        "the body is larger than 65536 bytes",
    )
    connection.close()
    fits = json.dumps({**VALID, "body": "x" * (MAX_BODY - 200)}).encode()
    assert request(api, fits)[0] == 201


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1"],
)
def test_a_body_that_is_not_json_by_type_is_415(
    api: SubprocessDaemon, content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {"Content-Type": ""}
    status, _headers, answer = request(api, json.dumps(VALID).encode(), headers=headers)
    assert status == 415, answer


def test_only_post_is_allowed(api: SubprocessDaemon) -> None:
    status, headers, _answer = request(api, method="GET")
    assert (status, headers["Allow"]) == (405, "POST")


def test_the_openapi_document_describes_the_api(api: SubprocessDaemon) -> None:
    """Served without a token (it describes, it files nothing), valid OpenAPI 3.1 whose
    request schema refuses what the API refuses."""
    status, _headers, document = request(api, method="GET", path="/api/openapi.json", token=None)
    assert status == 200
    assert document["openapi"].startswith("3.")
    operation = document["paths"]["/api/tickets"]["post"]
    assert sorted(operation["responses"]) == [
        "201",
        "400",
        "401",
        "404",
        "408",
        "413",
        "415",
        "429",
        "503",
    ]
    schemas = document["components"]["schemas"]
    request_schema = {**schemas["TicketRequest"], "$defs": {}}
    jsonschema.Draft202012Validator.check_schema(request_schema)
    validator = jsonschema.Draft202012Validator(request_schema)
    assert validator.is_valid(VALID)
    assert not validator.is_valid({**VALID, "extra": 1})
    assert not validator.is_valid({**VALID, "ticket_id": 0})
    assert not validator.is_valid({**VALID, "subject": "s" * (MAX_SUBJECT + 1)})


def test_schemathesis_finds_no_server_error_and_no_answer_off_the_schema(
    api: SubprocessDaemon, tmp_path: Path
) -> None:
    """Schemathesis generates requests from the served document, valid and invalid, sends
    them with the token, and checks every answer against the document."""
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "run",
            f"http://127.0.0.1:{api.http_port}/api/openapi.json",
            "--url",
            f"http://127.0.0.1:{api.http_port}",
            "--checks",
            "not_a_server_error,response_schema_conformance,"
            "status_code_conformance,content_type_conformance",
            "--max-examples",
            "60",
            "--seed",
            "11",
            "--workers",
            "1",
            "--header",
            f"Authorization: Bearer {TOKEN}",
            "--generation-database",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "passed" in result.stdout


def test_a_token_past_its_rate_gets_429_with_retry_after(tmp_path: Path) -> None:
    """Two requests a minute: the third is answered 429 with the seconds to wait (about
    half a minute: one request's refill), and files nothing."""
    daemon = SubprocessDaemon(tmp_path / "rate", **api_config(rate=2))
    daemon.start()
    try:
        assert [request(daemon, VALID)[0] for _ in range(2)] == [201, 201]
        status, headers, answer = request(daemon, VALID)
        assert status == 429, answer
        assert 1 <= int(headers["Retry-After"]) <= 30
        assert len(cli_json(daemon, "tickets", "list")) == 2
        assert request(daemon, VALID, token=OTHER_TOKEN)[0] == 401  # no token, no bucket
        # A SIGHUP swaps the tokens: the new one is let in at once, the old one no more.
        config = daemon.config_path.read_text(encoding="utf-8")
        swapped = config.replace(token_hash(TOKEN), token_hash(OTHER_TOKEN))
        daemon.config_path.write_text(swapped, encoding="utf-8")
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while (status := request(daemon, VALID, token=OTHER_TOKEN)[0]) == 401:
            assert time.monotonic() < deadline, "the reload never let the new token in"
            time.sleep(0.05)
        assert status == 201
        assert request(daemon, VALID)[0] == 401
    finally:
        daemon.kill()


def test_the_bucket_refills_at_the_rate_and_says_how_long_to_wait() -> None:
    """60 a minute: a burst of 60, then one a second; the wait named is the time to the next
    one, and a refused request takes nothing. Each token has its own bucket."""
    now = [1000.0]
    limiter = RateLimiter(clock=lambda: now[0])
    assert [limiter.take("a", 60) for _ in range(60)] == [0.0] * 60
    assert limiter.take("a", 60) == pytest.approx(1.0)
    assert limiter.take("b", 60) == 0.0
    now[0] += 0.25
    assert limiter.take("a", 60) == pytest.approx(0.75)
    now[0] += 0.75
    assert limiter.take("a", 60) == 0.0
    now[0] += 3600  # an idle hour fills the bucket up to the burst, no further
    assert sum(limiter.take("a", 60) == 0.0 for _ in range(61)) == 60


def test_without_tokens_the_api_is_not_there(tmp_path: Path) -> None:
    daemon = SubprocessDaemon(tmp_path / "off")
    daemon.start()
    try:
        assert request(daemon, VALID)[0] == 404
        assert request(daemon, method="GET", path="/api/openapi.json")[0] == 404
    finally:
        daemon.kill()


async def test_a_full_disk_is_503_with_retry_after(tmp_path: Path) -> None:
    """The store cannot commit (a real full disk, a small tmpfs): 503 and when to try again,
    never a 500; with room again, the same request is filed."""
    with tmpfs(tmp_path / "small", "8m") as disk:
        extra = api_config()["http_extra"]
        config = load_config(write_config(disk, max_message_size=2 * 1024 * 1024, http_extra=extra))
        fields = json.dumps({**VALID, "body": "z" * 1_500_000}).encode()
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        async with daemon_running(config) as daemon, aiohttp.ClientSession() as client:
            url = f"http://{daemon.http.host}:{daemon.http.port}/api/tickets"
            ballast = fill_disk(disk, leave=256 * 1024)
            async with client.post(url, data=io.BytesIO(fields), headers=headers) as response:
                assert response.status == 503, await response.text()
                assert int(response.headers["Retry-After"]) > 0
                assert "error" in await response.json()
            ballast.unlink()
            async with client.post(url, data=io.BytesIO(fields), headers=headers) as response:
                assert response.status == 201, await response.text()


def test_api_token_new_prints_a_token_and_its_digest() -> None:
    result = run_cli("api-token", "new")
    assert result.returncode == 0, result.stderr
    token, *_comments, line = result.stdout.splitlines()
    assert len(token) >= 43
    assert line == f'api_tokens = ["{token_hash(token)}"]'
    assert run_cli("api-token", "new").stdout.split()[0] != token


def test_a_config_entry_that_is_no_digest_is_refused_without_echoing_it(tmp_path: Path) -> None:
    daemon = SubprocessDaemon(tmp_path / "bad", http_extra=f'api_tokens = ["{TOKEN}"]\n')
    result = run_cli("--config", str(daemon.config_path), "check-config")
    assert result.returncode == 78
    assert "http.api_tokens" in result.stderr and TOKEN not in result.stderr


def _half_sent_body(daemon: SubprocessDaemon) -> socket.socket:
    """A request whose body stops halfway: its headers promise 100 bytes, 10 come."""
    sock = socket.create_connection(("127.0.0.1", daemon.http_port), timeout=GENEROUS)
    sock.sendall(
        b"POST /api/tickets HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {TOKEN}\r\nContent-Length: 100\r\n\r\n".encode()
        + b'{"name": "'
    )
    return sock


def test_bodies_read_at_once_are_bounded_and_a_stalled_one_is_408(tmp_path: Path) -> None:
    """Four bodies that stop halfway hold the four places for bodies being read: the next
    request is 503 with Retry-After at once (a burst cannot make the daemon hold more bodies
    in memory); each stalled body is answered 408 after a pause of `http.header_timeout`,
    and then requests are filed again."""
    config = api_config()
    config["http_extra"] += "header_timeout = 1\n"
    daemon = SubprocessDaemon(tmp_path / "bodies", **config)
    daemon.start()
    stalled = [_half_sent_body(daemon) for _ in range(BODIES_AT_ONCE)]
    try:
        deadline = time.monotonic() + GENEROUS
        while (answer := request(daemon, VALID))[0] == 201:  # until all four are being read
            assert time.monotonic() < deadline, "the stalled bodies never held their places"
        status, headers, _ = answer
        assert status == 503 and headers["Retry-After"] == "1", answer
        for sock in stalled:
            assert sock.recv(4096).startswith(b"HTTP/1.1 408 "), "no 408 for a stalled body"
        assert request(daemon, VALID)[0] == 201
    finally:
        for sock in stalled:
            sock.close()
        daemon.kill()
