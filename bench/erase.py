"""The time of `mailgate privacy erase` for a person with many messages.

Run from the repository root:

    .venv/bin/python bench/erase.py                  # 1,000 messages on 100 tickets
    .venv/bin/python bench/erase.py --messages 200   # quicker

A real `mailgate serve` (in this process, on loopback; sender authentication off, outgoing
mail to files) receives the person's mail over SMTP: one mail per ticket, then replies with
the ticket's tag until the person has `--messages` messages, one in ten with a 64 KiB
attachment of its own; another person's ticket stays.
The daemon stops and its data is copied. The real command line erases the person in one copy
(a subprocess, as an agent runs it): its wall time is reported beside that of the same
command for an address that is not there (interpreter start, imports, opening the store and
the key store). In the other copy the erasure alone is timed in this process, the store
already open: marking, destroying the key, deleting and overwriting the rows
(secure_delete), truncating the WAL, unlinking the files and writing the audit record.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mailgate.config import Config, load_config  # noqa: E402
from mailgate.log import configure_logging  # noqa: E402
from mailgate.privacy import rights  # noqa: E402
from mailgate.service import Listening, serve  # noqa: E402
from mailgate.store import store_for  # noqa: E402

EMAIL = "bench.person@example.org"
CONFIG = """\
[smtp]
listen = "127.0.0.1:0"
hostname = "bench.localhost"
accept = ["support@example.com"]
max_connections = 50
max_connections_per_ip = 50
[storage]
database = "var/mailgate.db"
attachments = "var/attachments"
[outbound]
transport = "file"
directory = "outbox"
sender = "support@example.com"
templates = "{templates}"
[auth]
enabled = false
[http]
listen = "127.0.0.1:0"
[log]
level = "warning"
format = "json"
"""


def message(subject: str, n: int, *, attachment: bool, cc: str | None = None) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Bench Person <{EMAIL}>"
    msg["To"] = "support@example.com"
    if cc:
        msg["Cc"] = cc
    msg["Subject"] = subject
    msg["Message-ID"] = f"<bench-{n}@client.example>"
    msg.set_content(f"Message {n}: the printer still prints in Comic Sans.\n" * 20)
    if attachment:
        content = n.to_bytes(4, "big") + os.urandom(64 * 1024)
        msg.add_attachment(content, maintype="application", subtype="octet-stream",
                           filename=f"log-{n}.bin")  # fmt: skip
    return msg


async def send_all(port: int, mails: list[EmailMessage], *, sender: str = EMAIL) -> None:
    queue = list(mails)

    async def worker() -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
            while queue:
                await client.send_message(
                    queue.pop(0), sender=sender, recipients=["support@example.com"]
                )

    await asyncio.gather(*(worker() for _ in range(10)))


async def settle(config: Config, tickets: int) -> None:
    async with store_for(config) as store:
        for _ in range(6000):  # a minute at most
            if not await store.list_inbound("received"):
                if len(await store.list_tickets()) >= tickets:
                    return
            await asyncio.sleep(0.01)
    raise RuntimeError("ingest did not finish")


async def populate(config: Config, messages: int) -> None:
    stop = asyncio.Event()
    ready: asyncio.Future[Listening] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(config, shutdown=stop.wait, on_ready=ready.set_result))
    port = (await asyncio.wait_for(ready, 30)).smtp.port
    tickets = max(1, messages // 10)
    firsts = [message(f"Topic {i}", i, attachment=i % 10 == 0) for i in range(1, tickets + 1)]
    for i, mail in enumerate(firsts, 1):  # one at a time: ticket i is topic i
        await send_all(port, [mail])
        await settle(config, i)
    replies = [
        message(f"Re: Topic {t} [#{t}]", n, attachment=n % 10 == 0)
        for n, t in zip(
            range(tickets + 1, messages + 1),
            (1 + k % tickets for k in range(messages - tickets)),
            strict=True,
        )
    ]
    await send_all(port, replies)
    other = EmailMessage()
    other["From"] = "someone.else@example.org"
    other["To"] = "support@example.com"
    other["Cc"] = EMAIL
    other["Subject"] = "Another person's ticket"
    other.set_content("Copying the bench person.\n")
    await send_all(port, [other], sender="someone.else@example.org")
    await settle(config, tickets + 1)
    stop.set()
    await task


def cli(config: Config, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "mailgate", "--config", str(config.path), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    return time.perf_counter() - start, result


async def erase_in_process(config: Config) -> tuple[float, dict[str, int]]:
    """The erasure alone, timed inside one process (the store already open)."""
    async with store_for(config) as store:
        start = time.perf_counter()
        erased = await rights.erase(store, EMAIL, config, via="bench", reason=None)
        took = time.perf_counter() - start
    assert erased is not None
    return took, erased.counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    args = parser.parse_args()
    configure_logging("warning", fmt="json")
    with tempfile.TemporaryDirectory(prefix="mailgate-bench-erase-") as folder:
        root = Path(folder) / "a"
        root.mkdir()
        (root / "config.toml").write_text(
            CONFIG.format(templates=ROOT / "templates"), encoding="utf-8"
        )
        config = load_config(root / "config.toml")
        started = time.perf_counter()
        asyncio.run(populate(config, args.messages))
        print(f"populated: {args.messages} messages in {time.perf_counter() - started:.1f} s")
        size = sum(p.stat().st_size for p in (root / "var").rglob("*") if p.is_file())
        print(f"data directory: {size / 1e6:.1f} MB (key store included)")
        # The same data twice (keys beside it, in var/): one copy for the command line, one
        # for the erasure timed in this process.
        shutil.copytree(root, Path(folder) / "b")
        copy = load_config(Path(folder) / "b" / "config.toml")

        baseline, missing = cli(config, "privacy", "erase", "nobody@example.org")
        assert missing.returncode == 1, missing.stderr
        took, erased = cli(config, "privacy", "erase", EMAIL)
        assert erased.returncode == 0, erased.stderr
        print(erased.stdout.rstrip())
        print(f"privacy erase (command line): {took:.2f} s wall")
        print(f"  the same command erasing nothing (start, imports, opening): {baseline:.2f} s")
        alone, counts = asyncio.run(erase_in_process(copy))
        print(f"  the erasure alone, in process: {alone:.3f} s ({counts['messages']} messages)")


if __name__ == "__main__":
    main()
