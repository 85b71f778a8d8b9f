"""The intake API against a token holder who sends the worst JSON that fits the body limit.

The limit is `smtp.max_message_size` (25 MiB by default): a body of that size must cost the
daemon about its size, not the JSON parser's worst case (nested arrays, millions of keys), or
one bot's request stalls SMTP and HTTP for seconds and can take the process's memory.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgate.privacy.tokens import token_hash
from tests.conftest import SubprocessDaemon

TOKEN = "hostile-bot-token"  # noqa: S105 - a test's token, its digest in the config
LIMIT = 8 * 1024 * 1024
GENEROUS = 60.0
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SubprocessDaemon]:
    running = SubprocessDaemon(
        tmp_path_factory.mktemp("hostile"),
        http_extra=f'api_tokens = ["{token_hash(TOKEN)}"]\napi_rate_limit = 1000\n',
        max_message_size=LIMIT,
    )
    running.start()
    yield running
    running.kill()


def post(daemon: SubprocessDaemon, raw: bytes) -> tuple[int, dict[str, str]]:
    connection = http.client.HTTPConnection("127.0.0.1", daemon.http_port, timeout=GENEROUS)
    try:
        connection.request(
            "POST",
            "/api/tickets",
            body=raw,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def reset_peak_memory(daemon: SubprocessDaemon) -> int:
    """Make the daemon's peak resident memory its current one (proc(5), clear_refs 5)."""
    assert daemon.proc is not None
    Path(f"/proc/{daemon.proc.pid}/clear_refs").write_text("5")
    return peak_memory(daemon)


def peak_memory(daemon: SubprocessDaemon) -> int:
    """The daemon's peak resident memory since the last reset (VmHWM), in bytes."""
    assert daemon.proc is not None
    status = Path(f"/proc/{daemon.proc.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def within_limit(opening: bytes, unit: bytes, closing: bytes) -> bytes:
    return opening + unit * ((LIMIT - len(opening) - len(closing) - 1) // len(unit)) + closing


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        # Arrays 900 deep, one after the other: under the recursion limit, 150 times its size.
        (within_limit(b'{"body": [', b"[" * 900 + b"]" * 900 + b",", b"[]]}"), "body"),
        (within_limit(b"[", b"{},", b"{}]"), None),  # a million empty objects
        (within_limit(b'{"name": "a", ', b'"k": 0, ', b'"z": 0}'), "k"),  # a million keys
    ],
    ids=["nested arrays", "many objects", "many keys"],
)
def test_a_hostile_body_costs_about_its_size(
    daemon: SubprocessDaemon, raw: bytes, field: str | None
) -> None:
    """Refused 400, naming the field where there is one; the daemon's peak memory grows by
    a few times the body at most (before: 8 MiB of nested arrays took 400 MB and 2 s)."""
    before = reset_peak_memory(daemon)
    status, answer = post(daemon, raw)
    grown = peak_memory(daemon) - before
    assert (status, answer.get("field"), grown < 6 * LIMIT) == (400, field, True), (answer, grown)


def test_a_large_valid_body_is_still_filed(daemon: SubprocessDaemon) -> None:
    """The limit is the body's, as before: a text of nearly the limit is a ticket."""
    fields = {"name": "Ann", "email": "ann@example.org", "subject": "Log", "body": ""}
    room = LIMIT - len(json.dumps(fields)) - 16
    status, answer = post(
        daemon, json.dumps({**fields, "body": "log line\n" * (room // 10)}).encode()
    )
    assert status == 201, answer
