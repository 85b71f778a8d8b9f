"""HTTP cannot starve SMTP: a connection limit, a short keep-alive and a header timeout.

The 1,100 idle connections go to `mailgate serve` as its own process with the file limit
systemd gives a service (soft RLIMIT_NOFILE 1024), as in production; the timeouts are seen
from real sockets on loopback.
"""

from __future__ import annotations

import asyncio
import resource
import smtplib
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgate.config import load_config
from tests.conftest import SUPPORT, SubprocessDaemon, daemon_running, mail, write_config

IDLE = 1100
MAX_CONNECTIONS = 100
SYSTEMD_NOFILE = (1024, 1024)  # a service's LimitNOFILE, soft and hard (the daemon raises soft)
GENEROUS = 30.0  # seconds to wait for something that should happen within a second or two


def raise_own_file_limit(needed: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (skip if that is too low)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"the hard file limit ({hard}) is below {needed}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@pytest.fixture
def http_daemon(tmp_path: Path) -> Iterator[SubprocessDaemon]:
    """A daemon whose HTTP timeouts are out of the way: the idle connections stay until the
    test closes them, and only the connection limit acts."""
    daemon = SubprocessDaemon(
        tmp_path / "daemon", http_extra="keepalive_timeout = 600\nheader_timeout = 600\n"
    )
    yield daemon
    daemon.kill()


def open_idle(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=GENEROUS) for _ in range(count)]


def closed_by_server(sock: socket.socket) -> bool:
    """Read what has arrived without waiting; True once the server has closed its side."""
    sock.setblocking(False)
    try:
        while data := sock.recv(65536):
            assert data.startswith(b"HTTP/1.1 503 "), data
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    return True


def count_closed(sockets: list[socket.socket], *, expected: int) -> int:
    """How many of `sockets` the server closed, once `expected` are (or after GENEROUS s)."""
    closed: set[int] = set()
    deadline = time.monotonic() + GENEROUS
    while len(closed) < expected and time.monotonic() < deadline:
        closed |= {i for i, s in enumerate(sockets) if i not in closed and closed_by_server(s)}
        time.sleep(0.1)
    time.sleep(0.5)  # and no more than those
    closed |= {i for i, s in enumerate(sockets) if i not in closed and closed_by_server(s)}
    return len(closed)


def smtp_reply(port: int) -> tuple[int, bytes]:
    """The reply to DATA of one mail."""
    with smtplib.SMTP("127.0.0.1", port, timeout=GENEROUS) as client:
        client.ehlo("client.example")
        assert client.mail("ann@example.org")[0] == 250
        assert client.rcpt(SUPPORT)[0] == 250
        return client.data(bytes(mail()))


def healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:  # closed at once, reset
        return 0


def wait_for_health(port: int) -> int:
    deadline = time.monotonic() + GENEROUS
    while (status := healthz(port)) != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    return status


def test_idle_http_connections_cannot_starve_smtp(http_daemon: SubprocessDaemon) -> None:
    """1,100 idle HTTP connections (one more than the process's 1024 descriptors): the first
    100 are kept, the rest answered 503 and closed at once, SMTP still takes a mail, and
    /healthz answers again once the idle ones close."""
    daemon = http_daemon
    daemon.start(nofile=SYSTEMD_NOFILE)
    raise_own_file_limit(IDLE + 200)
    sockets = open_idle(daemon.http_port, IDLE)
    try:
        closed = count_closed(sockets, expected=IDLE - MAX_CONNECTIONS)
        assert closed == IDLE - MAX_CONNECTIONS
        assert healthz(daemon.http_port) != 200  # the limit is taken
        code, reply = smtp_reply(daemon.port)
        assert code == 250, reply
        assert reply.startswith(b"2.0.0 Queued as ")
    finally:
        for sock in sockets:
            sock.close()
    assert wait_for_health(daemon.http_port) == 200
    assert daemon.proc is not None and daemon.proc.poll() is None


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (GENEROUS s at most)."""
    async with asyncio.timeout(GENEROUS):
        try:
            return await reader.read()
        except ConnectionResetError:
            return b""


async def test_silent_slow_and_idle_connections_are_closed(tmp_path: Path) -> None:
    """A connection that never sends a request, one that trickles its headers (slowloris)
    and one idle after a response are all closed by the server."""
    config = load_config(
        write_config(tmp_path, http_extra="keepalive_timeout = 1\nheader_timeout = 1\n")
    )
    async with daemon_running(config) as running:
        host, port = running.http.host, running.http.port

        silent_reader, silent = await asyncio.open_connection(host, port)

        slow_reader, slow = await asyncio.open_connection(host, port)
        slow.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")

        async def trickle() -> None:
            while not slow.is_closing():
                slow.write(b"X-Slow: 1\r\n")
                await asyncio.sleep(0.2)

        trickling = asyncio.create_task(trickle())

        idle_reader, idle = await asyncio.open_connection(host, port)
        idle.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await idle_reader.readuntil(b"}\n")  # the end of its JSON line
        assert head.startswith(b"HTTP/1.1 200 ")

        try:
            assert await read_until_closed(silent_reader) == b""
            assert await read_until_closed(slow_reader) == b""  # never answered
            assert await read_until_closed(idle_reader) == b""
        finally:
            trickling.cancel()
            for writer in (silent, slow, idle):
                writer.close()
