"""Failure paths after the 250: the message is kept, never lost, and ingested once possible."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest

from mailgate.config import load_config
from mailgate.ingest.prepare import ParserCrashed, ParserPool
from mailgate.store import SqliteStore, store_for
from tests.conftest import SUPPORT, Running, daemon_running, fill_disk, mail, tmpfs, write_config


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
    with tmpfs(tmp_path / "attachments", "3m") as mount:
        yield mount


def with_attachment(content: bytes, subject: str) -> EmailMessage:
    msg = mail(subject=subject)
    msg.add_attachment(content, maintype="application", subtype="octet-stream",
                       filename="logs.bin")  # fmt: skip
    return msg


async def open_transaction(running: Running) -> aiosmtplib.SMTP:
    """A session that has passed MAIL and RCPT, its DATA still to come."""
    smtp = aiosmtplib.SMTP(hostname=running.host, port=running.port, start_tls=False)
    await smtp.connect()
    await smtp.ehlo()
    await smtp.mail("customer@example.org")
    await smtp.rcpt(SUPPORT)
    return smtp


async def queue_id_of(smtp: aiosmtplib.SMTP, message: EmailMessage) -> str:
    reply = await smtp.data(message.as_bytes())
    await smtp.quit()
    return reply.message.rsplit(" ", 1)[1]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file() and p.name != "ballast")


async def test_a_full_attachment_disk_heals_by_itself_and_holds_up_no_other_mail(
    tmp_path: Path, small_mount: Path
) -> None:
    # 1. Attachments live on a 3 MiB filesystem. Two sessions pass MAIL (room enough), then
    #    the disk fills: the mail with an attachment cannot write it; the mail without
    #    becomes a ticket at once, and new mail is refused at MAIL until there is room.
    # 2. The waiting mail is tried again and again, leaving no temporary file behind.
    # 3. Space returns (the ballast goes): the waiting mail becomes a ticket on its own,
    #    its attachment intact, and MAIL is accepted again.
    config_path = write_config(tmp_path / "daemon", max_message_size=1024 * 1024)
    text = config_path.read_text().replace('"var/attachments"', f'"{small_mount}"')
    config_path.write_text(text)
    config = load_config(config_path)
    content = os.urandom(700 * 1024)
    async with daemon_running(config) as daemon:
        with_files, without = await open_transaction(daemon), await open_transaction(daemon)
        ballast = fill_disk(small_mount, leave=256 * 1024)
        waiting = await queue_id_of(with_files, with_attachment(content, "Logs attached"))
        plain = await queue_id_of(without, mail(subject="No attachment"))
        async with store_for(config) as store:
            retries = await wait_for_retries(store, waiting, plain)
            [ticket] = await store.list_tickets()
        assert ticket.subject == "No attachment"
        assert len(retries) >= 2
        assert leftovers(small_mount) == []  # no temporary file from any of those tries
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await daemon.send(mail(subject="Refused at MAIL"))
        assert (refused.value.code, refused.value.message[:5]) == (452, "4.3.1")

        ballast.unlink()
        async with store_for(config) as store:
            for _ in range(600):  # retried within ATTACHMENT_RETRY of the space returning
                row = await store.get_inbound(waiting)
                if row is not None and row.state != "received":
                    break
                await asyncio.sleep(0.05)
        tickets = {t.subject: t for t in await daemon.tickets()}
        assert sorted(tickets) == ["Logs attached", "No attachment"]
        [attachment] = tickets["Logs attached"].messages[0].attachments
        assert attachment.sha256 == hashlib.sha256(content).hexdigest()
        assert attachment.id is not None
        async with store_for(config) as store:
            assert await store.attachment_content(attachment.id, small_mount) == content
        assert leftovers(small_mount) == [attachment.blob]  # its sealed file, and nothing else
        await daemon.send(mail(subject="Accepted again"))


async def wait_for_retries(store: SqliteStore, waiting: str, plain: str) -> set[float]:
    """Wait until the plain message is ingested and the waiting one was put back at least
    twice (each try sets a new retry time); return the retry times seen."""
    seen: set[float] = set()
    for _ in range(1000):
        row, done = await store.get_inbound(waiting), await store.get_inbound(plain)
        assert row is not None and row.state == "received"
        with sqlite3.connect(store.path) as db:
            (retry_at,) = db.execute(
                "SELECT retry_at FROM inbound WHERE id = ?", (waiting,)
            ).fetchone()
        if retry_at is not None:
            seen.add(retry_at)
        if len(seen) >= 2 and done is not None and done.state == "ingested":
            return seen
        await asyncio.sleep(0.05)
    raise AssertionError(f"no retries seen: {seen}")
