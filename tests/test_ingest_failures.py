"""Failure paths after the 250: the message is kept, never lost, and ingested once possible."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailgate.config import load_config
from mailgate.ingest.prepare import ParserCrashed, ParserPool
from mailgate.store import open_store
from tests.conftest import daemon_running, mail, tmpfs, write_config


async def test_parser_process_crash_is_reported_and_the_pool_recovers() -> None:
    pool = ParserPool()
    try:
        with pytest.raises(ParserCrashed):
            await pool.run(os._exit, 3)  # the parser process dies as it would in C code
        assert await pool.run(sum, [1, 2, 3]) == 6  # a fresh process took its place
    finally:
        pool.close()


@pytest.fixture
def small_mount(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "attachments", "1m") as mount:
        yield mount


def with_attachment(size: int) -> EmailMessage:
    msg = mail(subject="Logs attached")
    msg.add_attachment(os.urandom(size), maintype="application", subtype="octet-stream",
                       filename="logs.bin")  # fmt: skip
    return msg


async def test_full_attachment_disk_keeps_the_row_until_space_returns(
    tmp_path: Path, small_mount: Path
) -> None:
    # 1. Attachments live on a 1 MiB filesystem; a 2 MiB attachment cannot be written.
    # 2. The message is accepted (the raw bytes are in the database) and stays 'received'.
    # 3. Ops grow the filesystem; the worker retries and the ticket appears, attachment intact.
    config_path = write_config(tmp_path / "daemon", max_message_size=8 * 1024 * 1024)
    text = config_path.read_text().replace('"var/attachments"', f'"{small_mount}"')
    config_path.write_text(text)
    config = load_config(config_path)
    async with daemon_running(config) as daemon:
        queue_id = await daemon.send(with_attachment(2 * 1024 * 1024))
        await asyncio.sleep(3)
        async with open_store(config.storage.database) as store:
            row = await store.get_inbound(queue_id)
            assert row is not None and row.state == "received"
            assert await store.list_tickets() == []
        grow = ["mount", "-o", "remount,size=8m", str(small_mount)]
        await asyncio.to_thread(subprocess.run, grow, check=True)
        await daemon.settle(within=15)
        [ticket] = await daemon.tickets()
        [attachment] = ticket.messages[0].attachments
        assert attachment.size == 2 * 1024 * 1024
