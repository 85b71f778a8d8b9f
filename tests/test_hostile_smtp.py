"""Hostile SMTP clients, spoken to in raw bytes: what each one is told and what gets stored.

No client library here: smuggling, pipelined injection, trickled bytes and half-closes are
exactly what a library would smooth over. Each test asserts the reply (code and enhanced
status) and the store (inbound rows, tickets).
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import struct
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from mailgate.config import load_config
from mailgate.store import store_for
from tests.conftest import (
    SUPPORT,
    Running,
    as_sent,
    daemon_running,
    fill_disk,
    mail,
    tmpfs,
    write_config,
)

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

REPLY_TIMEOUT = 5.0


class Raw:
    """One SMTP connection as bytes: write lines, read reply lines, see the EOF."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, running: Running, *, source: str | None = None) -> Raw:
        reader, writer = await asyncio.open_connection(
            running.host, running.port, local_addr=(source, 0) if source else None
        )
        return cls(reader, writer)

    async def reply(self) -> str:
        """The next complete reply; a multi-line one as its last line."""
        async with asyncio.timeout(REPLY_TIMEOUT):
            while True:
                line = await self.reader.readline()
                assert line, "connection closed while a reply was expected"
                if line[3:4] != b"-":
                    return line.decode("utf-8").rstrip("\r\n")

    async def greeting(self) -> str:
        banner = await self.reply()
        assert banner.startswith("220 "), banner
        return banner

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def command(self, line: str | bytes) -> str:
        await self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return await self.reply()

    async def start(self, sender: str = "customer@example.org") -> None:
        """Greeting, EHLO and MAIL, as every test needs them."""
        await self.greeting()
        assert (await self.command("EHLO client.example")).startswith("250 ")
        assert await self.command(f"MAIL FROM:<{sender}>") == "250 2.1.0 Sender OK"

    async def closed(self) -> bool:
        """Tell whether the server closed the connection (EOF with nothing more to read)."""
        async with asyncio.timeout(REPLY_TIMEOUT):
            rest = await self.reader.read()
        return rest == b""

    def close(self) -> None:
        self.writer.close()


@asynccontextmanager
async def raw(running: Running, *, source: str | None = None) -> AsyncIterator[Raw]:
    conn = await Raw.open(running, source=source)
    try:
        yield conn
    finally:
        conn.close()


def inbound_count(running: Running) -> int:
    with sqlite3.connect(running.config.storage.database) as db:
        (count,) = db.execute("SELECT count(*) FROM inbound").fetchone()
    return int(count)


@asynccontextmanager
async def limited(tmp_path: Path, smtp_extra: str) -> AsyncIterator[Running]:
    """A daemon whose [smtp] section carries `smtp_extra` (limits set small for tests)."""
    config = load_config(write_config(tmp_path, smtp_extra=smtp_extra))
    async with daemon_running(config) as running:
        yield running


def message(subject: str = "Printer on fire", body: str = "Hello.\n") -> bytes:
    """A message as DATA bytes (CRLF lines, no final dot)."""
    return mail(subject=subject, body=body).as_bytes().replace(b"\n", b"\r\n")


# -- smuggling: only CRLF.CRLF ends DATA -------------------------------------------------


@pytest.mark.parametrize(
    "fake_end", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"], ids=repr
)
async def test_smuggled_transaction_stays_inside_the_one_message(
    daemon: Running, fake_end: bytes
) -> None:
    smuggled = (
        b"MAIL FROM:<attacker@evil.example>\r\n"
        b"RCPT TO:<support@example.com>\r\n"
        b"DATA\r\n"
        b"From: attacker@evil.example\r\nSubject: smuggled\r\n\r\nForged.\r\n"
    )
    async with raw(daemon) as conn:
        await conn.start()
        assert await conn.command(f"RCPT TO:<{SUPPORT}>") == "250 2.1.5 Recipient OK"
        assert (await conn.command("DATA")).startswith("354 ")
        body = message(subject="The real one").rstrip(b"\r\n") + fake_end + smuggled
        await conn.send(body + b"\r\n.\r\n")
        assert (await conn.reply()).startswith("250 2.0.0 Queued as ")
        # Nothing else was taken as a command: the next reply is QUIT's.
        assert await conn.command("QUIT") == "221 2.0.0 Bye"
    [ticket] = await daemon.tickets()
    assert ticket.subject == "The real one"
    assert ticket.message_count == 1
    assert inbound_count(daemon) == 1


# -- STARTTLS is not offered: refused plainly, the session stays what it was --------------


async def test_starttls_with_pipelined_injection_gets_502_and_no_state_change(
    daemon: Running,
) -> None:
    async with raw(daemon) as conn:
        await conn.greeting()
        await conn.send(b"EHLO client.example\r\n")
        ehlo = []
        while not (line := (await conn.reader.readline()).decode()).startswith("250 "):
            ehlo.append(line)
        assert not any("STARTTLS" in line for line in [*ehlo, line])
        # The classic injection: commands pipelined behind STARTTLS, meant to run "inside" TLS.
        await conn.send(
            b"STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\nRCPT TO:<support@example.com>\r\n"
        )
        assert await conn.reply() == "502 5.5.1 STARTTLS not offered"
        # Still the same plain session: the pipelined commands are answered in order, once.
        assert await conn.reply() == "250 2.1.0 Sender OK"
        assert await conn.reply() == "250 2.1.5 Recipient OK"
        assert await conn.command("RSET") == "250 2.0.0 OK"
        assert await conn.command(f"RCPT TO:<{SUPPORT}>") == "503 5.5.1 Need MAIL command"
        assert await conn.command("DATA") == "503 5.5.1 Need RCPT command"
        assert await conn.command("QUIT") == "221 2.0.0 Bye"
    assert inbound_count(daemon) == 0


# -- line lengths -----------------------------------------------------------------------


async def test_command_lines_over_512_octets_get_500_552(daemon: Running) -> None:
    async with raw(daemon) as conn:
        await conn.greeting()
        for _ in range(30):  # aiosmtpd grew MAIL's limit on every EHLO, for every session
            assert (await conn.command("EHLO client.example")).startswith("250 ")
        assert await conn.command("NOOP " + "x" * 507) == "250 2.0.0 OK"  # 512 octets
        assert await conn.command("NOOP " + "x" * 508) == "500 5.5.2 Command line too long"
        mail_from = "MAIL FROM:<" + "a" * 590 + "@example.org>"
        assert await conn.command(mail_from) == "500 5.5.2 Command line too long"
        # Past the reader's 10,002-octet limit: read to the end of the line, same answer.
        assert await conn.command("NOOP " + "x" * 20_000) == "500 5.5.2 Command line too long"
        assert await conn.command("MAIL FROM:<customer@example.org>") == "250 2.1.0 Sender OK"


@pytest.mark.parametrize("length", [998, 10_001, 60_000, 600_000])
async def test_data_lines_of_any_length_are_stored_whole(daemon: Running, length: int) -> None:
    # As Postfix: a line is limited only by the message size (real mailers send HTML and
    # base64 in one line). It is stored and ingested byte for byte.
    sent = message(subject=f"Line of {length}") + b"y" * length + b"\r\n"
    async with raw(daemon) as conn:
        await conn.start()
        assert await conn.command(f"RCPT TO:<{SUPPORT}>") == "250 2.1.5 Recipient OK"
        assert (await conn.command("DATA")).startswith("354 ")
        await conn.send(sent + b".\r\nNOOP\r\n")  # pipelined: read after the dot, not in it
        queued = await conn.reply()
        assert queued.startswith("250 2.0.0 Queued as ")
        assert await conn.reply() == "250 2.0.0 OK"
        assert await conn.command("QUIT") == "221 2.0.0 Bye"
    async with store_for(daemon.config) as store:
        assert as_sent(await store.read_raw(queued.rsplit(" ", 1)[1])) == sent
    [ticket] = await daemon.tickets()
    assert ticket.subject == f"Line of {length}"
    assert "y" * length in ticket.messages[0].body_text


async def test_a_long_line_that_starts_with_a_dot_is_unstuffed(daemon: Running) -> None:
    head = message()
    async with raw(daemon) as conn:
        await conn.start()
        assert await conn.command(f"RCPT TO:<{SUPPORT}>") == "250 2.1.5 Recipient OK"
        assert (await conn.command("DATA")).startswith("354 ")
        await conn.send(head + b".." + b"d" * 60_000 + b"\r\n.\r\n")
        queued = await conn.reply()
    async with store_for(daemon.config) as store:
        stored = await store.read_raw(queued.rsplit(" ", 1)[1])
    assert as_sent(stored) == head + b"." + b"d" * 60_000 + b"\r\n"


# -- size -------------------------------------------------------------------------------


async def test_declared_size_over_the_limit_gets_552_534_at_mail(daemon: Running) -> None:
    too_big = daemon.config.smtp.max_message_size + 1
    async with raw(daemon) as conn:
        await conn.greeting()
        await conn.command("EHLO client.example")
        assert await conn.command(f"MAIL FROM:<customer@example.org> SIZE={too_big}") == (
            "552 5.3.4 Message size exceeds fixed maximum message size"
        )
    assert inbound_count(daemon) == 0


async def test_undeclared_oversize_gets_552_534_after_data_and_nothing_is_stored(
    daemon: Running,
) -> None:
    lines = daemon.config.smtp.max_message_size // 1000 + 1
    async with raw(daemon) as conn:
        await conn.start()
        assert await conn.command(f"RCPT TO:<{SUPPORT}>") == "250 2.1.5 Recipient OK"
        assert (await conn.command("DATA")).startswith("354 ")
        await conn.send(message() + (b"z" * 998 + b"\r\n") * lines + b".\r\n")
        assert await conn.reply() == "552 5.3.4 Message too big for this system"
        assert await conn.command("QUIT") == "221 2.0.0 Bye"
    assert inbound_count(daemon) == 0


# -- recipients ---------------------------------------------------------------------------


async def test_recipient_101_gets_452_453_and_the_first_100_get_the_message(
    daemon: Running,
) -> None:
    assert daemon.config.smtp.max_recipients == 100
    async with raw(daemon) as conn:
        await conn.start()
        for n in range(100):
            assert await conn.command(f"RCPT TO:<r{n}@help.example.com>") == (
                "250 2.1.5 Recipient OK"
            )
        assert await conn.command("RCPT TO:<r100@help.example.com>") == (
            "452 4.5.3 Too many recipients"
        )
        assert (await conn.command("DATA")).startswith("354 ")
        await conn.send(message() + b".\r\n")
        queued = await conn.reply()
        assert queued.startswith("250 2.0.0 Queued as ")
    async with store_for(daemon.config) as store:
        row = await store.get_inbound(queued.rsplit(" ", 1)[1])
    assert row is not None
    assert row.envelope.rcpt_tos == tuple(f"r{n}@help.example.com" for n in range(100))


async def test_recipient_overshoot_is_allowed_once_then_counts_as_errors(
    tmp_path: Path,
) -> None:
    # A client may pipeline a list longer than the limit (RFC 5321 4.5.3.1.8); the excess
    # counts towards max_errors only beyond max_recipients more.
    async with (
        limited(tmp_path, "max_recipients = 2\nmax_errors = 2") as daemon,
        raw(daemon) as conn,
    ):
        await conn.start()
        for n in range(2):
            assert (await conn.command(f"RCPT TO:<r{n}@help.example.com>")).startswith("250 ")
        for n in range(3):  # excess 1 and 2: allowed; excess 3: error 1
            assert await conn.command(f"RCPT TO:<x{n}@help.example.com>") == (
                "452 4.5.3 Too many recipients"
            )
        assert await conn.command("RCPT TO:<x3@help.example.com>") == (
            "452 4.5.3 Too many recipients"
        )
        assert await conn.reply() == "421 4.7.0 Too many errors, closing connection"
        assert await conn.closed()


# -- connections --------------------------------------------------------------------------


async def test_connection_over_max_connections_gets_421_before_the_banner(
    tmp_path: Path,
) -> None:
    async with limited(tmp_path, "max_connections = 3") as daemon:
        held = [await Raw.open(daemon) for _ in range(3)]
        for conn in held:
            await conn.greeting()
        async with raw(daemon) as fourth:
            assert await fourth.reply() == "421 4.7.0 Too many connections, try again later"
            assert await fourth.closed()
        # The held sessions are unaffected, and a freed slot is usable again.
        assert await held[0].command("NOOP") == "250 2.0.0 OK"
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:
            async with raw(daemon) as again:
                banner = await again.reply()
            if banner.startswith("220 ") or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert banner.startswith("220 ")
        for conn in held:
            conn.close()


async def test_connections_over_max_per_ip_get_421_and_other_ips_are_served(
    tmp_path: Path,
) -> None:
    async with limited(tmp_path, "max_connections = 10\nmax_connections_per_ip = 2") as daemon:
        held = [await Raw.open(daemon) for _ in range(2)]
        for conn in held:
            await conn.greeting()
        async with raw(daemon) as third:
            assert await third.reply() == (
                "421 4.7.0 Too many connections from your address, try again later"
            )
            assert await third.closed()
        async with raw(daemon, source="127.0.0.2") as other:
            await other.greeting()
        for conn in held:
            conn.close()


# -- errors -------------------------------------------------------------------------------


async def test_errors_flood_gets_421_and_is_closed(tmp_path: Path) -> None:
    async with limited(tmp_path, "max_errors = 3") as daemon:
        async with raw(daemon) as conn:
            await conn.start()
            assert await conn.command("RCPT TO:<victim@elsewhere.example>") == (
                "550 5.1.1 Recipient not accepted here"
            )
            assert await conn.command("MAIL FROM:<again@example.org>") == (
                "503 5.5.1 Nested MAIL command"
            )
            assert await conn.command("RCPT TO:<@>") == ("553 5.1.3 Error: malformed address")
            assert await conn.reply() == "421 4.7.0 Too many errors, closing connection"
            assert await conn.closed()
        # Unknown commands: aiosmtpd's fixed limit of five, answered as a 421 too.
        async with (
            limited(tmp_path / "unknown", "max_errors = 20") as daemon2,
            raw(daemon2) as conn,
        ):
            await conn.greeting()
            for _ in range(4):
                assert await conn.command("XYZZY") == "500 5.5.1 Command not recognized"
            assert await conn.command("XYZZY") == (
                "421 4.7.0 Too many unrecognized commands, closing connection"
            )
            assert await conn.closed()


async def test_internal_error_answers_451_without_details(tmp_path: Path) -> None:
    # A real fault, not a mock: the database's folder disappears under the free-space check.
    async with limited(tmp_path, "max_errors = 2") as daemon, raw(daemon) as conn:
        await conn.greeting()
        await conn.command("EHLO client.example")
        var = daemon.config.storage.database.parent
        var.rename(tmp_path / "moved")
        try:
            for _ in range(3):  # our errors do not count against the client's max_errors
                assert await conn.command("MAIL FROM:<customer@example.org>") == (
                    "451 4.3.0 Temporary failure, please try again later"
                )
        finally:
            (tmp_path / "moved").rename(var)
        assert await conn.command("MAIL FROM:<customer@example.org>") == "250 2.1.0 Sender OK"


# -- time -------------------------------------------------------------------------------

SLOW = "timeout = 2\nmin_data_rate = 500"  # grace: min(10, 2 / 10) = 0.2 s


async def test_idle_session_gets_421_442(tmp_path: Path) -> None:
    async with limited(tmp_path, SLOW) as daemon, raw(daemon) as conn:
        await conn.start()
        started = time.monotonic()
        assert await conn.reply() == "421 4.4.2 Timeout, closing connection"
        # Not before the idle timeout (2 s); when after it depends on the machine.
        assert time.monotonic() - started > 1.5
        assert await conn.closed()


async def test_slowloris_during_data_is_cut_off_and_nothing_is_stored(tmp_path: Path) -> None:
    async with limited(tmp_path, SLOW) as daemon:
        async with raw(daemon) as conn:
            await conn.start()
            assert await conn.command(f"RCPT TO:<{SUPPORT}>") == "250 2.1.5 Recipient OK"
            assert (await conn.command("DATA")).startswith("354 ")
            reply = asyncio.ensure_future(conn.reply())
            for byte in message():  # one byte each 0.3 s: ~3 bytes/s, always "active"
                if reply.done():
                    break
                await conn.send(bytes([byte]))
                await asyncio.wait([reply], timeout=0.3)
            assert await reply == "421 4.4.2 Data transfer too slow, closing connection"
            assert await conn.closed()
        assert inbound_count(daemon) == 0
        assert await daemon.tickets() == []


async def test_stall_after_a_fast_start_is_an_idle_timeout(tmp_path: Path) -> None:
    async with limited(tmp_path, SLOW) as daemon:
        async with raw(daemon) as conn:
            await conn.start()
            assert await conn.command(f"RCPT TO:<{SUPPORT}>") == "250 2.1.5 Recipient OK"
            assert (await conn.command("DATA")).startswith("354 ")
            await conn.send(message() + b"x" * 900 + b"\r\n")  # then nothing: no dot
            assert await conn.reply() == "421 4.4.2 Timeout, closing connection"
            assert await conn.closed()
        assert inbound_count(daemon) == 0


async def test_slow_but_steady_upload_is_accepted(tmp_path: Path) -> None:
    # 8 KiB at 2 KiB/s against min_data_rate 500: four times the minimum, for 4 s.
    async with limited(tmp_path, SLOW) as daemon:
        async with raw(daemon) as conn:
            await conn.start()
            assert await conn.command(f"RCPT TO:<{SUPPORT}>") == "250 2.1.5 Recipient OK"
            assert (await conn.command("DATA")).startswith("354 ")
            data = message(subject="Slow link", body="slow but steady\n" * 500)
            chunks = [data[i : i + 205] for i in range(0, len(data), 205)][:40]
            for chunk in chunks:
                await conn.send(chunk)
                await asyncio.sleep(0.1)
            await conn.send(b"".join([data[len(chunks) * 205 :], b"\r\n.\r\n"]))
            assert (await conn.reply()).startswith("250 2.0.0 Queued as ")
        [ticket] = await daemon.tickets()
        assert ticket.subject == "Slow link"


# -- mail loops ---------------------------------------------------------------------------


def with_received(count: int, *, subject: str = "Looping") -> bytes:
    hops = b"".join(
        (b"Received" if n % 2 else b"received ")
        + b": from hop%d.example by hop%d.example;\r\n\tThu, 1 Jan 2026 00:00:00 +0000\r\n"
        % (n, n + 1)
        for n in range(count)
    )
    return hops + message(subject=subject)


# mailgate's own Received field counts too (as Postfix's hopcount_limit counts its own).
@pytest.mark.parametrize(("hops", "stored"), [(99, True), (100, False)])
async def test_more_than_100_received_headers_get_554_546(
    daemon: Running, hops: int, stored: bool
) -> None:
    async with raw(daemon) as conn:
        await conn.start()
        assert await conn.command(f"RCPT TO:<{SUPPORT}>") == "250 2.1.5 Recipient OK"
        assert (await conn.command("DATA")).startswith("354 ")
        # Received lines in the body are text, not hops.
        body = b"Received: from quoted.example\r\n" * 200
        await conn.send(with_received(hops) + body + b".\r\n")
        reply = await conn.reply()
        if stored:
            assert reply.startswith("250 2.0.0 Queued as ")
        else:
            assert reply == "554 5.4.6 Too many Received headers: mail loop detected"
        assert await conn.command("QUIT") == "221 2.0.0 Bye"
    assert inbound_count(daemon) == int(stored)


# -- half-close ---------------------------------------------------------------------------


async def test_half_close_right_after_the_final_dot_is_answered_and_stored_once(
    daemon: Running,
) -> None:
    async with raw(daemon) as conn:
        await conn.start()
        assert await conn.command(f"RCPT TO:<{SUPPORT}>") == "250 2.1.5 Recipient OK"
        assert (await conn.command("DATA")).startswith("354 ")
        conn.writer.write(message(subject="Half closed") + b".\r\n")
        conn.writer.write_eof()
        # The client can still read: it gets its 250, then the server hangs up.
        assert (await conn.reply()).startswith("250 2.0.0 Queued as ")
        assert await conn.closed()
    [ticket] = await daemon.tickets()
    assert ticket.subject == "Half closed"
    assert ticket.message_count == 1
    assert inbound_count(daemon) == 1
    # The daemon keeps serving.
    await daemon.send(mail(subject="Next one"))
    assert len(await daemon.tickets()) == 2


async def test_half_close_in_the_middle_of_data_stores_nothing(daemon: Running) -> None:
    async with raw(daemon) as conn:
        await conn.start()
        assert await conn.command(f"RCPT TO:<{SUPPORT}>") == "250 2.1.5 Recipient OK"
        assert (await conn.command("DATA")).startswith("354 ")
        conn.writer.write(message())  # no final dot
        conn.writer.write_eof()
        assert await conn.closed()  # no reply at all: there is nothing to answer
    assert inbound_count(daemon) == 0
    await daemon.send(mail())
    assert inbound_count(daemon) == 1


async def test_reset_right_after_the_final_dot_stores_whole_or_nothing(
    daemon: Running,
) -> None:
    # RST (SO_LINGER 0) instead of a polite close: the session is cancelled wherever it is,
    # maybe during its commit. The row is whole or absent, and ingested at most once.
    sent = message(subject="Reset after the dot")
    for _ in range(5):
        async with raw(daemon) as conn:
            await conn.start()
            assert await conn.command(f"RCPT TO:<{SUPPORT}>") == "250 2.1.5 Recipient OK"
            assert (await conn.command("DATA")).startswith("354 ")
            sock = conn.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.writer.write(sent + b".\r\n")
            await asyncio.sleep(0)
            conn.writer.transport.abort()
    await daemon.send(mail(subject="Still serving"))
    tickets = await daemon.tickets()
    with sqlite3.connect(daemon.config.storage.database) as db:
        ids = [queue_id for (queue_id,) in db.execute("SELECT id FROM inbound")]
    async with store_for(daemon.config) as store:
        rows = await store.pending_inbound(limit=100)
        raws = [await store.read_raw(queue_id) for queue_id in ids]  # sealed: opened by the store
    assert rows == []  # everything stored was ingested
    with sqlite3.connect(daemon.config.storage.database) as db:
        ids = [queue_id for (queue_id,) in db.execute("SELECT id FROM inbound")]
    async with store_for(daemon.config) as store:
        raws = [await store.read_raw(queue_id) for queue_id in ids]
    assert [as_sent(r) for r in raws].count(sent) == len(
        raws
    ) - 1  # whole messages only, besides "Still serving"
    # The same message five times, as a sender retries one that got no 250: stored once.
    reset = [t for t in tickets if t.subject == "Reset after the dot"]
    assert [t.message_count for t in reset] == ([1] if len(raws) > 1 else [])
    assert len(tickets) == len(reset) + 1


# -- storage ----------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "small", "8m") as mount:
        yield mount


async def test_low_disk_gets_452_431_at_mail(small_disk: Path) -> None:
    config = load_config(write_config(small_disk, max_message_size=2 * 1024 * 1024))
    async with daemon_running(config) as daemon, raw(daemon) as conn:
        await conn.start()  # 8 MiB free: room for 1.5 x 2 MiB
        assert await conn.command("RSET") == "250 2.0.0 OK"
        ballast = fill_disk(small_disk, leave=2 * 1024 * 1024)  # less than 3 MiB free
        assert await conn.command("MAIL FROM:<customer@example.org>") == (
            "452 4.3.1 Insufficient system storage, try again later"
        )
        ballast.unlink()
        assert await conn.command("MAIL FROM:<customer@example.org>") == "250 2.1.0 Sender OK"


# -- memory -------------------------------------------------------------------------------


async def test_many_short_lines_do_not_multiply_memory(daemon: Running) -> None:
    # aiosmtpd 1.4.6 kept a bytearray per line until the final dot: ~90 bytes for each
    # 2-byte empty line, so 1 MiB of them took ~45 MiB (25 MiB: 2.1 GiB). One buffer now.
    lines = (daemon.config.smtp.max_message_size - 4096) // 2
    async with raw(daemon) as conn:
        await conn.start()
        assert await conn.command(f"RCPT TO:<{SUPPORT}>") == "250 2.1.5 Recipient OK"
        assert (await conn.command("DATA")).startswith("354 ")
        tracemalloc.start()
        try:
            await conn.send(message(subject="Empty lines") + b"\r\n" * lines + b".\r\n")
            assert (await conn.reply()).startswith("250 2.0.0 Queued as ")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 8 * 1024 * 1024  # the message is 1 MiB
    [ticket] = await daemon.tickets()
    assert ticket.subject == "Empty lines"
