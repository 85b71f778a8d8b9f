"""The SMTP listener as a client sees it: replies, limits, relay policy, failure answers."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest

from mailgate.config import load_config
from mailgate.store import store_for
from tests.conftest import (
    SUPPORT,
    Running,
    daemon_running,
    eml,
    fill_disk,
    mail,
    tmpfs,
    write_config,
)

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


async def client(daemon: Running) -> aiosmtplib.SMTP:
    smtp = aiosmtplib.SMTP(hostname=daemon.host, port=daemon.port, start_tls=False)
    await smtp.connect()
    await smtp.ehlo(hostname="client.example")
    return smtp


async def test_greeting_and_ehlo_advertise_size_and_smtputf8(daemon: Running) -> None:
    smtp = aiosmtplib.SMTP(hostname=daemon.host, port=daemon.port, start_tls=False)
    greeting = await smtp.connect()
    assert greeting.code == 220
    assert "mailgate.test" in greeting.message
    assert "Python" not in greeting.message  # no software versions for scanners
    await smtp.ehlo(hostname="client.example")
    assert smtp.supports_extension("size")
    assert smtp.esmtp_extensions["size"] == str(daemon.config.smtp.max_message_size)
    assert smtp.supports_extension("smtputf8")
    assert smtp.supports_extension("enhancedstatuscodes")
    await smtp.quit()


@pytest.mark.parametrize(
    "recipient",
    [
        "someone@elsewhere.example",
        "support@example.com.evil.example",
        "support%elsewhere.example@example.com",
        "@relay.example:victim@elsewhere.example",
        "postmaster",
    ],
)
async def test_foreign_recipient_gets_550_511(daemon: Running, recipient: str) -> None:
    smtp = await client(daemon)
    await smtp.mail("customer@example.org")
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
        await smtp.rcpt(recipient)
    # 550 5.1.1 for someone else's address; 553 5.1.3 for a source route aiosmtpd cannot parse.
    assert (refused.value.code, refused.value.message[:5]) in {(550, "5.1.1"), (553, "5.1.3")}
    await smtp.quit()


async def test_domain_entry_accepts_any_local_part_case_blind(daemon: Running) -> None:
    await daemon.send(mail(to="Billing@HELP.example.com"), recipients=("Billing@HELP.example.com",))
    [ticket] = await daemon.tickets()
    assert ticket.message_count == 1


async def test_oversize_data_gets_552_534_and_nothing_is_stored(daemon: Running) -> None:
    lines = daemon.config.smtp.max_message_size // 70 + 1
    big = mail().as_bytes() + (b"y" * 68 + b"\r\n") * lines
    smtp = await client(daemon)
    await smtp.mail("customer@example.org")
    await smtp.rcpt(SUPPORT)
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await smtp.data(big)
    assert refused.value.code == 552
    assert refused.value.message.startswith("5.3.4")
    # The session goes on: the next message is accepted.
    await smtp.mail("customer@example.org")
    await smtp.rcpt(SUPPORT)
    reply = await smtp.data(mail().as_bytes())
    assert reply.code == 250
    await smtp.quit()
    assert len(await daemon.tickets()) == 1


async def test_declared_oversize_is_refused_at_mail_from(daemon: Running) -> None:
    smtp = await client(daemon)
    too_big = daemon.config.smtp.max_message_size + 1
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await smtp.mail("customer@example.org", options=[f"SIZE={too_big}"])
    assert refused.value.code == 552
    assert refused.value.message.startswith("5.3.4")
    await smtp.quit()


async def test_smtputf8_address_and_headers_accepted(daemon: Running) -> None:
    smtp = await client(daemon)
    await smtp.mail("jürgen@bücher.example", options=["SMTPUTF8"], encoding="utf-8")
    await smtp.rcpt(SUPPORT)
    reply = await smtp.data(eml("smtputf8"))
    assert reply.code == 250
    await smtp.quit()
    [ticket] = await daemon.tickets()
    assert ticket.requester.email == "jürgen@bücher.example"


async def test_long_data_lines_up_to_10000_octets_are_accepted(daemon: Running) -> None:
    line = "a" * 9000
    await daemon.send(mail(body=f"{line}\n").as_bytes().replace(b"=\n", b""))
    [ticket] = await daemon.tickets()
    assert ticket.message_count == 1


async def test_commands_out_of_order_get_enhanced_codes(daemon: Running) -> None:
    smtp = await client(daemon)
    reply = await smtp.execute_command(b"RCPT", b"TO:<support@example.com>")
    assert reply.code == 503
    assert reply.message.startswith("5.5.1")
    reply = await smtp.execute_command(b"DATA")
    assert reply.code == 503
    await smtp.quit()


# -- storage failure: a real full disk (a tiny tmpfs) ---------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "small", "8m") as mount:
        yield mount


async def test_full_disk_answers_451_and_keeps_what_was_stored(small_disk: Path) -> None:
    # MAIL finds room (1.5 x max_message_size is free); the disk fills before DATA, as when
    # something else on the machine takes it: the commit fails and the sender is told to retry.
    config = load_config(write_config(small_disk, max_message_size=2 * 1024 * 1024))
    async with daemon_running(config) as daemon:
        kept = await daemon.send(mail(subject="stored before the disk filled"))
        assert len(await daemon.tickets()) == 1
        smtp = await client(daemon)
        await smtp.mail("customer@example.org")
        await smtp.rcpt(SUPPORT)
        fill_disk(small_disk, leave=256 * 1024)
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await smtp.data(mail(body="z" * 1_500_000).as_bytes())
        assert refused.value.code == 451
        assert refused.value.message.startswith("4.3.0")
        assert "disk" not in refused.value.message.lower()  # no internals on the wire
        await smtp.quit()
        [ticket] = await daemon.tickets()
        assert ticket.subject == "stored before the disk filled"
        assert kept


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
async def test_swaks_smoke_test_makes_a_ticket(daemon: Running) -> None:
    # swaks is how ops test a mail server by hand; it must work the way the README says.
    swaks = await asyncio.create_subprocess_exec(
        "swaks", "--server", f"{daemon.host}:{daemon.port}", "--to", "support@example.com",
        "--from", "ops@example.org", "--h-Subject", "Smoke test from swaks",
        "--body", "Grüße aus dem Terminal",
        "--add-header", "Content-Type: text/plain; charset=utf-8",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    transcript, _ = await swaks.communicate()
    assert swaks.returncode == 0, transcript.decode()
    assert b"250 2.0.0 Queued as" in transcript
    [ticket] = await daemon.tickets()
    assert ticket.subject == "Smoke test from swaks"
    assert ticket.requester.email == "ops@example.org"
    assert "Grüße aus dem Terminal" in ticket.messages[0].body_text


async def test_concurrent_sessions_share_commits(daemon: Running) -> None:
    # Group commit: ten senders at once are acknowledged after fewer than ten commits.
    # Rows committed together carry the same received_at.
    queue_ids = await asyncio.gather(
        *(daemon.send(mail(sender=f"c{n}@example.org")) for n in range(10))
    )
    assert len(set(queue_ids)) == 10
    async with store_for(daemon.config) as store:
        rows = [await store.get_inbound(q) for q in queue_ids]
    commits = {row.received_at for row in rows if row is not None}
    assert len(commits) < 10
