"""Shared fixtures: a real mailgate on a loopback port, real SMTP clients, real SQLite files."""

from __future__ import annotations

import asyncio
import email.policy
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP

from mailgate.config import Config, load_config
from mailgate.model import HostPort, StoredAttachment, Ticket
from mailgate.privacy.keyring import Keyring
from mailgate.service import serve
from mailgate.store import SqliteStore, Store, open_store, store_for
from tests.dns_stub import dkim_key_pair, shared_dns_stub

SUPPORT = "support@example.com"
REPO = Path(__file__).resolve().parent.parent
MAIL_DATA = Path(__file__).parent / "data" / "mail"

BASE_CONFIG = """\
[smtp]
listen = "127.0.0.1:{smtp_port}"
hostname = "mailgate.test"
accept = ["support@example.com", "@help.example.com"]
max_message_size = {max_message_size}
drain_timeout = 5
{smtp_extra}

[storage]
database = "var/mailgate.db"
attachments = "var/attachments"

[outbound]
transport = "{transport}"
directory = "var/outbox"
relay = "127.0.0.1:{relay_port}"
tls = "none"
timeout = {outbound_timeout}
sender = "support@example.com"
templates = "{templates}"
retry_initial = 0.3
retry_max = 1
{outbound_extra}
[agents]
addresses = ["agent@example.com", "@staff.example.com"]

[auth]
# The shared DNS stub on loopback (tests/dns_stub.py): the domains tests write from by default
# publish SPF for loopback, so their mail is authenticated; other domains publish nothing.
enabled = true
nameservers = ["127.0.0.1:{dns_port}"]
dns_timeout = {dns_timeout}
{auth_extra}

[http]
listen = "127.0.0.1:{http_port}"
base_url = "http://127.0.0.1:8080"
{http_extra}

[log]
level = "{log_level}"
format = "json"
"""


# Domains the tests' mail comes from: they publish SPF for loopback (no DMARC record), so
# their mail is authenticated by an aligned SPF pass, as from a real provider.
AUTHENTICATED_DOMAINS = ("example.org", "example.com", "staff.example.com", "help.example.com")


def shared_dns() -> int:
    """The port of the run's shared DNS stub, its records set."""
    stub, port = shared_dns_stub()
    for domain in AUTHENTICATED_DOMAINS:
        if (domain, "TXT") not in stub.records:
            stub.txt(domain, "v=spf1 ip4:127.0.0.0/8 -all")
    return port


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(
    folder: Path,
    *,
    smtp_port: int = 0,
    max_message_size: int = 1024 * 1024,
    log_level: str = "info",
    relay_port: int | None = None,
    templates: Path = REPO / "templates",
    outbound_extra: str = "",
    smtp_extra: str = "",
    auth_extra: str = "",
    dns_port: int | None = None,
    dns_timeout: float = 1,
    http_extra: str = "",
    http_port: int = 0,
    outbound_timeout: float = 5,
) -> Path:
    """Write a test config; with `relay_port`, outbound mail goes to that SMTP relay.

    `smtp_extra`, `outbound_extra`, `auth_extra` and `http_extra` are TOML lines added to
    those sections (limits, ...). DNS is the shared stub unless `dns_port` names another.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text(
        BASE_CONFIG.format(
            smtp_port=smtp_port,
            max_message_size=max_message_size,
            log_level=log_level,
            transport="file" if relay_port is None else "smtp",
            relay_port=relay_port or 2525,
            templates=templates,
            outbound_extra=outbound_extra,
            smtp_extra=smtp_extra,
            auth_extra=auth_extra,
            dns_port=dns_port or shared_dns(),
            dns_timeout=dns_timeout,
            http_extra=http_extra,
            http_port=http_port,
            outbound_timeout=outbound_timeout,
        ),
        encoding="utf-8",
    )
    return path


@asynccontextmanager
async def open_test_store(path: Path) -> AsyncIterator[SqliteStore]:
    """A store at `path` with a key file and key store of its own beside it."""
    keys = Keyring.open(
        path.parent / "keys" / "master.key", path.parent / "keys" / "ks.sqlite", create=True
    )
    try:
        async with open_store(path, keys) as store:
            yield store
    finally:
        keys.close()


async def attachment_bytes(config: Config, attachment: StoredAttachment) -> bytes:
    """An attachment's content as the store opens it from its sealed file."""
    assert attachment.id is not None
    async with store_for(config) as store:
        content = await store.attachment_content(attachment.id, config.storage.attachments)
    assert content is not None
    return content


def as_sent(stored: bytes | None) -> bytes:
    """A stored message less the Received field mailgate put at its top (trace.py): the
    bytes the client sent."""
    assert stored is not None
    assert stored.startswith(b"Received: from "), stored[:80]
    end = re.search(rb"\r\n(?![ \t])", stored)
    assert end is not None and b"(mailgate) with " in stored[: end.start()], stored[:300]
    return stored[end.end() :]


@dataclass
class Running:
    """A mailgate serving in this event loop."""

    config: Config
    host: str
    port: int
    http: HostPort
    smtp_tls: HostPort | None = None  # the implicit-TLS listener ([smtp] tls_listen)

    async def send(
        self,
        message: EmailMessage | bytes,
        *,
        sender: str = "customer@example.org",
        recipients: tuple[str, ...] = (SUPPORT,),
    ) -> str:
        """Send one message and return the queue id from the 250 reply; `sender=""` sends
        it with the null sender (MAIL FROM:<>)."""
        if not sender:  # aiosmtplib.send insists on a sender; its client takes the null one
            raw = (
                message.as_bytes(policy=email.policy.SMTP)
                if isinstance(message, EmailMessage)
                else message
            )
            async with aiosmtplib.SMTP(hostname=self.host, port=self.port) as client:
                errors, reply = await client.sendmail("", list(recipients), raw)
        else:
            errors, reply = await aiosmtplib.send(
                message,
                sender=sender,
                recipients=list(recipients),
                hostname=self.host,
                port=self.port,
            )
        assert not errors, errors
        assert reply.startswith("2.0.0 Queued as "), reply
        return reply.rsplit(" ", 1)[1]

    async def settle(self, within: float = 30) -> None:
        """Wait until ingest has finished every received row, deferred ones included."""
        deadline = time.monotonic() + within
        async with store_for(self.config) as store:
            while await store.list_inbound("received"):
                assert time.monotonic() < deadline, "ingest did not finish"
                await asyncio.sleep(0.02)

    async def tickets(self) -> list[Ticket]:
        await self.settle()
        async with store_for(self.config) as store:
            summaries = await store.list_tickets()
            full = [await store.get_ticket(t.id) for t in summaries]
        return [t for t in full if t is not None]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli("--config", str(self.config.path), *args)

    async def cli_beside(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`cli` for a command that waits on the daemon: an in-process daemon runs on this
        event loop, which `cli` blocks, so a read of its caught mid-way keeps its snapshot,
        and an erasure's checkpoint (which waits for every reader) gives up."""
        return await asyncio.to_thread(self.cli, *args)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `mailgate` command line in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "mailgate", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def cli_json(running: Running, *args: str) -> Any:
    result = running.cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# The store backends that the store contract suite (tests/test_store_contract.py) and the
# ticket rules' tests (tests/test_tickets.py) run on: each opens a store whose data lives in
# the folder it is given. This is the one place those tests open a store, so a backend is
# added, or opening one changes (a keyring for encryption), here alone.
StoreOpener = Callable[[], AbstractAsyncContextManager[Store]]


def _sqlite_backend(folder: Path) -> AbstractAsyncContextManager[Store]:
    return open_test_store(folder / "mailgate.db")


STORE_BACKENDS: dict[str, Callable[[Path], AbstractAsyncContextManager[Store]]] = {
    "sqlite": _sqlite_backend,
}


@pytest.fixture(params=sorted(STORE_BACKENDS))
def open_backend(request: pytest.FixtureRequest, tmp_path: Path) -> StoreOpener:
    """Open the backend under test: `async with open_backend() as store:`. Every call opens
    the same data again, so a test can close the store and see what survived."""
    backend = STORE_BACKENDS[request.param]
    folder = tmp_path / request.param
    return lambda: backend(folder)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return load_config(write_config(tmp_path))


@asynccontextmanager
async def daemon_running(config: Config) -> AsyncIterator[Running]:
    """Serve `config` in this event loop until the block ends."""
    stop = asyncio.Event()
    ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(config, shutdown=stop.wait, on_ready=ready.set_result))
    done, _ = await asyncio.wait([task, ready], timeout=10, return_when=asyncio.FIRST_COMPLETED)
    assert ready in done, task.exception() if task.done() else "daemon did not start"
    listening = ready.result()
    try:
        yield Running(
            config, listening.smtp.host, listening.smtp.port, listening.http, listening.smtp_tls
        )
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


@pytest.fixture
async def daemon(config: Config) -> AsyncIterator[Running]:
    async with daemon_running(config) as running:
        yield running


def mail(
    *,
    sender: str = "Customer <customer@example.org>",
    to: str = SUPPORT,
    subject: str = "Printer on fire",
    body: str = "Hello, my printer is on fire.\n",
    message_id: str | None = None,
    in_reply_to: str | None = None,
    references: str | None = None,
    cc: str | None = None,
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    if cc:
        msg["Cc"] = cc
    msg["Subject"] = subject
    msg["Date"] = formatdate()
    msg["Message-ID"] = message_id or make_msgid(domain="client.example")
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
    if references:
        msg["References"] = references
    msg.set_content(body)
    return msg


# `python -c` program: set RLIMIT_NOFILE to argv[1], argv[2] (soft, hard), then run mailgate
# with the remaining arguments. No preexec_fn: it is not safe in a process with threads.
_WITH_NOFILE = (
    "import resource, runpy, sys\n"
    "limits = (int(sys.argv.pop(1)), int(sys.argv.pop(1)))\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, limits)\n"
    "sys.argv[0] = 'mailgate'\n"
    "runpy.run_module('mailgate', run_name='__main__', alter_sys=True)\n"
)


class SubprocessDaemon:
    """`mailgate serve` as its own process, as systemd runs it.

    `port` is its SMTP port, `http_port` its HTTP port; `config` holds TOML lines for the
    test config's sections (`write_config`'s `*_extra` and `outbound_timeout`).
    """

    def __init__(
        self,
        folder: Path,
        relay_port: int | None = None,
        *,
        log_level: str = "warning",
        **config: Any,
    ) -> None:
        self.folder = folder
        self.port = free_port()
        self.http_port = free_port()
        self.config_path = write_config(
            folder,
            smtp_port=self.port,
            http_port=self.http_port,
            log_level=log_level,
            relay_port=relay_port,
            **config,
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(
        self, *, nofile: tuple[int, int] | None = None, env: dict[str, str] | None = None
    ) -> None:
        """Start and wait for the SMTP greeting; `nofile` (soft, hard) sets its RLIMIT_NOFILE
        (systemd gives services 1024), whatever this process has; `env` adds to the
        environment (NOTIFY_SOCKET, as systemd sets it)."""
        self.log = open(self.folder / "daemon.log", "ab")
        launcher = ["-m", "mailgate"]
        if nofile is not None:
            launcher = ["-c", _WITH_NOFILE, *(str(n) for n in nofile)]
        self.proc = subprocess.Popen(
            [sys.executable, *launcher, "--config", str(self.config_path), "serve"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.folder / "daemon.log").read_text()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    if sock.recv(100).startswith(b"220"):
                        return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("daemon did not start")

    def kill(self, sig: int = 9) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        if getattr(self, "log", None):
            self.log.close()

    @property
    def database(self) -> Path:
        return self.folder / "var" / "mailgate.db"

    @property
    def config(self) -> Config:
        return load_config(self.config_path)


def events(daemon: SubprocessDaemon) -> list[dict[str, Any]]:
    """The daemon's JSON log lines so far (a line being written is left for the next look).

    Lines that are not JSON are stderr: after a forced exit, multiprocessing's resource
    tracker warns that it cleans up the parser pool's semaphores.
    """
    text = (daemon.folder / "daemon.log").read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    return [json.loads(line) for line in lines if line.startswith("{") and line.endswith("\n")]


def wait_for_event(daemon: SubprocessDaemon, name: str, *, after: int = 0) -> dict[str, Any]:
    """The first `name` event logged after the first `after` events."""
    deadline = time.monotonic() + 30
    while True:
        found = [e for e in events(daemon)[after:] if e.get("event") == name]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no {name} in {events(daemon)[after:]}"
        time.sleep(0.02)


@contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """Mount a real, small filesystem at `folder` (skip where mounting is not allowed)."""
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill_disk(folder: Path, *, leave: int) -> Path:
    """Write a ballast file in `folder` so that about `leave` bytes stay free on its disk."""
    ballast = folder / "ballast"
    size = shutil.disk_usage(folder).free - leave
    assert size > 0, "the disk is already fuller than that"
    with ballast.open("wb") as out:
        for _ in range(size // (1 << 20)):
            out.write(bytes(1 << 20))
        out.write(bytes(size % (1 << 20)))
    return ballast


def eml(name: str) -> bytes:
    return (MAIL_DATA / f"{name}.eml").read_bytes()


@pytest.fixture
def subprocess_daemon(tmp_path: Path) -> Iterator[SubprocessDaemon]:
    daemon = SubprocessDaemon(tmp_path / "daemon")
    yield daemon
    daemon.kill()


@dataclass
class Received:
    """One mail as the relay got it."""

    mail_from: str
    rcpt_tos: list[str]
    raw: bytes

    @property
    def message(self) -> EmailMessage:
        parsed = BytesParser(policy=email.policy.default).parsebytes(self.raw)
        assert isinstance(parsed, EmailMessage)
        return parsed

    def text(self) -> str:
        body = self.message.get_body(("plain",))
        assert body is not None
        return str(body.get_content())


class Relay:
    """A real SMTP relay on loopback (aiosmtpd) that records what mailgate delivers.

    `reply` chooses its answer to DATA: None accepts, "550 ..." rejects, "451 ..." defers.
    `refuse` maps a recipient to its answer at RCPT ("550 ...", several lines joined by CRLF
    as a multi-line reply), as a relay that knows the mailbox is gone answers at once.
    `stop()`/`start()` take it off the air and back on the same port.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[Received] = []
        self.attempts = 0
        self.reply: str | None = None
        self.refuse: dict[str, str] = {}
        self._server: asyncio.AbstractServer | None = None

    async def handle_RCPT(
        self, _server: Any, _session: Any, envelope: Any, address: str, _options: list[str]
    ) -> str:
        refusal = self.refuse.get(address.lower())
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:
        self.attempts += 1
        if self.reply is not None:
            return self.reply
        self.received.append(
            Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
        )
        return "250 2.0.0 OK"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(self, hostname="relay.test"), "127.0.0.1", self.port
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def wait_for(self, count: int, *, within: float = 15) -> list[Received]:
        """Wait until at least `count` mails arrived; return all of them."""
        deadline = time.monotonic() + within
        while len(self.received) < count:
            assert time.monotonic() < deadline, f"relay got {len(self.received)} of {count}"
            await asyncio.sleep(0.05)
        return self.received

    def kinds(self) -> list[str]:
        """What each received mail is, by its template's subject line."""
        return [r.message["Subject"] for r in self.received]


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    server = Relay()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def relay_config(tmp_path: Path, relay: Relay) -> Config:
    return load_config(write_config(tmp_path, relay_port=relay.port))


@dataclass(frozen=True)
class Key:
    private_pem: bytes
    dns_record: str


@pytest.fixture(scope="session")
def key(tmp_path_factory: pytest.TempPathFactory) -> Key:
    """A real RSA key pair, its public half published as a DKIM record."""
    return Key(*dkim_key_pair(tmp_path_factory.mktemp("dkim")))
