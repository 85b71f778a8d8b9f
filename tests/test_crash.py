"""Crash safety: `kill -9` in the middle of a load loses nothing that got a 250.

Scenario:
1. Start `mailgate serve` as its own process.
2. Send 500 mails over 10 concurrent SMTP connections.
3. After 150 acknowledgements, SIGKILL the daemon while sessions and ingest are busy.
4. Restart it; resend every mail that got no 250, as a real MTA would.
5. Every mail ends up stored exactly once, and every 250-acknowledged one among them.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections import Counter
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib

from mailgate.store import store_for
from tests.conftest import SUPPORT, SubprocessDaemon, as_sent, mail

TOTAL = 500
CONNECTIONS = 10
KILL_AFTER = 150


def numbered(n: int) -> EmailMessage:
    return mail(
        sender=f"Customer {n} <customer{n}@example.org>",
        subject=f"Crash test {n}",
        body=f"Message number {n}.\n" * 20,
        message_id=f"<crash-{n}@client.example>",
    )


class Acks(dict[int, str]):
    """Queue ids by mail number; `enough` is set once `KILL_AFTER` mails are acknowledged."""

    def __init__(self) -> None:
        super().__init__()
        self.enough = asyncio.Event()

    def __setitem__(self, n: int, queue_id: str) -> None:
        super().__setitem__(n, queue_id)
        if len(self) >= KILL_AFTER:
            self.enough.set()


async def send_all(port: int, todo: list[int], acked: Acks) -> None:
    """Send `todo` over one connection until done or the server goes away."""
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10)
    try:
        await smtp.connect()
        while todo:
            n = todo[0]
            _, reply = await smtp.send_message(numbered(n), recipients=[SUPPORT])
            acked[n] = reply.rsplit(" ", 1)[1]
            todo.pop(0)
    except (aiosmtplib.SMTPException, OSError):
        return  # killed: what was not acknowledged is sent again after the restart
    finally:
        smtp.close()


async def load(port: int, pending: list[int], acked: Acks) -> None:
    queues = [pending[i::CONNECTIONS] for i in range(CONNECTIONS)]
    await asyncio.gather(*(send_all(port, queue, acked) for queue in queues))
    pending[:] = sorted(n for queue in queues for n in queue)


async def test_kill_9_mid_load_loses_nothing(subprocess_daemon: SubprocessDaemon) -> None:
    daemon = subprocess_daemon
    daemon.start()
    acked = Acks()
    pending = list(range(TOTAL))

    async def kill_when_busy() -> None:
        await acked.enough.wait()
        daemon.kill(9)

    await asyncio.gather(load(daemon.port, pending, acked), kill_when_busy())
    acked_before_kill = dict(acked)
    assert KILL_AFTER <= len(acked_before_kill) < TOTAL, "the kill did not land mid-load"

    daemon.start()
    while pending:
        await load(daemon.port, pending, acked)
    assert len(acked) == TOTAL

    async with store_for(daemon.config) as store:
        for _ in range(600):
            if not await store.list_inbound("received"):
                break
            await asyncio.sleep(0.05)
        assert not await store.list_inbound("received")
    daemon.kill(15)

    with sqlite3.connect(daemon.database) as db:
        stored = Counter(row[0] for row in db.execute("SELECT message_id FROM messages"))
        queue_ids = {row[0] for row in db.execute("SELECT id FROM inbound")}
    assert set(stored) == {f"crash-{n}@client.example" for n in range(TOTAL)}
    assert set(stored.values()) == {1}, "a message was stored twice"
    assert set(acked_before_kill.values()) <= queue_ids, "an acknowledged raw message is gone"


# -- large messages: spooled to a file, copied into the database inside the commit ----------

LARGE = 18
LARGE_CONNECTIONS = 6


def large(n: int) -> bytes:
    """A mail of 1.5 to 4 MiB (past the spool threshold), different for each n."""
    msg = numbered(n)
    content = random.Random(n).randbytes(1_200_000 + n * 100_000)
    msg.add_attachment(content, maintype="application", subtype="octet-stream", filename="b.bin")
    return msg.as_bytes().replace(b"\n", b"\r\n")


async def test_kill_9_while_large_messages_are_spooled_and_committed(tmp_path: Path) -> None:
    daemon = SubprocessDaemon(tmp_path / "daemon", max_message_size=8 * 1024 * 1024)
    sent = {n: large(n) for n in range(LARGE)}
    acked: dict[int, str] = {}
    enough = asyncio.Event()

    async def send_all(todo: list[int]) -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=daemon.port, start_tls=False)
        try:
            await smtp.connect()
            for n in todo:
                _, reply = await smtp.sendmail("customer@example.org", [SUPPORT], sent[n])
                acked[n] = reply.rsplit(" ", 1)[1]
                if len(acked) >= LARGE // 4:
                    enough.set()
        except (aiosmtplib.SMTPException, OSError):
            return
        finally:
            smtp.close()

    async def kill_when_busy() -> None:
        await enough.wait()
        daemon.kill(9)

    daemon.start()
    try:
        queues = [list(range(LARGE))[i::LARGE_CONNECTIONS] for i in range(LARGE_CONNECTIONS)]
        await asyncio.gather(*(send_all(q) for q in queues), kill_when_busy())
        assert LARGE // 4 <= len(acked) < LARGE, "the kill did not land mid-load"
        with sqlite3.connect(daemon.database) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            ids = [row[0] for row in db.execute("SELECT id FROM inbound")]
        async with store_for(daemon.config) as store:
            stored = {queue_id: as_sent(await store.read_raw(queue_id)) for queue_id in ids}
        for n, queue_id in acked.items():
            assert stored[queue_id] == sent[n], f"acknowledged message {n} is not whole"
        assert set(stored.values()) <= set(sent.values()), "a row holds a part of a message"
        # The spool files had no name: nothing is left beside the database.
        left = {p.name for p in daemon.database.parent.iterdir()}
        keys = {"master.key", "keystore.sqlite", "keystore.sqlite-wal", "keystore.sqlite-shm",
                "keystore.sqlite.lock"}  # fmt: skip
        assert left <= {"mailgate.db", "mailgate.db-wal", "mailgate.db-shm", "secret.key",
                        "attachments", "outbox", *keys}, left  # fmt: skip

        daemon.start()  # what was stored becomes tickets
        async with store_for(daemon.config) as store:
            for _ in range(600):
                if not await store.pending_inbound(limit=1):
                    break
                await asyncio.sleep(0.05)
            assert not await store.pending_inbound(limit=1)
    finally:
        daemon.kill(15)
