"""Large messages: spooled to a file as they arrive, committed from it, never held whole.

A real daemon on loopback takes messages past the spool threshold (`spool.SPOOL_THRESHOLD`,
1 MiB); each must be stored byte for byte, become its ticket with its attachment intact,
cost the daemon about one read buffer whatever its size, and leave no spool file behind
(the files have no name, so there is nothing to clean up even after kill -9).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mailgate.config import Config, load_config
from mailgate.spool import SPOOL_THRESHOLD
from mailgate.store import store_for
from tests.conftest import (
    SUPPORT,
    Running,
    as_sent,
    attachment_bytes,
    cli_json,
    daemon_running,
    run_cli,
    write_config,
)

MIB = 1024 * 1024

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture
def big_config(tmp_path: Path) -> Config:
    return load_config(write_config(tmp_path, max_message_size=24 * MIB))


@pytest.fixture
async def big(big_config: Config) -> AsyncIterator[Running]:
    async with daemon_running(big_config) as running:
        yield running


def single_line_base64(content: bytes, subject: str) -> bytes:
    """A mail whose attachment is base64 in one line, as some mailers send it."""
    return (
        b"From: Customer <customer@example.org>\r\n"
        b"To: support@example.com\r\n"
        b"Subject: " + subject.encode() + b"\r\n"
        b"Message-ID: <" + hashlib.sha256(content).hexdigest().encode() + b"@client.example>\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThe dump is attached.\r\n"
        b"--b\r\nContent-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="dump.bin"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(content) + b"\r\n--b--\r\n"
    )


async def send_raw(running: Running, data: bytes, *, piece: int = 64 * 1024) -> str:
    """Send one message over a plain socket, `piece` bytes at a time; return the final reply.

    `data` must be dot-stuffed already (test messages have no line starting with a dot).
    """
    reader, writer = await asyncio.open_connection(running.host, running.port)
    try:

        async def reply() -> str:
            while (line := await reader.readline())[3:4] == b"-":
                pass
            return line.decode().rstrip()

        assert (await reply()).startswith("220")
        for command in ("EHLO client.example", "MAIL FROM:<customer@example.org>",
                        f"RCPT TO:<{SUPPORT}>", "DATA"):  # fmt: skip
            writer.write(command.encode() + b"\r\n")
            assert (await reply())[:1] in "23", command
        view = memoryview(data)
        for start in range(0, len(view), piece):
            writer.write(view[start : start + piece])
            await writer.drain()
        writer.write(b".\r\n")
        return await reply()
    finally:
        writer.close()


def spool_files(folder: Path) -> list[str]:
    """Spool files this process holds open in `folder` (unnamed, but still on the disk)."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder.resolve())) and "(deleted)" in target:
            held.append(target)
    return held


async def test_a_2_mib_single_line_base64_attachment_becomes_a_ticket_intact(big: Running) -> None:
    content = random.Random(9).randbytes(2 * MIB)
    sent = single_line_base64(content, "One long line")
    assert len(sent) > SPOOL_THRESHOLD  # spooled on the way in
    queue_id = await big.send(sent)
    async with store_for(big.config) as store:
        assert as_sent(await store.read_raw(queue_id)) == sent
    [ticket] = await big.tickets()
    [attachment] = ticket.messages[0].attachments
    assert (attachment.filename, attachment.size) == ("dump.bin", len(content))
    assert attachment.sha256 == hashlib.sha256(content).hexdigest()
    assert await attachment_bytes(big.config, attachment) == content
    # On disk the file is sealed: its name is random and the content is not in it.
    [on_disk] = [p for p in big.config.storage.attachments.rglob("*") if p.is_file()]
    assert on_disk.name == attachment.blob and content[:64] not in on_disk.read_bytes()
    assert spool_files(big.config.storage.database.parent) == []


async def test_many_large_messages_at_once_are_each_stored_whole(big: Running) -> None:
    # Several spooled messages share commits with small ones; each row is its own message.
    contents = [random.Random(n).randbytes(MIB + n * 100_000) for n in range(6)]
    sent = [single_line_base64(c, f"Parallel {n}") for n, c in enumerate(contents)]
    small = [single_line_base64(b"tiny %d" % n, f"Small {n}") for n in range(6)]
    queue_ids = await asyncio.gather(*(big.send(m) for m in [*sent, *small]))
    async with store_for(big.config) as store:
        for queue_id, message in zip(queue_ids, [*sent, *small], strict=True):
            assert as_sent(await store.read_raw(queue_id)) == message
    tickets = await big.tickets()
    assert sorted(t.subject for t in tickets) == sorted(
        [f"Parallel {n}" for n in range(6)] + [f"Small {n}" for n in range(6)]
    )
    assert spool_files(big.config.storage.database.parent) == []


async def traced_peak(running: Running, size: int) -> int:
    """Peak traced memory (all of this process: daemon and client) while one message of
    `size` bytes is received and committed."""
    data = single_line_base64(random.Random(size).randbytes(size * 3 // 4), f"Size {size}")
    tracemalloc.start()
    try:
        reply = await send_raw(running, data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reply.startswith("250 2.0.0 Queued as "), reply
    return peak


async def test_a_large_message_costs_about_one_read_buffer_whatever_its_size(
    big: Running,
) -> None:
    # Held in one buffer, 16 MiB would cost 16 MiB and more; spooled, it costs what 4 MiB
    # costs: the threshold, a write chunk and the read buffers.
    small = await traced_peak(big, 4 * MIB)
    large = await traced_peak(big, 16 * MIB)
    assert large < small + 512 * 1024
    assert large < 3 * SPOOL_THRESHOLD
    await big.settle(within=30)


async def test_a_client_gone_in_the_middle_of_a_large_message_leaves_nothing(
    big: Running,
) -> None:
    data = single_line_base64(os.urandom(3 * MIB), "Never finished")
    reader, writer = await asyncio.open_connection(big.host, big.port)
    await reader.readline()
    for command in (b"EHLO client.example", b"MAIL FROM:<customer@example.org>",
                    b"RCPT TO:<support@example.com>", b"DATA"):  # fmt: skip
        writer.write(command + b"\r\n")
        while (await reader.readline())[3:4] == b"-":
            pass
    writer.write(data[: 2 * MIB])  # past the threshold: a spool file is open
    await writer.drain()
    writer.transport.abort()
    await big.send(single_line_base64(b"after", "After"))  # the session is gone by now
    [ticket] = await big.tickets()
    assert ticket.subject == "After"
    assert spool_files(big.config.storage.database.parent) == []


async def test_a_large_quarantined_message_is_listed_shown_and_purged(big: Running) -> None:
    body = b"y" * 76 + b"\r\n"
    no_from = b"To: support@example.com\r\nSubject: Nobody wrote this\r\n\r\n" + body * 40_000
    queue_id = await big.send(no_from, sender="")  # no From and a null sender: quarantine
    await big.settle()
    [row] = cli_json(big, "quarantine", "list")
    shown = run_raw(big, "quarantine", "show", queue_id, "--raw")
    assert (row["id"], row["size"], row["subject"]) == (queue_id, len(shown), "Nobody wrote this")
    assert as_sent(shown) == no_from

    purged = big.cli("quarantine", "purge", queue_id)
    assert purged.returncode == 0, purged.stderr
    assert cli_json(big, "quarantine", "list") == []
    again = big.cli("quarantine", "purge", queue_id)
    assert again.returncode == 1
    assert queue_id in again.stderr
    async with store_for(big.config) as store:
        assert await store.get_inbound(queue_id) is None


def run_raw(running: Running, *args: str) -> bytes:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "mailgate", "--config", str(running.config.path), *args],
        capture_output=True,
        timeout=60,
        check=True,
    )
    return result.stdout


async def test_purge_refuses_an_ingested_or_unknown_row(big: Running) -> None:
    ingested = await big.send(single_line_base64(b"kept", "Kept"))
    await big.settle()
    for queue_id in (ingested, "NOSUCHQUEUEID"):
        result = big.cli("quarantine", "purge", queue_id)
        assert result.returncode == 1
        assert result.stdout == ""
    [ticket] = await big.tickets()
    assert ticket.subject == "Kept"
    assert run_cli("--config", str(big.config.path), "quarantine", "list").returncode == 0
