"""What sealing costs in bytes: for the rows of a mailgate database, the sealed size of every
sealed column against the size of its value in clear, per message.

    .venv/bin/python bench/seal_overhead.py --messages 500       # a fresh daemon, real mail
    .venv/bin/python bench/seal_overhead.py --config PATH        # an existing database

With --messages, a daemon is started on loopback with a temporary config and sent that many
2 KB mails (the intake bench's message) from 50 senders over SMTP, then measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import aiosmtplib
from intake import make_message  # bench/intake.py: the intake bench's 2 KB mail

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailgate.config import Config, load_config
from mailgate.privacy.sealing import DataKey, Undecryptable
from mailgate.store import labels, open_keyring
from mailgate.store.sqlite_raw import message_key
from tests.conftest import SUPPORT, daemon_running, write_config

# (table, column, label, key column): the key column names the data key's id, or how to
# find it (the ticket's requester, the message's sender).
COLUMNS = (
    ("tickets", "subject", labels.SUBJECT, "owner"),
    ("messages", "subject", labels.SUBJECT, "owner"),
    ("messages", "body_text", labels.BODY, "owner"),
    ("messages", "body_html", labels.HTML, "owner"),
    ("messages", "auth", labels.AUTH, "owner"),
    ("messages", "sender", labels.SENDER, "sender_key"),
    ("people", "email", labels.EMAIL, "key_id"),
    ("people", "name", labels.NAME, "key_id"),
    ("outbox", "mail", labels.OUTBOX, "owner"),
)
OWNER = {
    "tickets": "SELECT p.key_id FROM tickets t JOIN people p ON p.id = t.requester_id "
    "WHERE t.id = x.id",
    "messages": "SELECT p.key_id FROM tickets t JOIN people p ON p.id = t.requester_id "
    "WHERE t.id = x.ticket_id",
    "outbox": "SELECT p.key_id FROM tickets t JOIN people p ON p.id = t.requester_id "
    "WHERE t.id = x.ticket_id",
}


def measure(config: Config) -> dict[str, object]:
    keys = open_keyring(config, create=False)
    db = sqlite3.connect(config.storage.database)
    sealed: dict[str, int] = defaultdict(int)
    clear: dict[str, int] = defaultdict(int)
    try:
        for table, column, label, key_column in COLUMNS:
            key_sql = f"({OWNER[table]})" if key_column == "owner" else f"x.{key_column}"
            rows = db.execute(
                f"SELECT x.{column}, {key_sql} FROM {table} x "  # noqa: S608 - constants
                f"WHERE x.{column} IS NOT NULL"
            )
            for value, key_id in rows:
                key = keys.key(key_id)
                if key is None:
                    continue
                sealed[f"{table}.{column}"] += len(value)
                clear[f"{table}.{column}"] += len(key.open(bytes(value), label))
        for envelope, raw, raw_key, owner, size in db.execute(
            "SELECT envelope, raw, raw_key, owner_key, size FROM inbound"
        ):
            own: DataKey | None = message_key(keys, bytes(raw_key), owner)
            if own is None:
                continue
            try:
                sealed["inbound.envelope"] += len(envelope)
                clear["inbound.envelope"] += len(own.open(bytes(envelope), labels.ENVELOPE))
            except Undecryptable:
                continue
            sealed["inbound.raw_key"] += len(raw_key)
            clear["inbound.raw_key"] += len(own.material)
            if raw is not None:
                sealed["inbound.raw"] += len(raw)
                clear["inbound.raw"] += size
        messages = db.execute("SELECT count(*) FROM messages").fetchone()[0]
    finally:
        db.close()
        keys.close()
    per_column = {
        name: {"sealed": sealed[name], "clear": clear[name], "overhead": sealed[name] - clear[name]}
        for name in sorted(sealed)
    }
    total = sum(sealed.values()) - sum(clear.values())
    return {
        "messages": messages,
        "columns": per_column,
        "overhead_bytes_per_message": round(total / messages, 1) if messages else None,
        "clear_bytes_per_message": round(sum(clear.values()) / messages, 1) if messages else None,
    }


async def fill(folder: Path, count: int) -> Config:
    config = load_config(write_config(folder, max_message_size=10 * 1024 * 1024))
    async with daemon_running(config) as daemon:
        for n in range(count):
            original, raw = make_message("seal", n)
            sender = f"customer{n % 50}@example.org"
            raw = raw.replace(original.encode(), sender.encode())
            await aiosmtplib.send(
                raw, sender=sender, recipients=[SUPPORT], hostname=daemon.host, port=daemon.port
            )
        await daemon.settle()
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path)
    parser.add_argument("--messages", type=int, default=500)
    args = parser.parse_args()
    if args.config:
        result = measure(load_config(args.config))
    else:
        with tempfile.TemporaryDirectory(prefix="seal-overhead-") as folder:
            config = asyncio.run(fill(Path(folder), args.messages))
            result = measure(config)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
