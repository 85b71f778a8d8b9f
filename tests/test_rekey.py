"""`mailgate keygen` and `mailgate rekey` as an operator runs them: real key files, a real key
store and database, the CLI and the daemon as subprocesses, `kill -9` in the middle."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from email.utils import formatdate
from pathlib import Path

import pytest

from mailgate.config import Config
from mailgate.model import Address, Envelope, ParsedMail, StoredAttachment
from mailgate.privacy.keyring import Keyring, KeyringError, fingerprint, read_master_key
from mailgate.store import IngestTx, store_for
from mailgate.store.blobs import save_blob
from tests.conftest import SubprocessDaemon, run_cli

ENVELOPE = Envelope("", ("support@example.com",), "127.0.0.1:1", "client")
QUARANTINED = b"From: <>\r\nSubject: Held back\r\n\r\nA quarantined body.\r\n"
WAITING = (
    "From: Waiting Walt <walt@example.org>\r\nTo: support@example.com\r\n"
    f"Subject: Arrived while keys moved\r\nDate: {formatdate()}\r\n"
    "Message-ID: <waiting@client.example>\r\n\r\nStill readable?\r\n"
).encode()
ATTACHMENT = b"%PDF-1.4 the invoice of Ada" * 100


async def populate(config: Config, people: int) -> None:
    """`people` requesters with a ticket each (the first with a message and an attachment), a
    quarantined raw message and one that waits to be ingested: keys of every kind."""
    blob, key, sha = save_blob(config.storage.attachments, ATTACHMENT)
    now = datetime.now(UTC)

    def work(tx: IngestTx) -> None:
        for n in range(people):
            tx.create_ticket(
                f"Question {n}", Address(f"person{n}@example.org", f"Person {n}"), at=now
            )
        mail = ParsedMail(
            sender=Address("person0@example.org", "Person 0"),
            to=(),
            cc=(),
            subject="Question 0",
            message_id="q0@client.example",
            in_reply_to=(),
            references=(),
            body_text="The invoice is attached.",
            body_html=None,
        )
        attachment = StoredAttachment(
            "invoice.pdf", "application/pdf", len(ATTACHMENT), sha, blob=blob, key=key
        )
        tx.add_message(1, mail, inbound_id=None, reason="new", attachments=[attachment], at=now)
        tx.finish_inbound("Q1", "quarantined", reason="test", at=now)

    async with store_for(config) as store:
        await store.receive([("Q1", ENVELOPE, QUARANTINED), ("Q2", ENVELOPE, WAITING)])
        await store.ingest(work)


def views(daemon: SubprocessDaemon) -> tuple[object, ...]:
    """What the CLI shows of every kind of key: a ticket with its attachment, the requesters,
    a quarantined raw message."""

    def cli(*args: str) -> str:
        result = run_cli("--config", str(daemon.config_path), *args)
        assert result.returncode == 0, result.stderr
        return result.stdout

    return (
        json.loads(cli("tickets", "show", "1", "--json")),
        json.loads(cli("requesters", "list", "--json")),
        cli("quarantine", "show", "Q1", "--raw"),
    )


def rekey(daemon: SubprocessDaemon, new: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli("--config", str(daemon.config_path), "rekey", str(new), *extra)


def cli_tickets(daemon: SubprocessDaemon) -> str:
    listed = run_cli("--config", str(daemon.config_path), "tickets", "list")
    return listed.stdout + listed.stderr


def wrapped_under(keystore: Path) -> dict[str, int]:
    with sqlite3.connect(keystore) as db:
        return dict(db.execute("SELECT master, count(*) FROM data_keys GROUP BY master"))


def test_keygen_writes_a_private_key_and_never_overwrites_one(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "new.key"
    made = run_cli("keygen", str(path))  # no config needed
    assert made.returncode == 0, made.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    key = read_master_key(path)
    again = run_cli("keygen", str(path))
    assert again.returncode == 1
    assert again.stderr == f"mailgate: {path} exists: keygen never overwrites a key\n"
    assert read_master_key(path) == key


def test_rekey_moves_every_key_and_the_daemon_starts_with_the_config_unchanged(
    tmp_path: Path,
) -> None:
    """1. A store with data keys, the index key, master-wrapped raw messages (one quarantined,
    one waiting for ingest). 2. Rekey re-wraps everything and replaces the key file; every value
    reads as before; the old key opens nothing. 3. The daemon starts with the same config and
    ingests the message that waited; a rekey refuses to run beside it. 4. A second run, the
    daemon stopped, has nothing to do."""
    daemon = SubprocessDaemon(tmp_path / "d")
    config = daemon.config
    asyncio.run(populate(config, people=3))
    before = views(daemon)
    key_file, keystore = config.security.key_file, config.security.keystore
    old = read_master_key(key_file)
    new_path = tmp_path / "new.key"
    assert run_cli("keygen", str(new_path)).returncode == 0
    new = read_master_key(new_path)

    done = rekey(daemon, new_path)
    assert done.returncode == 0, done.stderr
    counts = re.match(
        r"rekey: (\d+) data keys and the index key and (\d+) message keys re-wrapped", done.stdout
    )
    assert counts is not None, done.stdout
    assert int(counts[1]) == sum(wrapped_under(keystore).values()) >= 3
    assert int(counts[2]) == 2  # Q1 and Q2: not on a ticket, wrapped under the master key
    assert f"{key_file} now holds the new key" in done.stdout
    assert read_master_key(key_file) == new
    old_copy = key_file.with_name(key_file.name + ".old")
    assert read_master_key(old_copy) == old and old_copy.stat().st_mode & 0o777 == 0o600
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert set(wrapped_under(keystore)) == {fingerprint(new)}
    with pytest.raises(KeyringError, match="another master key"):
        Keyring.open(old_copy, keystore)
    assert views(daemon) == before
    assert before[2] == QUARANTINED.decode().replace("\r\n", "\n")  # text mode reads CRLF as LF

    daemon.start()
    try:
        deadline = time.monotonic() + 30
        while "Arrived while keys moved" not in (listed := cli_tickets(daemon)):
            assert time.monotonic() < deadline, listed
            time.sleep(0.1)
        busy = rekey(daemon, new_path)
    finally:
        daemon.kill(signal.SIGTERM)
    assert busy.returncode == 1
    assert "the key store is in use: stop `mailgate serve`" in busy.stderr

    again = rekey(daemon, new_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("rekey: 0 data keys and 0 message keys re-wrapped")
    assert f"{key_file} already held the new key" in again.stdout


def test_rekey_exit_codes(tmp_path: Path) -> None:
    daemon = SubprocessDaemon(tmp_path / "d")
    asyncio.run(populate(daemon.config, people=1))
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    result = rekey(daemon, bad)
    assert result.returncode == 78
    assert "not a master key" in result.stderr
    assert rekey(daemon, tmp_path / "missing.key").returncode == 78
    assert run_cli("keygen", str(tmp_path / "new.key")).returncode == 0
    usage = rekey(daemon, tmp_path / "new.key", "--batch", "0")
    assert (usage.returncode, usage.stderr) == (2, "mailgate: --batch: at least 1\n")
    # A `.old` of another key (an earlier rekey's) is never overwritten.
    key_file = daemon.config.security.key_file
    assert run_cli("keygen", str(key_file.with_name(key_file.name + ".old"))).returncode == 0
    refused = rekey(daemon, tmp_path / "new.key")
    assert refused.returncode == 1
    assert "holds another key (kept by an earlier rekey)" in refused.stderr


def test_kill_9_in_the_middle_of_rekey_then_a_rerun_finishes(tmp_path: Path) -> None:
    """1. Three thousand people. 2. Rekey in batches of 10; `kill -9` once the key store shows
    keys under the new master (a batch committed) and before all are. 3. The CLI with the old
    key file refuses, naming the unfinished rekey. 4. The same command again re-wraps exactly
    what was left and replaces the key file. 5. Everything reads under the new key."""
    people = 3000
    daemon = SubprocessDaemon(tmp_path / "d")
    config = daemon.config
    asyncio.run(populate(config, people=people))
    before = views(daemon)
    keystore = config.security.keystore
    old = read_master_key(config.security.key_file)
    new_path = tmp_path / "new.key"
    assert run_cli("keygen", str(new_path)).returncode == 0
    new_fp = fingerprint(read_master_key(new_path))
    total = sum(wrapped_under(keystore).values())

    errors = tmp_path / "rekey.err"
    with errors.open("wb") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mailgate",
                "--config",
                str(daemon.config_path),
                "rekey",
                str(new_path),
                "--batch",
                "10",
            ],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 60
        while not wrapped_under(keystore).get(new_fp):
            assert proc.poll() is None, errors.read_text()
            assert time.monotonic() < deadline, "no batch was committed"
            time.sleep(0.002)
        proc.kill()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    moved = wrapped_under(keystore)
    assert 0 < moved[new_fp] < total, "rekey ended before it could be killed"
    left = total - moved[new_fp]
    assert read_master_key(config.security.key_file) == old  # not replaced yet

    stuck = run_cli("--config", str(daemon.config_path), "tickets", "list")
    assert stuck.returncode == 78
    assert "unfinished `mailgate rekey`" in stuck.stderr

    done = rekey(daemon, new_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"rekey: {left} data keys and 2 message keys re-wrapped")
    assert wrapped_under(keystore) == {new_fp: total}
    assert views(daemon) == before
    assert len(before[1]) == people  # type: ignore[arg-type]
