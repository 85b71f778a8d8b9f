"""Retention benchmark: `mailgate purge` for one person with 1,000 messages.

Run from the repository root:

    .venv/bin/python bench/privacy.py                 # 1,000 messages
    .venv/bin/python bench/privacy.py --messages 5000

One person writes N messages on one ticket (each with its raw message, about 2 KB; one in ten
with a 20 KB attachment), stored through the store's ingest unit of work as ingest stores
them; the ticket is closed. Then, each on a fresh copy of that data directory, with the
retention clock moved (`MAILGATE_NOW`):

- archive: the requester verified, 31 days on: raw bytes removed, the ticket moved to the
  archive and deleted from the database;
- erasure: the requester never verified, 31 days on, `active_after_close` 60 days: the person
  erased through `privacy/erasure.py`, their closed ticket archived first by erasure's hook;
- destroy: 4 years on: the ticket's record past `closed_tickets`, deleted without archiving.

Each is timed as `mailgate purge --json` (a subprocess: process start and store opening
included) and reports its counts. Only local files are used.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mailgate.config import load_config  # noqa: E402
from mailgate.model import Address, Envelope, ParsedMail, StoredAttachment  # noqa: E402
from mailgate.store import IngestTx, store_for  # noqa: E402
from mailgate.store.blobs import save_blob  # noqa: E402

EMAIL = "bench.person@example.org"
CONFIG = """\
[smtp]
accept = ["support@example.com"]
[outbound]
sender = "support@example.com"
templates = "{templates}"
"""


def _mail(i: int, body: str) -> ParsedMail:
    return ParsedMail(
        sender=Address(EMAIL, "Bench Person"),
        to=(),
        cc=(),
        subject=f"Question {i}",
        message_id=f"m{i}@bench.example",
        in_reply_to=(),
        references=(),
        body_text=body,
        body_html=None,
        body_digest=hashlib.sha256(body.encode()).hexdigest(),
    )


async def populate(folder: Path, messages: int) -> Path:
    path = folder / "config.toml"
    path.write_text(CONFIG.format(templates=ROOT / "templates"), encoding="utf-8")
    config = load_config(path)
    envelope = Envelope(EMAIL, ("support@example.com",), "127.0.0.1:1", "client")
    attachments = config.storage.attachments
    async with store_for(config) as store:
        raws = []
        for i in range(messages):
            body = f"Message {i}: " + "the printer is still on fire. " * 60
            raw = f"From: <{EMAIL}>\r\nSubject: Question {i}\r\n\r\n{body}\r\n".encode()
            raws.append((f"Q{i:06d}", envelope, raw))
        for start in range(0, messages, 200):
            await store.receive(raws[start : start + 200])
        files = []
        for i in range(0, messages, 10):
            name, key, digest = save_blob(attachments, os.urandom(20 * 1024))
            files.append(StoredAttachment(f"scan{i}.bin", "application/pdf", 20480, digest,
                                          False, name, key))  # fmt: skip
        now = datetime.now(UTC)

        def work(tx: IngestTx) -> int:
            ticket = tx.create_ticket("Printer on fire", Address(EMAIL, "Bench Person"), at=now)
            for i in range(messages):
                tx.add_message(
                    ticket, _mail(i, f"Message {i}: the printer is still on fire."),
                    inbound_id=f"Q{i:06d}", reason="new" if i == 0 else "references",
                    attachments=[files[i // 10]] if i % 10 == 0 else (), at=now,
                )  # fmt: skip
                tx.finish_inbound(f"Q{i:06d}", "ingested", reason=None, at=now)
            tx.set_status(ticket, "closed", at=now)
            return ticket

        await store.ingest(work)
    return path


def purge(config: Path, now: datetime) -> tuple[float, dict[str, int]]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "mailgate", "--config", str(config), "purge", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "MAILGATE_NOW": now.isoformat()},
        check=True,
    )
    elapsed = time.perf_counter() - started
    counts: dict[str, int] = json.loads(result.stdout)["counts"]
    return elapsed, {k: v for k, v in counts.items() if v}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mailgate-bench-privacy-") as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        started = time.perf_counter()
        asyncio.run(populate(base, args.messages))
        print(f"populated {args.messages} messages in {time.perf_counter() - started:.1f} s")
        now = datetime.now(UTC)
        scenarios = {
            "archive": (True, now + timedelta(days=31), ""),
            "erasure": (False, now + timedelta(days=31), 'active_after_close = "60d"\n'),
            "destroy": (True, now + timedelta(days=4 * 366), ""),
        }
        for name, (verified, moment, retention) in scenarios.items():
            folder = Path(tmp) / name
            shutil.copytree(base, folder)
            config = folder / "config.toml"
            with config.open("a", encoding="utf-8") as out:
                out.write(f"[retention]\n{retention}")
            if verified:
                subprocess.run(
                    [sys.executable, "-m", "mailgate", "--config", str(config),
                     "requesters", "verify", EMAIL],
                    capture_output=True, check=True,
                )  # fmt: skip
            size = sum(p.stat().st_size for p in (folder / "var").rglob("*") if p.is_file())
            elapsed, counts = purge(config, moment)
            print(f"{name:8} {elapsed:6.2f} s  (data {size / 1e6:.1f} MB)  {counts}")


if __name__ == "__main__":
    main()
