"""TLS with real certificates (trustme): STARTTLS and implicit TLS in, the relay's TLS out.

Inbound, one daemon serves every test: `require_tls`, STARTTLS on its listener and TLS from
the first byte on `tls_listen` (its port 0, reported by `on_ready`). Outbound, a real aiosmtpd
relay on loopback with a certificate of the test CA, another CA's or none at all.
"""

from __future__ import annotations

import asyncio
import email.policy
import re
import smtplib
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import pytest_asyncio
import trustme
from aiosmtpd.smtp import SMTP, AuthResult

from mailgate.config import Config, load_config
from mailgate.model import HostPort, OutboxRow
from mailgate.store import store_for
from tests.conftest import SUPPORT, daemon_running, free_port, mail, write_config

pytestmark = pytest.mark.asyncio(loop_scope="module")

HELO = "client.example"
IDLE_TIMEOUT = 4  # [smtp] timeout of the inbound daemon: a stalled handshake is cut then


@dataclass(frozen=True)
class Pki:
    """A test CA and a server certificate of it for 127.0.0.1, as PEM files."""

    ca: trustme.CA
    ca_file: Path
    cert: Path
    key: Path

    def client(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def server(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost", "mailgate.test")
    pki = Pki(ca, folder / "ca.pem", folder / "cert.pem", folder / "key.pem")
    ca.cert_pem.write_to_path(str(pki.ca_file))
    issued.cert_chain_pems[0].write_to_path(str(pki.cert))
    for pem in issued.cert_chain_pems[1:]:
        pem.write_to_path(str(pki.cert), append=True)
    issued.private_key_pem.write_to_path(str(pki.key))
    return pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@dataclass
class Inbound:
    """The inbound daemon's two listeners and its store."""

    config: Config
    smtp: HostPort
    smtp_tls: HostPort

    async def raw(self, queue_id: str) -> bytes:
        async with store_for(self.config) as store:
            raw = await store.read_raw(queue_id)
        assert raw is not None
        return raw


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def inbound(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Inbound]:
    smtp_extra = (
        f'tls_cert = "{pki.cert}"\ntls_key = "{pki.key}"\nrequire_tls = true\n'
        'tls_listen = "127.0.0.1:0"\n'
        f"timeout = {IDLE_TIMEOUT}"
    )
    config = load_config(write_config(tmp_path_factory.mktemp("inbound"), smtp_extra=smtp_extra))
    async with daemon_running(config) as running:
        assert running.smtp_tls is not None and running.smtp_tls.port not in (0, running.port)
        yield Inbound(config, HostPort(running.host, running.port), running.smtp_tls)


# -- inbound ------------------------------------------------------------------------------


def _starttls_session(pki: Pki, address: HostPort) -> dict[str, Any]:
    """A whole session with smtplib: plain MAIL (refused), STARTTLS, then a mail."""
    with smtplib.SMTP(address.host, address.port, timeout=15) as client:
        client.ehlo(HELO)
        offered = client.has_extn("starttls")
        refused = client.mail("customer@example.org")
        client.starttls(context=pki.client())
        sock = client.sock
        assert isinstance(sock, ssl.SSLSocket)
        client.ehlo(HELO)
        features = dict(client.esmtp_features)
        assert client.mail("customer@example.org")[0] == 250
        assert client.rcpt(SUPPORT)[0] == 250
        code, reply = client.data(mail(subject="Over TLS").as_bytes(policy=email.policy.SMTP))
        return {
            "offered": offered,
            "refused": refused,
            "features": features,
            "client_tls": (sock.version(), sock.cipher()[0]),  # type: ignore[index]
            "data": (code, reply.decode()),
        }


async def test_starttls_stores_the_mail_with_its_tls_in_the_received_field(
    inbound: Inbound, pki: Pki
) -> None:
    """require_tls refuses a plain MAIL with 530 5.7.0; after STARTTLS (verified against the
    test CA) the EHLO offers no STARTTLS again and the mail is stored under a Received field
    naming ESMTPS, the queue id of the 250, and the version and cipher the client saw."""
    session = await asyncio.to_thread(_starttls_session, pki, inbound.smtp)
    assert session["offered"]
    assert session["refused"] == (530, b"5.7.0 Must issue a STARTTLS command first")
    assert "starttls" not in session["features"]
    assert "auth" not in session["features"]
    code, reply = session["data"]
    assert code == 250 and reply.startswith("2.0.0 Queued as "), reply
    queue_id = reply.rsplit(" ", 1)[1]
    raw = await inbound.raw(queue_id)
    version, cipher = session["client_tls"]
    first = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\nFrom:")[0]
    assert first.decode() == (
        f"Received: from {HELO} ([127.0.0.1])\r\n"
        f"\tby mailgate.test (mailgate) with ESMTPS id {queue_id}\r\n"
        f"\t(version={version} cipher={cipher})\r\n"
        f"\tfor <{SUPPORT}>; " + first.decode().rsplit("; ", 1)[1]
    )
    assert version in ("TLSv1.2", "TLSv1.3")
    parsed = BytesParser(policy=email.policy.default).parsebytes(raw)
    assert parsed["Subject"] == "Over TLS"
    stamped = datetime.strptime(
        str(parsed["Received"]).rsplit("; ", 1)[1], "%a, %d %b %Y %H:%M:%S %z"
    )
    assert abs(stamped.timestamp() - time.time()) < 300  # a date, and today's


async def test_the_implicit_tls_listener_takes_mail_without_starttls(
    inbound: Inbound, pki: Pki
) -> None:
    """tls_listen speaks TLS from the first byte (require_tls is met by it), offers no
    STARTTLS; two recipients: the Received field names neither."""
    address = inbound.smtp_tls
    client = aiosmtplib.SMTP(
        hostname=address.host, port=address.port, use_tls=True, tls_context=pki.client(),
        local_hostname=HELO,
    )  # fmt: skip
    async with client:
        await client.ehlo()
        assert not client.supports_extension("starttls")
        assert not client.supports_extension("auth")  # mailgate takes no logins
        refused = await client.execute_command(b"STARTTLS")
        assert (refused.code, refused.message) == (502, "5.5.1 STARTTLS not offered")
        message = mail(subject="Implicit").as_bytes(policy=email.policy.SMTP)
        errors, reply = await client.sendmail(
            "customer@example.org", [SUPPORT, "desk@help.example.com"], message
        )
    assert not errors and reply.startswith("2.0.0 Queued as "), reply
    raw = await inbound.raw(reply.rsplit(" ", 1)[1])
    header = raw.split(b"\r\nFrom:")[0].decode()
    assert re.fullmatch(
        rf"Received: from {HELO} \(\[127\.0\.0\.1\]\)\r\n"
        rf"\tby mailgate\.test \(mailgate\) with ESMTPS id [0-9A-F]{{20}}\r\n"
        r"\t\(version=TLSv1\.[23] cipher=[A-Z0-9_-]+\); .+",
        header,
    ), header


async def _lines(reader: asyncio.StreamReader) -> list[str]:
    """One whole reply, each of its lines."""
    lines: list[str] = []
    async with asyncio.timeout(10):
        while not lines or lines[-1][3:4] == "-":
            line = await reader.readline()
            assert line, f"connection closed after {lines}"
            lines.append(line.decode().rstrip("\r\n"))
    return lines


async def _told_to_start_tls(
    address: HostPort,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection that has said EHLO and STARTTLS and been told to begin the handshake."""
    reader, writer = await asyncio.open_connection(address.host, address.port)
    await _lines(reader)
    writer.write(f"EHLO {HELO}\r\nSTARTTLS\r\n".encode())
    await _lines(reader)
    assert await _lines(reader) == ["220 Ready to start TLS"]
    return reader, writer


async def test_commands_pipelined_behind_starttls_are_discarded(inbound: Inbound, pki: Pki) -> None:
    """CVE-2011-0411: commands sent in clear in the same packet as STARTTLS must not run once
    TLS is up, as if the client had sent them encrypted. The next reply over TLS is the
    EHLO's, and the injected MAIL never happened."""
    reader, writer = await asyncio.open_connection(inbound.smtp.host, inbound.smtp.port)
    try:
        assert (await _lines(reader))[0].startswith("220 ")
        writer.write(f"EHLO {HELO}\r\n".encode())
        assert "250-STARTTLS" in await _lines(reader)
        writer.write(
            b"STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\nRCPT TO:<support@example.com>\r\n"
        )
        assert await _lines(reader) == ["220 Ready to start TLS"]
        await writer.start_tls(pki.client(), server_hostname="127.0.0.1")
        writer.write(f"EHLO {HELO}\r\n".encode())
        ehlo = await _lines(reader)
        assert ehlo[0] == "250-mailgate.test", ehlo
        assert not any("STARTTLS" in line for line in ehlo)
        writer.write(f"RCPT TO:<{SUPPORT}>\r\n".encode())
        assert await _lines(reader) == ["503 5.5.1 Need MAIL command"]
        writer.write(b"STARTTLS\r\n")
        assert await _lines(reader) == ["554 5.5.1 Error: TLS already active"]
        writer.write(b"QUIT\r\n")
        assert await _lines(reader) == ["221 2.0.0 Bye"]
    finally:
        writer.close()


async def test_a_failed_handshake_closes_that_session_only(inbound: Inbound) -> None:
    """Bytes that are not TLS after the 220: the session is closed, nothing is answered in
    clear, and the daemon serves the next client as before."""
    reader, writer = await _told_to_start_tls(inbound.smtp)
    try:
        writer.write(b"\x16\x03\x01\x00\x05hello, this is not a ClientHello\r\n")
        async with asyncio.timeout(10):
            rest = await reader.read()
        assert b"220" not in rest and b"451" not in rest  # no reply in clear: TLS alert at most
    finally:
        writer.close()
    client = aiosmtplib.SMTP(hostname=inbound.smtp.host, port=inbound.smtp.port, start_tls=False)
    async with client:
        assert (await client.noop()).code == 250


# -- outbound -----------------------------------------------------------------------------


@dataclass
class TlsRelay:
    """A real relay (aiosmtpd) on loopback: STARTTLS with `tls` (TLS from the first byte
    with `implicit`), AUTH (also in clear, as a careless relay offers it) with `auth`;
    records each mail and each login with whether TLS carried it."""

    tls: ssl.SSLContext | None
    auth: bool = False
    implicit: bool = False
    auth_after_tls: bool = False  # AUTH offered only once STARTTLS is done (aiosmtpd's default)
    logins_ok: bool = True
    # aiosmtpd's LOGIN ignores aiosmtplib's initial response: a refused PLAIN then waits
    # out the timeout in LOGIN. Exclude it where a refusal is the point.
    no_login_mechanism: bool = False
    port: int = field(default_factory=free_port)
    received: list[tuple[bool, bytes]] = field(default_factory=list)
    logins: list[tuple[str, bool]] = field(default_factory=list)
    _server: asyncio.AbstractServer | None = None

    async def handle_DATA(self, server: Any, _session: Any, envelope: Any) -> str:
        self.received.append((_encrypted(server), envelope.original_content))
        return "250 2.0.0 OK"

    def _authenticate(
        self, _server: Any, session: Any, _envelope: Any, mechanism: str, _data: Any
    ) -> AuthResult:
        self.logins.append((mechanism, _encrypted(_server)))
        return AuthResult(success=self.logins_ok, handled=False)  # a refusal is answered 535

    async def start(self) -> TlsRelay:
        self._server = await asyncio.get_running_loop().create_server(
            lambda: SMTP(
                self,
                hostname="relay.test",
                tls_context=None if self.implicit else self.tls,
                authenticator=self._authenticate if self.auth else None,
                auth_require_tls=self.auth_after_tls,
                auth_exclude_mechanism=["LOGIN"] if self.no_login_mechanism else None,
            ),
            "127.0.0.1",
            self.port,
            ssl=self.tls if self.implicit else None,
        )
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


def _encrypted(server: Any) -> bool:
    return server.transport.get_extra_info("ssl_object") is not None


@dataclass
class Sending:
    """A daemon that delivers to a relay, and a way to make it deliver."""

    config: Config
    smtp: HostPort

    async def new_ticket(self, subject: str) -> None:
        """A customer's mail: its ticket's acknowledgement (and verification) follow."""
        await aiosmtplib.send(
            mail(sender="Ann <ann@example.org>", subject=subject),
            hostname=self.smtp.host, port=self.smtp.port, start_tls=False,
        )  # fmt: skip


@asynccontextmanager
async def relayed(tmp: Path, relay: TlsRelay, outbound: str) -> AsyncIterator[Sending]:
    """A daemon delivering to `relay` with the `[outbound]` TLS lines `outbound`."""
    path = write_config(tmp, relay_port=relay.port)
    text = path.read_text(encoding="utf-8").replace('tls = "none"\n', outbound + "\n")
    path.write_text(text, encoding="utf-8")
    config = load_config(path)
    async with daemon_running(config) as running:
        yield Sending(config, HostPort(running.host, running.port))


async def outbox_until(config: Config, done: Any, *, within: float = 15) -> list[OutboxRow]:
    """The outbox rows once `done(rows)` holds."""
    deadline = time.monotonic() + within
    while True:
        async with store_for(config) as store:
            rows = await store.list_outbox()
        if rows and done(rows):
            return rows
        assert time.monotonic() < deadline, f"outbox never got there: {rows}"
        await asyncio.sleep(0.1)


async def received(relay: TlsRelay, count: int, *, within: float = 15) -> list[tuple[bool, bytes]]:
    deadline = time.monotonic() + within
    while len(relay.received) < count:
        assert time.monotonic() < deadline, f"relay got {len(relay.received)} of {count}"
        await asyncio.sleep(0.05)
    return relay.received


def deferred_with(reason: str) -> Any:
    """Every row not sent is queued again after an attempt that failed for `reason`."""
    return lambda rows: (
        any(r.state != "sent" for r in rows)
        and all(
            r.state == "queued" and r.attempts >= 1 and reason in (r.last_error or "")
            for r in rows
            if r.state != "sent"
        )
    )


async def test_required_tls_delivers_verified_and_defers_anything_less(
    pki: Pki, tmp_path: Path
) -> None:
    """tls = "required" with the test CA as tls_ca_file: delivered over STARTTLS. The same
    relay address with a certificate of another CA, then with no STARTTLS at all: the mail
    waits (queued, retried, the reason in last_error) and never reaches it in clear."""
    relay = await TlsRelay(pki.server()).start()
    outbound = f'tls = "required"\ntls_ca_file = "{pki.ca_file}"'
    async with relayed(tmp_path, relay, outbound) as daemon:
        await daemon.new_ticket("First")
        assert [tls for tls, _ in await received(relay, 2)] == [True, True]
        await relay.stop()

        stranger = make_pki(tmp_path / "stranger")
        untrusted = await TlsRelay(stranger.server(), port=relay.port).start()
        await daemon.new_ticket("Second")
        rows = await outbox_until(daemon.config, deferred_with("certificate not verified"))
        error = rows[-1].last_error or ""
        assert error.startswith("TLS with the relay failed: certificate not verified"), error
        assert "outbound.tls_ca_file" in error
        await untrusted.stop()
        assert untrusted.received == []

        plain = await TlsRelay(None, port=relay.port).start()
        rows = await outbox_until(daemon.config, deferred_with("does not offer STARTTLS"))
        assert rows[-1].last_error == (
            "relay does not offer STARTTLS (outbound.tls = required); not sent in clear"
        )
        await plain.stop()
        assert plain.received == []


async def test_opportunistic_tls_delivers_in_clear_to_a_relay_without_starttls(
    tmp_path: Path,
) -> None:
    """The default: STARTTLS when offered; a relay that offers none gets the mail in clear."""
    relay = await TlsRelay(None).start()
    async with relayed(tmp_path, relay, "") as daemon:
        await daemon.new_ticket("Hello")
        assert [tls for tls, _ in await received(relay, 2)] == [False, False]
    await relay.stop()


async def test_implicit_tls_delivers_to_a_port_465_relay(pki: Pki, tmp_path: Path) -> None:
    """tls = "implicit": TLS from the first byte, verified, then AUTH over it."""
    relay = await TlsRelay(pki.server(), auth=True, implicit=True).start()
    outbound = (
        f'tls = "implicit"\ntls_ca_file = "{pki.ca_file}"\n'
        'username = "mailgate"\npassword = "s3cret"'
    )
    async with relayed(tmp_path, relay, outbound) as daemon:
        await daemon.new_ticket("Hello")
        assert [tls for tls, _ in await received(relay, 2)] == [True, True]
    assert relay.logins and all(tls for _, tls in relay.logins)
    await relay.stop()


async def test_auth_is_never_sent_in_clear(pki: Pki, tmp_path: Path) -> None:
    """A username, opportunistic TLS, and a relay that offers AUTH but no STARTTLS: no AUTH
    command reaches it and the mail waits. The same relay with STARTTLS: the login goes
    over TLS and the mail follows."""
    careless = await TlsRelay(None, auth=True).start()
    outbound = (
        f'tls = "opportunistic"\ntls_ca_file = "{pki.ca_file}"\n'
        'username = "mailgate"\npassword = "s3cret"'
    )
    async with relayed(tmp_path, careless, outbound) as daemon:
        await daemon.new_ticket("Hello")
        rows = await outbox_until(daemon.config, deferred_with("AUTH is never sent in clear"))
        assert len(rows) == 2
        await careless.stop()
        assert careless.logins == [] and careless.received == []

        careful = await TlsRelay(pki.server(), auth=True, port=careless.port).start()
        assert [tls for tls, _ in await received(careful, 2, within=30)] == [True, True]
        assert careful.logins and all(tls for _, tls in careful.logins)
        await careful.stop()


async def test_a_client_that_stalls_in_the_handshake_is_cut_off_saying_nothing_in_clear(
    inbound: Inbound,
) -> None:
    """STARTTLS, then no ClientHello: the idle timeout closes the connection, and its 421
    is not written in clear into what should have been a TLS stream."""
    reader, writer = await _told_to_start_tls(inbound.smtp)
    try:
        async with asyncio.timeout(IDLE_TIMEOUT + 20):
            assert await reader.read() == b""
    finally:
        writer.close()


async def test_require_tls_lets_nothing_but_ehlo_noop_starttls_and_quit_through(
    inbound: Inbound,
) -> None:
    """No path around require_tls in clear: HELO (no EHLO, so no STARTTLS), RSET, VRFY,
    XFORWARD and MAIL are each refused 530 5.7.0; NOOP and EHLO are answered."""
    reader, writer = await asyncio.open_connection(inbound.smtp.host, inbound.smtp.port)
    try:
        await _lines(reader)
        refused = "530 5.7.0 Must issue a STARTTLS command first"
        for command in (f"HELO {HELO}", "RSET", f"VRFY <{SUPPORT}>", "XFORWARD ADDR=192.0.2.7"):
            writer.write(f"{command}\r\n".encode())
            assert await _lines(reader) == [refused], command
        writer.write(b"NOOP\r\n")
        assert (await _lines(reader))[0].startswith("250 ")
        writer.write(f"EHLO {HELO}\r\nMAIL FROM:<customer@example.org>\r\n".encode())
        assert "250-STARTTLS" in await _lines(reader)
        assert await _lines(reader) == [refused]
    finally:
        writer.close()
