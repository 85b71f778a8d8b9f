"""TLS under attack: state across STARTTLS, and handshakes that never finish.

One daemon (STARTTLS offered, not required; a trusted proxy on loopback; TLS from the first
byte on `tls_listen`; three sessions per address), real sockets, a trustme certificate.
"""

from __future__ import annotations

import asyncio
import email.policy
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.parser import BytesParser
from pathlib import Path

import aiosmtplib
import pytest
import pytest_asyncio
import trustme

from mailgate.config import Config, load_config
from mailgate.model import HostPort
from mailgate.store import store_for
from tests.conftest import SUPPORT, daemon_running, mail, run_cli, write_config
from tests.test_tls import (
    Pki,
    TlsRelay,
    _lines,
    deferred_with,
    make_pki,
    outbox_until,
    received,
    relayed,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

HELO = "client.example"
IDLE_TIMEOUT = 3
PER_IP = 3


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def daemon(
    pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Config, HostPort, HostPort, Pki]]:
    smtp_extra = (
        f'tls_cert = "{pki.cert}"\ntls_key = "{pki.key}"\ntls_listen = "127.0.0.1:0"\n'
        f"timeout = {IDLE_TIMEOUT}\nmax_connections_per_ip = {PER_IP}\n"
        'trusted_proxies = ["127.0.0.1/32"]'
    )
    config = load_config(write_config(tmp_path_factory.mktemp("attacks"), smtp_extra=smtp_extra))
    async with daemon_running(config) as running:
        assert running.smtp_tls is not None
        yield config, HostPort(running.host, running.port), running.smtp_tls, pki


async def _welcomed_again(address: HostPort) -> None:
    """Wait until a new session is greeted 220, not 421 (the daemon has seen the last
    closed connections go); fail if that never comes."""
    async with asyncio.timeout(10):
        for _ in range(200):
            reader, writer = await asyncio.open_connection(address.host, address.port)
            greeting = (await _lines(reader))[0]
            writer.close()
            if greeting.startswith("220 "):
                return
            assert greeting.startswith("421 4.7.0 Too many connections from"), greeting
            await asyncio.sleep(0.05)
    raise AssertionError("still refused")


async def test_an_envelope_and_xforward_from_before_starttls_are_forgotten(
    daemon: tuple[Config, HostPort, HostPort, Pki],
) -> None:
    """RFC 3207 section 4.2: XFORWARD, EHLO and MAIL sent in clear are discarded by STARTTLS;
    over TLS EHLO is needed again, RCPT needs a new MAIL, and the stored envelope holds only
    what came encrypted."""
    config, plain, _, pki = daemon
    reader, writer = await asyncio.open_connection(plain.host, plain.port)
    try:
        await _lines(reader)
        for command in (f"EHLO {HELO}", "XFORWARD ADDR=192.0.2.7 HELO=forged.example"):
            writer.write(f"{command}\r\n".encode())
            await _lines(reader)
        writer.write(b"MAIL FROM:<clear@evil.example>\r\n")
        assert (await _lines(reader))[0].startswith("250 ")
        writer.write(b"STARTTLS\r\n")
        assert await _lines(reader) == ["220 Ready to start TLS"]
        await writer.start_tls(pki.client(), server_hostname="127.0.0.1")
        writer.write(f"RCPT TO:<{SUPPORT}>\r\n".encode())
        assert await _lines(reader) == ["503 5.5.1 Send HELO first"]
        writer.write(b"EHLO after.example\r\n")
        await _lines(reader)
        writer.write(f"RCPT TO:<{SUPPORT}>\r\n".encode())
        assert await _lines(reader) == ["503 5.5.1 Need MAIL command"]
        writer.write(
            f"MAIL FROM:<customer@example.org>\r\nRCPT TO:<{SUPPORT}>\r\nDATA\r\n".encode()
        )
        await _lines(reader)
        await _lines(reader)
        assert (await _lines(reader))[0].startswith("354 ")
        writer.write(mail().as_bytes(policy=email.policy.SMTP) + b".\r\n")
        queued = await _lines(reader)
        assert queued[0].startswith("250 2.0.0 Queued as "), queued
    finally:
        writer.close()
    async with store_for(config) as store:
        row = await store.get_inbound(queued[0].rsplit(" ", 1)[1])
    assert row is not None
    assert (row.envelope.mail_from, row.envelope.helo) == ("customer@example.org", "after.example")
    assert row.envelope.forwarded is None


async def test_a_stalled_implicit_tls_handshake_is_cut_at_the_idle_timeout(
    daemon: tuple[Config, HostPort, HostPort, Pki],
) -> None:
    """A client that connects to tls_listen and never sends its ClientHello holds a socket
    for [smtp] timeout, as on the plain listener, not for asyncio's 60 s default."""
    _, _, implicit, _ = daemon
    reader, writer = await asyncio.open_connection(implicit.host, implicit.port)
    try:
        async with asyncio.timeout(IDLE_TIMEOUT + 20):  # a generous bound, far below 60 s
            assert await reader.read() == b""
    finally:
        writer.close()


async def test_stalled_implicit_tls_handshakes_count_towards_the_per_address_limit(
    daemon: tuple[Config, HostPort, HostPort, Pki],
) -> None:
    """Connections to tls_listen still in their handshake are sessions, as those on the plain
    listener are from their accept: a client cannot hold unlimited sockets (descriptors) by
    never finishing its handshakes. The next one from that address is told 421."""
    _, plain, implicit, _ = daemon
    stalled = [await asyncio.open_connection(implicit.host, implicit.port) for _ in range(PER_IP)]
    try:
        await asyncio.sleep(0.2)  # let the daemon accept them (the same event loop)
        reader, writer = await asyncio.open_connection(plain.host, plain.port)
        try:
            assert (await _lines(reader))[0].startswith("421 4.7.0 Too many connections from")
        finally:
            writer.close()
    finally:
        for _, stalled_writer in stalled:
            stalled_writer.close()
    await _welcomed_again(plain)  # the daemon saw them go: the next test may connect


async def test_a_message_cannot_continue_our_received_field(
    daemon: tuple[Config, HostPort, HostPort, Pki],
) -> None:
    """Data whose first line starts with white space would be read as a continuation of the
    Received field we put on top, letting a client sending in clear write "version=TLSv1.3"
    into our trace. As Postfix's smtpd does, an empty line goes between: ours stays whole."""
    config, plain, _, _ = daemon
    forged = b"\t(version=TLSv1.3 cipher=FORGED)\r\n" + mail().as_bytes(policy=email.policy.SMTP)
    client = aiosmtplib.SMTP(hostname=plain.host, port=plain.port, start_tls=False)
    async with client:
        _, reply = await client.sendmail("customer@example.org", [SUPPORT], forged)
    async with store_for(config) as store:
        raw = await store.read_raw(reply.rsplit(" ", 1)[1])
    assert raw is not None
    parsed = BytesParser(policy=email.policy.default).parsebytes(raw)
    fields = parsed.get_all("Received") or []
    assert fields and [f for f in fields if "FORGED" in str(f)] == []
    assert "with ESMTP id" in str(parsed["Received"])


async def test_failed_starttls_handshakes_leave_no_session_behind(
    daemon: tuple[Config, HostPort, HostPort, Pki],
) -> None:
    """A handshake that fails (garbage instead of a ClientHello) or that the client abandons
    ends its session: more of them than the per-address limit lock nobody out."""
    _, plain, _, _ = daemon
    for attempt in range(PER_IP + 1):
        reader, writer = await asyncio.open_connection(plain.host, plain.port)
        await _lines(reader)
        writer.write(f"EHLO {HELO}\r\nSTARTTLS\r\n".encode())
        await _lines(reader)
        assert await _lines(reader) == ["220 Ready to start TLS"]
        if attempt % 2:
            writer.write(b"\x16\x03\x01\x00\x05not a ClientHello\r\n")
        else:
            writer.write_eof()  # gone in the middle of the handshake
        async with asyncio.timeout(10):
            await reader.read()
        writer.close()
    await _welcomed_again(plain)


async def test_check_config_warns_of_a_readable_key_and_an_expired_certificate(
    tmp_path: Path,
) -> None:
    """A certificate past its end date loads (OpenSSL checks no dates on its own side) and
    fails every client that verifies; a key that others may read is no secret. check-config
    says so, and still passes (exit 0): neither stops the daemon."""
    ca = trustme.CA()
    now = datetime.now(UTC)
    issued = ca.issue_cert(
        "mailgate.test", not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)
    )
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    key.chmod(0o644)
    smtp_extra = f'tls_cert = "{cert}"\ntls_key = "{key}"'
    path = write_config(tmp_path / "etc", smtp_extra=smtp_extra)
    checked = await asyncio.to_thread(run_cli, "--config", str(path), "check-config")
    assert checked.returncode == 0, checked.stderr
    assert f"smtp: warning: the certificate {cert} expired on " in checked.stdout
    assert f"smtp: warning: the key {key} can be read by every user (mode 0644)" in (checked.stdout)
    key.chmod(0o600)
    fresh = ca.issue_cert("mailgate.test")
    fresh.cert_chain_pems[0].write_to_path(str(cert))
    fresh.private_key_pem.write_to_path(str(key))
    quiet = await asyncio.to_thread(run_cli, "--config", str(path), "check-config")
    assert quiet.returncode == 0, quiet.stderr
    assert "smtp: warning" not in quiet.stdout, quiet.stdout


async def test_a_relay_certificate_for_another_name_is_refused_even_opportunistically(
    tmp_path: Path,
) -> None:
    """The relay is written as an address (127.0.0.1); its certificate, from the trusted CA,
    names another host. A MITM with any valid certificate must not get the mail: it waits,
    with the mismatch in last_error, and nothing reaches that relay."""
    ca = trustme.CA()
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
    other = ca.issue_cert("relay.other.example")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    other.configure_cert(server)
    relay = await TlsRelay(server).start()
    outbound = f'tls = "opportunistic"\ntls_ca_file = "{tmp_path / "ca.pem"}"'
    try:
        async with relayed(tmp_path, relay, outbound) as daemon:
            await daemon.new_ticket("To a stranger")
            rows = await outbox_until(daemon.config, deferred_with("certificate not verified"))
    finally:
        await relay.stop()
    assert "IP address mismatch" in (rows[-1].last_error or ""), rows[-1].last_error
    assert relay.received == []


async def test_auth_offered_only_after_starttls_is_used_and_a_refused_login_defers(
    pki: Pki, tmp_path: Path
) -> None:
    """A relay that lists AUTH only in its EHLO reply over TLS: mailgate asks again after
    STARTTLS and logs in there. A refused login (535: a wrong or rotated password) defers
    the mail, never fails it; last_error quotes the relay, never the password."""
    relay = await TlsRelay(
        pki.server(), auth=True, auth_after_tls=True, no_login_mechanism=True
    ).start()
    outbound = (
        f'tls = "required"\ntls_ca_file = "{pki.ca_file}"\n'
        'username = "mailgate"\npassword = "s3cret-Pa55"'
    )
    async with relayed(tmp_path, relay, outbound) as daemon:
        await daemon.new_ticket("Hello")
        assert [tls for tls, _ in await received(relay, 2)] == [True, True]
        assert relay.logins and all(tls for _, tls in relay.logins)
        relay.logins_ok = False
        await daemon.new_ticket("Again")
        rows = await outbox_until(
            daemon.config, deferred_with("relay refused the login: 535 5.7.8")
        )
    await relay.stop()
    errors = [r.last_error or "" for r in rows if r.state != "sent"]
    assert errors and not any("s3cret" in e or "czNjcmV0" in e for e in errors), errors


async def test_implicit_tls_to_a_plain_text_port_defers_and_sends_nothing(
    tmp_path: Path,
) -> None:
    """tls = "implicit" pointed at a port that speaks SMTP in clear: the handshake fails on
    its banner, the mail waits with a TLS reason, and the relay gets nothing."""
    relay = await TlsRelay(None).start()
    try:
        async with relayed(tmp_path, relay, 'tls = "implicit"') as daemon:
            await daemon.new_ticket("Wrong port")
            rows = await outbox_until(daemon.config, deferred_with("TLS with the relay failed"))
    finally:
        await relay.stop()
    assert all(r.state == "queued" for r in rows), rows
    assert relay.received == []
