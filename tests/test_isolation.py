"""No client can hurt another: bytes one session sends never cost another session its 250.

Command arguments that are not UTF-8 (or not ASCII without SMTPUTF8), or hold control
characters, are refused at their command, so they never reach a group commit shared with
other sessions' messages; and a batch the store refuses for one row's data is retried
message by message, so only that message is answered 451.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from mailgate.errors import StoreError
from mailgate.intake import Intake
from mailgate.model import Envelope
from mailgate.spool import Spooled
from mailgate.store import store_for
from tests.conftest import SUPPORT, Running, SubprocessDaemon, mail, open_test_store
from tests.test_hostile_smtp import Raw, inbound_count, limited, message, raw

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

HONEST_SENDERS = 40


async def hostile_sessions(
    daemon: Running, ehlo: bytes, mail_from: bytes, stop: asyncio.Event
) -> list[str]:
    """Open session after session that tries to get `ehlo` and `mail_from` stored.

    Each session walks a whole transaction and sends its message when DATA is granted: a
    server that kept the bad bytes would put them into a commit beside honest mail.
    """
    replies: list[str] = []
    while not stop.is_set():
        async with raw(daemon) as conn:
            await conn.greeting()
            replies.append(await conn.command(b"EHLO " + ehlo))
            replies.append(await conn.command(b"MAIL FROM:<" + mail_from + b">"))
            replies.append(await conn.command(f"RCPT TO:<{SUPPORT}>"))
            data = await conn.command("DATA")
            replies.append(data)
            if data.startswith("354 "):
                await conn.send(message(subject="Hostile") + b".\r\n")
                replies.append(await conn.reply())
            assert await conn.command("QUIT") == "221 2.0.0 Bye"
    return replies


async def test_bad_bytes_in_commands_cost_honest_senders_nothing(tmp_path: Path) -> None:
    async with limited(tmp_path, "max_connections_per_ip = 100") as daemon:
        stop = asyncio.Event()
        hostile = [
            asyncio.create_task(hostile_sessions(daemon, b"\xff", b"h@example.org", stop)),
            asyncio.create_task(hostile_sessions(daemon, b"client.example", b"\xe9@x", stop)),
        ]
        await asyncio.sleep(0.05)  # the hostile loops are under way before the honest mail
        subjects = [f"Honest {n}" for n in range(HONEST_SENDERS)]
        queue_ids = await asyncio.gather(*(daemon.send(mail(subject=s)) for s in subjects))
        stop.set()
        bad_ehlo, bad_mail = await asyncio.gather(*hostile)

        assert len(set(queue_ids)) == HONEST_SENDERS  # each got its own 250
        assert set(bad_ehlo) == {
            "501 5.5.2 Syntax error: not UTF-8",
            "503 5.5.1 Send HELO first",
        }
        assert set(bad_mail) == {
            "250 HELP",  # the last line of the EHLO reply
            "501 5.5.2 Syntax error: not UTF-8",
            "503 5.5.1 Need MAIL command",
            "503 5.5.1 Need RCPT command",
        }
        async with store_for(daemon.config) as store:
            for queue_id in queue_ids:
                assert await store.get_inbound(queue_id) is not None
        assert inbound_count(daemon) == HONEST_SENDERS
        tickets = await daemon.tickets()
        assert sorted(t.subject for t in tickets) == sorted(subjects)


async def test_latin1_helo_gets_501_and_the_session_can_then_ehlo_and_send(
    daemon: Running,
) -> None:
    async with raw(daemon) as conn:
        await conn.greeting()
        assert await conn.command(b"HELO caf\xe9.example") == "501 5.5.2 Syntax error: not UTF-8"
        assert await conn.command("MAIL FROM:<customer@example.org>") == (
            "503 5.5.1 Send HELO first"
        )
        assert (await conn.command("EHLO client.example")).startswith("250 ")
        assert await conn.command("MAIL FROM:<customer@example.org>") == "250 2.1.0 Sender OK"
        assert await conn.command(f"RCPT TO:<{SUPPORT}>") == "250 2.1.5 Recipient OK"
        assert (await conn.command("DATA")).startswith("354 ")
        await conn.send(message(subject="After a Latin-1 HELO") + b".\r\n")
        queued = await conn.reply()
        assert queued.startswith("250 2.0.0 Queued as ")
    async with store_for(daemon.config) as store:
        row = await store.get_inbound(queued.rsplit(" ", 1)[1])
    assert row is not None
    assert row.envelope.helo == "client.example"


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        (b"EHLO client\x00.example", "501 5.5.2 Syntax error: control character"),
        (b"HELO client\x1b[2J.example", "501 5.5.2 Syntax error: control character"),
        (b"EHLO client\r.example", "501 5.5.2 Syntax error: control character"),
        (b"EHLO client\xc2\x85.example", "501 5.5.2 Syntax error: control character"),  # NEL
        (b"EHLO \xed\xa0\x80.example", "501 5.5.2 Syntax error: not UTF-8"),  # a surrogate
    ],
    ids=repr,
)
async def test_bad_helo_argument_is_refused(daemon: Running, command: bytes, reply: str) -> None:
    async with raw(daemon) as conn:
        await conn.greeting()
        assert await conn.command(command) == reply
        assert await conn.command("MAIL FROM:<a@example.org>") == "503 5.5.1 Send HELO first"


@pytest.mark.parametrize(
    ("mail_from", "rcpt_to", "reply"),
    [
        (b"<\xe9@example.org>", None, "501 5.5.2 Syntax error: not UTF-8"),
        (b"<a\x00b@example.org>", None, "501 5.5.2 Syntax error: control character"),
        (
            "<jos\u00e9@example.org>".encode(),
            None,
            "501 5.5.2 Syntax error: non-ASCII address without SMTPUTF8",
        ),
        (b"<a@example.org>", b"<\xfc@help.example.com>", "501 5.5.2 Syntax error: not UTF-8"),
        (
            b"<a@example.org>",
            b"<a\tb@help.example.com>",
            "501 5.5.2 Syntax error: control character",
        ),
        (
            b"<a@example.org>",
            "<j\u00fcrgen@help.example.com>".encode(),
            "501 5.5.2 Syntax error: non-ASCII address without SMTPUTF8",
        ),
    ],
    ids=repr,
)
async def test_bad_address_argument_is_refused_and_nothing_is_stored(
    daemon: Running, mail_from: bytes, rcpt_to: bytes | None, reply: str
) -> None:
    async with raw(daemon) as conn:
        await conn.greeting()
        assert (await conn.command("EHLO client.example")).startswith("250 ")
        answer = await conn.command(b"MAIL FROM:" + mail_from)
        if rcpt_to is None:
            assert answer == reply
            assert await conn.command(f"RCPT TO:<{SUPPORT}>") == "503 5.5.1 Need MAIL command"
        else:
            assert answer == "250 2.1.0 Sender OK"
            assert await conn.command(b"RCPT TO:" + rcpt_to) == reply
            assert await conn.command("DATA") == "503 5.5.1 Need RCPT command"
    assert inbound_count(daemon) == 0


async def test_utf8_addresses_with_smtputf8_are_accepted_and_stored(daemon: Running) -> None:
    sender, recipient = "jos\u00e9@example.org", "j\u00fcrgen@help.example.com"
    async with raw(daemon) as conn:
        await conn.greeting()
        assert (await conn.command("EHLO client.example")).startswith("250 ")
        assert await conn.command(f"MAIL FROM:<{sender}> SMTPUTF8".encode()) == (
            "250 2.1.0 Sender OK"
        )
        assert await conn.command(f"RCPT TO:<{recipient}>".encode()) == "250 2.1.5 Recipient OK"
        assert (await conn.command("DATA")).startswith("354 ")
        await conn.send(message(subject="Internationalised") + b".\r\n")
        queued = await conn.reply()
        assert queued.startswith("250 2.0.0 Queued as ")
    async with store_for(daemon.config) as store:
        row = await store.get_inbound(queued.rsplit(" ", 1)[1])
    assert row is not None
    assert (row.envelope.mail_from, row.envelope.rcpt_tos) == (sender, (recipient,))
    assert row.envelope.smtputf8


# -- intake: a batch the store refuses for one row is retried without it -----------------


def envelope(helo: str) -> Envelope:
    return Envelope(
        mail_from="customer@example.org", rcpt_tos=(SUPPORT,), peer="127.0.0.1:1", helo=helo
    )


async def test_a_row_the_store_refuses_costs_only_its_own_message(tmp_path: Path) -> None:
    # A spool file that ends before its message (a read error), and a HELO with a lone
    # surrogate, which UTF-8 cannot hold: the batch's commit fails. Each message is then
    # committed alone, and only the two bad ones are refused.
    database = tmp_path / "mailgate.db"
    short = tmp_path / "short-spool"
    short.write_bytes(b"Subject: x\r\n")
    async with open_test_store(database) as store:
        intake = Intake(store, senders=lambda: 5)  # waits for the others to share a commit
        intake.start()
        with short.open("rb") as file:
            spooled = Spooled(file, 64 * 1024)
            try:
                helos = ["one.example", "two.example", "three", "bad\udce9.example", "five"]
                raws: list[bytes | Spooled] = [b"Subject: x\r\n\r\n"] * 5
                raws[2] = spooled
                receives = [
                    intake.receive(envelope(h), r) for h, r in zip(helos, raws, strict=True)
                ]
                results = await asyncio.gather(*receives, return_exceptions=True)
            finally:
                await intake.stop()
        assert isinstance(results[2], StoreError) and isinstance(results[3], StoreError)
        stored = [r for r in results if isinstance(r, str)]
        assert len(stored) == 3
        for queue_id, helo in zip(results, helos, strict=True):
            if isinstance(queue_id, str):
                row = await store.get_inbound(queue_id)
                assert row is not None and row.envelope.helo == helo
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT count(*) FROM inbound").fetchone() == (3,)


# -- file descriptors: a full descriptor table refuses new sessions, never breaks the rest --


async def open_session(port: int) -> tuple[Raw, str]:
    """Connect to the daemon on `port`; the connection and its first reply line."""
    conn = Raw(*await asyncio.open_connection("127.0.0.1", port))
    return conn, await conn.reply()


async def deliver(conn: Raw, subject: str) -> str:
    """Send one message on a greeted session; its queue id."""
    assert (await conn.command("EHLO client.example")).startswith("250 ")
    assert await conn.command("MAIL FROM:<customer@example.org>") == "250 2.1.0 Sender OK"
    assert await conn.command(f"RCPT TO:<{SUPPORT}>") == "250 2.1.5 Recipient OK"
    assert (await conn.command("DATA")).startswith("354 ")
    await conn.send(message(subject=subject) + b".\r\n")
    queued = await conn.reply()
    assert queued.startswith("250 2.0.0 Queued as "), queued
    return queued.rsplit(" ", 1)[1]


def inbound_states(database: Path) -> dict[str, str]:
    with sqlite3.connect(database) as db:
        return dict(db.execute("SELECT id, state FROM inbound").fetchall())


async def wait_ingested(database: Path, queue_id: str) -> None:
    deadline = time.monotonic() + 15
    while inbound_states(database).get(queue_id) != "ingested":
        assert time.monotonic() < deadline, inbound_states(database)
        await asyncio.sleep(0.05)


async def test_at_the_descriptor_limit_new_sessions_get_421_and_the_daemon_works_on(
    tmp_path: Path,
) -> None:
    # Soft limit 48, hard 128: the daemon raises the soft limit to 128 at start (with 48 and
    # 64 descriptors in reserve it could take no session at all), then refuses sessions
    # while fewer than 64 are left.
    daemon = SubprocessDaemon(
        tmp_path / "daemon",
        smtp_extra="max_connections = 500\nmax_connections_per_ip = 500",
    )
    daemon.start(nofile=(48, 128))
    held: list[Raw] = []
    try:
        refusal = None
        for _ in range(128):
            conn, first = await open_session(daemon.port)
            if not first.startswith("220 "):
                refusal = first
                assert await conn.closed()
                conn.close()
                break
            held.append(conn)
        assert refusal == "421 4.7.0 Server busy, try again later"
        assert len(held) >= 16, len(held)

        # At the limit, a session already open still delivers: the database, and the parser
        # process that ingest talks to through pipes, kept their reserve.
        at_limit = await deliver(held[0], "At the descriptor limit")
        await wait_ingested(daemon.database, at_limit)

        for conn in held:
            conn.close()
        held.clear()
        deadline = time.monotonic() + 15
        while True:  # the daemon closes its side of each idle session as it sees the EOF
            conn, first = await open_session(daemon.port)
            if first.startswith("220 "):
                break
            assert first == "421 4.7.0 Server busy, try again later"
            conn.close()
            assert time.monotonic() < deadline, "descriptors were not released"
            await asyncio.sleep(0.05)
        held.append(conn)
        after = await deliver(conn, "After the idle sessions left")
        await wait_ingested(daemon.database, after)
    finally:
        for conn in held:
            conn.close()
        daemon.kill()
    log = (daemon.folder / "daemon.log").read_text(encoding="utf-8")
    assert "out of system resource" not in log  # asyncio's EMFILE at accept(): never reached
    assert "smtp_descriptors_low" in log
