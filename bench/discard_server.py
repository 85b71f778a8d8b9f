"""Baseline SMTP server for bench/intake.py: aiosmtpd that accepts and discards.

    python bench/discard_server.py --port PORT

Listens on 127.0.0.1 only, answers every DATA with "250 OK" and drops the
message.  Exits cleanly on SIGTERM/SIGINT.  With `--tls-cert CERT --tls-key KEY`
it offers STARTTLS (the baseline of `intake.py --tls`).

`--fake-mailgate --config CFG` is a harness self-test mode (used by
`intake.py --self-test`): it reads the mailgate config file, listens on its
[smtp] listen address, replies "250 2.0.0 Queued as <id>", stores each
message as an `inbound` row in the configured SQLite database with
state='received' and a background task marks rows processed (setting
processed_at).  It only exists so the time-to-ticket code path of the
harness can be exercised before/without the real mailgate.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sqlite3
import ssl
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP


class DiscardHandler:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"


class FakeMailgateHandler:
    """Queue-and-process imitation, for validating the harness only."""

    def __init__(self, db_path: Path) -> None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(db_path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS inbound (id TEXT PRIMARY KEY, state TEXT NOT NULL,"
            " raw BLOB, received_at REAL, processed_at REAL)"
        )
        self.wake = asyncio.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        qid = uuid.uuid4().hex[:16]
        self.db.execute(
            "INSERT INTO inbound (id, state, raw, received_at) VALUES (?, 'received', ?, ?)",
            (qid, envelope.original_content, time.time()),
        )
        self.wake.set()
        return f"250 2.0.0 Queued as {qid}"

    async def worker(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while True:
                rows = self.db.execute(
                    "SELECT id FROM inbound WHERE state = 'received' LIMIT 50"
                ).fetchall()
                if not rows:
                    break
                await asyncio.sleep(0.005)  # pretend to do some work
                now = time.time()
                self.db.executemany(
                    "UPDATE inbound SET state = 'processed', processed_at = ? WHERE id = ?",
                    [(now, r[0]) for r in rows],
                )


async def amain(args: argparse.Namespace, cfg: dict[str, Any] | None, cfg_dir: Path) -> None:
    loop = asyncio.get_running_loop()
    host, port = "127.0.0.1", args.port
    worker = None
    handler: DiscardHandler | FakeMailgateHandler
    if cfg is not None:
        h, _, p = cfg["smtp"]["listen"].rpartition(":")
        host, port = h, int(p)
        fake = FakeMailgateHandler(cfg_dir / cfg["storage"]["database"])
        worker = asyncio.create_task(fake.worker())
        handler = fake
        hostname = cfg["smtp"].get("hostname", "fake.localhost")
    else:
        handler = DiscardHandler()
        hostname = "discard.localhost"
    if host != "127.0.0.1":
        raise SystemExit("refusing to listen on anything but 127.0.0.1")

    tls = None
    if args.tls_cert:  # STARTTLS offered, as mailgate does with [smtp] tls_cert/tls_key
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    server = await loop.create_server(
        lambda: SMTP(handler, hostname=hostname, data_size_limit=10 * 1024 * 1024, tls_context=tls),
        host=host,
        port=port,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    if worker is not None:
        worker.cancel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--tls-cert", help="offer STARTTLS with this certificate (PEM)")
    ap.add_argument("--tls-key", help="and this key (PEM)")
    ap.add_argument("--fake-mailgate", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.fake_mailgate and not args.port:
        ap.error("--port is required")
    cfg, cfg_dir = None, Path()
    if args.fake_mailgate:
        cfg_path = Path(args.config).resolve()
        cfg, cfg_dir = tomllib.loads(cfg_path.read_text()), cfg_path.parent
    asyncio.run(amain(args, cfg, cfg_dir))
    os._exit(0)  # don't linger on half-closed client connections


if __name__ == "__main__":
    main()
