"""The audit log: one record per privacy action, naming its subject by a keyed hash only."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess

from mailgate.privacy.audit import subject_hash
from mailgate.store import store_for
from tests.conftest import Running, cli_json, mail
from tests.test_cli import NO_FROM

ANN = "Ann.Audit@example.org"


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result.stdout


async def test_every_action_leaves_a_record_with_a_keyed_hash_and_no_address(
    daemon: Running,
) -> None:
    await daemon.send(mail(sender=f"Ann Audit <{ANN}>"))
    queue_id = await daemon.send(NO_FROM, sender="")
    await daemon.settle()
    out = daemon.config.path.parent / "export.zip"
    ok(daemon.cli("privacy", "export", ANN, "--out", str(out)))
    ok(daemon.cli("privacy", "restrict", ANN.lower()))  # any spelling names the same subject
    ok(daemon.cli("privacy", "unrestrict", ANN))
    ok(daemon.cli("privacy", "object", ANN))
    ok(daemon.cli("requesters", "update", ANN, "--name", "Ann Corrected"))
    ok(daemon.cli("requesters", "update", ANN, "--email", "ann.moved@example.org"))
    ok(daemon.cli("quarantine", "purge", queue_id))
    ok(daemon.cli("privacy", "erase", "ann.moved@example.org"))

    records = cli_json(daemon, "audit", "list")
    assert [r["action"] for r in records] == [
        "export", "restrict", "unrestrict", "object", "correct", "correct", "correct",
        "quarantine_purge", "erase",
    ]  # fmt: skip
    async with store_for(daemon.config) as store:
        ann = subject_hash(store.keys, ANN)
        moved = subject_hash(store.keys, "ann.moved@example.org")
    assert ann == subject_hash_of(daemon, "ann.audit@EXAMPLE.org")
    assert [r["subject"] for r in records] == [ann] * 6 + [moved, None, moved]
    assert all(re.fullmatch(r"[0-9a-f]{64}", r["subject"]) for r in records if r["subject"])
    assert all(r["via"] == "cli" for r in records)
    export, restrict, _unrestrict, objection, rename, move, _moved, purge, erase = records
    assert export["counts"]["tickets"] == 1 and export["counts"]["messages"] == 1
    assert export["counts"]["bytes"] == out.stat().st_size
    assert restrict["counts"] == {"people": 1}
    assert objection["counts"] == {"people": 1}
    assert rename["counts"] == {"email": 0, "name": 1, "tokens_revoked": 0}
    assert move["counts"] == {"email": 1, "name": 0, "tokens_revoked": 1}
    assert purge["counts"] == {"raw_messages": 1}
    assert erase["counts"]["tickets"] == 1 and erase["reason"] == "request"

    # Only the records of one address, found by its hash.
    mine = cli_json(daemon, "audit", "list", "--subject", "ann.moved@example.org")
    assert [r["action"] for r in mine] == ["correct", "erase"]
    assert cli_json(daemon, "audit", "list", "--since", "2999-01-01") == []
    table = ok(daemon.cli("audit", "list"))
    assert "quarantine_purge" in table and ann[:16] in table

    # Nothing in the audit table, nor anything the command prints, is an address.
    db = sqlite3.connect(daemon.config.storage.database)
    try:
        rows = db.execute("SELECT * FROM audit").fetchall()
    finally:
        db.close()
    text = json.dumps(rows) + json.dumps(records) + table
    assert "@" not in text and "ann" not in text.lower().replace(ann, "").replace(moved, "")


def subject_hash_of(daemon: Running, email: str) -> str | None:
    [record] = cli_json(daemon, "audit", "list", "--subject", email)[:1]
    return str(record["subject"])
