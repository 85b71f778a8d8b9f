"""Retention (issue 10): every period ends exactly where it should, on real mail, real files.

Mail goes to a real daemon; time is moved by the retention clock (`MAILGATE_NOW` for the CLI
and the daemon, `now=` in-process), never by sleeping. Each category is checked on both sides
of its boundary: a second before, kept; a second after, gone.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs as structlog_capture

from mailgate.config import Config, load_config
from mailgate.privacy.archive import archiver
from mailgate.privacy.erasure import erase
from mailgate.privacy.retention import COUNTS, Scheduler
from mailgate.store import store_for
from mailgate.store.archive import open_archive
from tests.conftest import (
    Running,
    SubprocessDaemon,
    daemon_running,
    mail,
    run_cli,
    wait_for_event,
    write_config,
)
from tests.test_cli import NO_FROM
from tests.test_logging import read_events

NAME = "Ximena Retainova"
EMAIL = "ximena.retainova@example.org"
SUBJECT = "Refund for order 4471-QX"
BODY = "the toaster set the curtains alight, a phrase of mine alone"
CONTENT = b"receipt scan that only Ximena sent " * 20
SECOND = timedelta(seconds=1)
DAYS_30 = timedelta(days=30)


# -- helpers -------------------------------------------------------------------------------


def _at(ts: float, delta: timedelta = timedelta()) -> str:
    return (datetime.fromtimestamp(ts, UTC) + delta).isoformat()


def purge(config: Config, now: str, *args: str) -> dict[str, int]:
    """`mailgate purge --json` with the retention clock at `now`; its counts."""
    result = run_cli(
        "--config", str(config.path), "purge", "--json", *args, env={"MAILGATE_NOW": now}
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["dry_run"] == ("--dry-run" in args)
    counts: dict[str, int] = shown["counts"]
    assert set(counts) == set(COUNTS)
    return counts


def removed(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}


def cli(config: Config, *args: str) -> Any:
    result = run_cli("--config", str(config.path), *args)
    assert result.returncode == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout) if "--json" in args else result.stdout


def rows(config: Config, sql: str, *params: object) -> list[tuple[Any, ...]]:
    """Read the database file directly (read-only)."""
    db = sqlite3.connect(f"{config.storage.database.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def table_counts(config: Config) -> dict[str, int]:
    tables = [
        "people", "inbound", "tickets", "messages", "attachments", "blobs",
        "verification_tokens", "outbox", "participants",
    ]  # fmt: skip
    counted = {t: rows(config, f"SELECT count(*) FROM {t}")[0][0] for t in tables}  # noqa: S608
    counted["raw"] = rows(config, "SELECT count(*) FROM inbound WHERE raw IS NOT NULL")[0][0]
    return counted


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def with_attachment() -> Any:
    message = mail(sender=f"{NAME} <{EMAIL}>", subject=SUBJECT, body=BODY + "\n")
    message.add_attachment(
        CONTENT, maintype="application", subtype="octet-stream", filename="receipt.bin"
    )
    return message


async def one_ticket(daemon: Running, message: Any = None, *, sender: str = EMAIL) -> int:
    await daemon.send(message if message is not None else with_attachment(), sender=sender)
    [ticket] = await daemon.tickets()
    return ticket.id


def retention_config(folder: Path, **periods: str) -> Config:
    """The test config with these `[retention]` keys."""
    path = write_config(folder)
    lines = "".join(f'{key} = "{value}"\n' for key, value in periods.items())
    path.write_text(path.read_text(encoding="utf-8") + f"\n[retention]\n{lines}", "utf-8")
    return load_config(path)


def closed_at(config: Config, ticket_id: int) -> float:
    [(at,)] = rows(config, "SELECT closed_at FROM tickets WHERE id = ?", ticket_id)
    assert at is not None
    return float(at)


def created_at(config: Config, email: str) -> float:
    shown = cli(config, "requesters", "show", email, "--json")
    return datetime.fromisoformat(shown["created_at"]).timestamp()


# -- the durations -------------------------------------------------------------------------


def test_durations_count_calendar_months_and_bad_ones_name_their_key(tmp_path: Path) -> None:
    from tests.test_config import assert_config_error, check, edit_config

    path = write_config(tmp_path)
    retention = load_config(path).retention
    assert (str(retention.raw_messages), str(retention.closed_tickets)) == ("30d", "3y")
    end_of_august = datetime(2030, 8, 31, 12, tzinfo=UTC)
    assert retention.identification.before(end_of_august) == datetime(2030, 2, 28, 12, tzinfo=UTC)
    assert retention.closed_tickets.before(end_of_august) == datetime(2027, 8, 31, 12, tzinfo=UTC)
    assert retention.delivery_log.before(datetime(2030, 5, 31, tzinfo=UTC)) == datetime(
        2030, 2, 28, tzinfo=UTC
    )
    assert retention.archive == path.parent / "var" / "archive.sqlite"

    for good in ('"12h"', '"2 weeks"', '"1 year"', '"6 months"', '"0d"'):
        edit_config(path, "retention", "raw_messages", good)
        assert check(path).returncode == 0, good
    for bad in ('"30"', '"3m"', "30", '"-1d"', '"1.5d"', '"soon"'):
        edit_config(path, "retention", "raw_messages", bad)
        result = check(path)
        assert_config_error(result, "retention.raw_messages")
        assert 'expected a duration like "30d" or "6 months"' in result.stderr
    edit_config(path, "retention", "raw_messages", None)
    edit_config(path, "retention", "active_after_close", '"4y"')
    assert_config_error(check(path), "retention.active_after_close", "retention.closed_tickets")


# -- raw messages and quarantine ----------------------------------------------------------


async def test_raw_bytes_go_after_30_days_and_the_ticket_stays(daemon: Running) -> None:
    config = daemon.config
    queue_id = await daemon.send(mail(sender=f"{NAME} <{EMAIL}>", body=BODY))
    [ticket] = await daemon.tickets()
    [(processed,)] = rows(config, "SELECT processed_at FROM inbound WHERE id = ?", queue_id)

    assert removed(purge(config, _at(processed, DAYS_30 - SECOND))) == {}
    async with store_for(config) as store:
        assert await store.read_raw(queue_id) is not None

    assert removed(purge(config, _at(processed, DAYS_30 + SECOND))) == {"raw_messages": 1}
    async with store_for(config) as store:
        assert await store.read_raw(queue_id) is None
        kept = await store.get_ticket(ticket.id)
    assert kept is not None and BODY in kept.messages[0].body_text
    shown = cli(config, "tickets", "show", str(ticket.id), "--json")
    assert BODY in shown["messages"][0]["body_text"]
    assert removed(purge(config, _at(processed, DAYS_30 + SECOND))) == {}  # once


async def test_a_quarantined_message_is_deleted_after_30_days(daemon: Running) -> None:
    config = daemon.config
    queue_id = await daemon.send(NO_FROM, sender="")
    await daemon.settle()
    [(processed,)] = rows(config, "SELECT processed_at FROM inbound WHERE id = ?", queue_id)

    assert removed(purge(config, _at(processed, DAYS_30 - SECOND))) == {}
    raw = run_cli("--config", str(config.path), "quarantine", "show", queue_id, "--raw")
    assert raw.returncode == 0 and "This message has no From header." in raw.stdout

    assert removed(purge(config, _at(processed, DAYS_30 + SECOND))) == {"quarantined": 1}
    assert cli(config, "quarantine", "list", "--json") == []
    gone = run_cli("--config", str(config.path), "quarantine", "show", queue_id, "--raw")
    assert gone.returncode == 1


# -- delivery log and identification ------------------------------------------------------


async def test_delivery_log_envelopes_and_tokens_go_at_their_boundaries(tmp_path: Path) -> None:
    """Each row goes a moment after its own time plus its period, not a moment before."""
    config = retention_config(tmp_path, delivery_log="90d", identification="180d")
    async with daemon_running(config) as daemon:
        queue_id = await daemon.send(mail(sender=f"{NAME} <{EMAIL}>"))
        await daemon.settle()
        deadline = time.monotonic() + 30
        while rows(config, "SELECT count(*) FROM outbox WHERE state != 'sent'")[0][0]:
            assert time.monotonic() < deadline, "the outbox did not send"
            await asyncio.sleep(0.05)
    [(processed,)] = rows(config, "SELECT processed_at FROM inbound WHERE id = ?", queue_id)
    sent = [at for (at,) in rows(config, "SELECT sent_at FROM outbox ORDER BY sent_at")]
    assert len(sent) == 2  # the verification mail and the acknowledgement
    [(token_made,)] = rows(config, "SELECT created_at FROM verification_tokens")
    moment = timedelta(milliseconds=1)
    period = timedelta(days=90)

    def outbox() -> int:
        return int(rows(config, "SELECT count(*) FROM outbox")[0][0])

    def envelopes() -> int:
        return int(rows(config, "SELECT count(*) FROM inbound")[0][0])

    # The envelope of the message (client address, HELO: a record of service use); its raw
    # bytes went at 30 days.
    assert purge(config, _at(processed, period - moment))["raw_messages"] == 1
    assert envelopes() == 1
    assert purge(config, _at(processed, period + moment))["envelopes"] == 1
    assert envelopes() == 0
    # The outbox rows, each from when it was sent.
    assert sent[0] - processed > 2 * moment.total_seconds()
    purge(config, _at(sent[0], period - moment))
    assert outbox() == 2
    assert purge(config, _at(sent[-1], period + moment))["delivery_log"] == 2
    assert outbox() == 0 and cli(config, "outbox", "list", "--json") == []
    # The verification token: an identification record.
    assert removed(purge(config, _at(token_made, 2 * period - SECOND))) == {}
    assert rows(config, "SELECT count(*) FROM verification_tokens")[0][0] == 1
    assert removed(purge(config, _at(token_made, 2 * period + SECOND))) == {"identification": 1}
    assert rows(config, "SELECT count(*) FROM verification_tokens")[0][0] == 0


# -- unverified requesters ----------------------------------------------------------------


async def test_an_unverified_requester_is_erased_after_30_days_once_nothing_is_open(
    daemon: Running,
) -> None:
    config = daemon.config
    ticket_id = await one_ticket(daemon, mail(sender=f"{NAME} <{EMAIL}>", subject=SUBJECT))
    answer = config.path.parent / "answer.txt"
    answer.write_text("We are on it.\n", encoding="utf-8")
    cli(config, "reply", str(ticket_id), "--body-file", str(answer))
    verified = "verified.person@example.org"
    other = await one_ticket_more(daemon, verified)
    cli(config, "requesters", "verify", verified)
    created = max(created_at(config, EMAIL), created_at(config, verified))

    # Open: kept however old.
    assert purge(config, _at(created, DAYS_30 + SECOND))["unverified_requesters"] == 0
    cli(config, "close", str(ticket_id))
    cli(config, "close", str(other))
    closed = max(closed_at(config, ticket_id), closed_at(config, other))
    ximena = created_at(config, EMAIL)
    assert purge(config, _at(ximena, DAYS_30 - SECOND))["unverified_requesters"] == 0
    cli(config, "requesters", "show", EMAIL, "--json")

    due = purge(config, _at(closed, DAYS_30 - SECOND), "--dry-run")
    after = purge(config, _at(closed, DAYS_30 - SECOND))  # > 30 days since created
    assert {**after, "files": 0} == due
    assert after["unverified_requesters"] == 1  # not the verified one, not support@ (the agent)
    assert after["archived"] == 1  # closed < 30 days: not by retention, by the erasure's hook
    gone = run_cli("--config", str(config.path), "requesters", "show", EMAIL)
    assert gone.returncode == 1
    assert [t["id"] for t in cli(config, "tickets", "list", "--json")] == [other]
    [record] = cli(config, "archive", "list", "--json")
    assert (record["id"], record["archived_because"]) == (ticket_id, "erasure")
    listed = cli(config, "requesters", "list", "--json")
    assert [r["email"] for r in listed] == [verified]


async def one_ticket_more(daemon: Running, sender: str) -> int:
    before = {t.id for t in await daemon.tickets()}
    await daemon.send(mail(sender=sender, subject="Another matter"), sender=sender)
    [new] = [t.id for t in await daemon.tickets() if t.id not in before]
    return new


# -- the archive ---------------------------------------------------------------------------


def _needles() -> dict[str, bytes]:
    return {
        "address": EMAIL.encode(),
        "local part": b"ximena.retainova",
        "name": NAME.encode(),
        "surname": b"Retainova",
        "subject": SUBJECT.encode(),
        "body": b"curtains alight",
        "attachment": CONTENT[:32],
    }


def _in_clear(files: list[Path]) -> list[tuple[str, str]]:
    found = []
    for file in files:
        data = file.read_bytes()
        for what, needle in _needles().items():
            if needle.lower() in data.lower():
                found.append((file.name, what))
    return found


async def test_a_closed_ticket_moves_to_the_archive_after_30_days_and_goes_after_3_years(
    daemon: Running,
) -> None:
    config = daemon.config
    ticket_id = await one_ticket(daemon)
    cli(config, "requesters", "verify", EMAIL)  # a verified requester: retention, not erasure
    [ticket] = await daemon.tickets()
    assert len(files_under(config.storage.attachments)) == 1
    cli(config, "close", str(ticket_id))
    closed = closed_at(config, ticket_id)

    assert purge(config, _at(closed, DAYS_30 - SECOND))["archived"] == 0
    assert [t["id"] for t in cli(config, "tickets", "list", "--json")] == [ticket_id]
    assert not config.retention.archive.exists() or cli(config, "archive", "list", "--json") == []

    moved = purge(config, _at(closed, DAYS_30 + SECOND))
    assert (moved["archived"], moved["files"]) == (1, 1)
    assert cli(config, "tickets", "list", "--json") == []
    gone = run_cli("--config", str(config.path), "tickets", "show", str(ticket_id))
    assert gone.returncode == 1
    assert files_under(config.storage.attachments) == []  # the archive keeps metadata only
    assert cli(config, "requesters", "show", EMAIL, "--json")["email"] == EMAIL  # still a person

    listing = run_cli("--config", str(config.path), "archive", "list", "--json")
    shown = run_cli("--config", str(config.path), "archive", "show", str(ticket_id), "--json")
    text = run_cli("--config", str(config.path), "archive", "show", str(ticket_id))
    for result in (listing, shown, text):
        assert result.returncode == 0, result.stderr
        assert EMAIL not in result.stdout.lower() and "retainova" not in result.stdout.lower()
    [record] = json.loads(listing.stdout)
    assert re.fullmatch(r"[0-9a-f]{64}", record["requester"])
    assert (record["id"], record["subject"], record["message_count"]) == (ticket_id, SUBJECT, 1)
    assert record["archived_because"] == "retention"
    assert record["created_at"] == ticket.created_at.isoformat()
    detail = json.loads(shown.stdout)
    [message] = detail["messages"]
    assert BODY in message["body_text"]
    assert message["author"] == "customer" and message["sender"] == record["requester"]
    [attachment] = message["attachments"]
    assert attachment == {
        "filename": "receipt.bin",
        "content_type": "application/octet-stream",
        "size": len(CONTENT),
        "sha256": ticket.messages[0].attachments[0].sha256,
    }
    assert BODY in text.stdout and record["requester"][:16] in text.stdout
    by_address = cli(config, "archive", "list", "--requester", EMAIL.upper(), "--json")
    assert [r["id"] for r in by_address] == [ticket_id]
    assert cli(config, "archive", "list", "--requester", "nobody@example.org", "--json") == []
    missing = run_cli("--config", str(config.path), "archive", "show", "999")
    assert missing.returncode == 1 and "no archived ticket 999" in missing.stderr

    # Nothing of the person in clear in the archive's files (nor in the database's, where the
    # ticket was: its pages were overwritten).
    archive_files = [p for p in config.retention.archive.parent.glob("archive.sqlite*")]
    assert archive_files and _in_clear(archive_files) == []
    [(key_id,)] = sqlite3.connect(config.retention.archive).execute("SELECT key_id FROM records")

    three_years = datetime.fromtimestamp(closed, UTC).replace(
        year=datetime.fromtimestamp(closed, UTC).year + 3
    )
    kept = purge(config, (three_years - SECOND).isoformat())
    assert kept["closed_tickets"] == 0
    assert [r["id"] for r in cli(config, "archive", "list", "--json")] == [ticket_id]
    destroyed = purge(config, (three_years + SECOND).isoformat())
    assert destroyed["closed_tickets"] == 1
    assert cli(config, "archive", "list", "--json") == []
    async with store_for(config) as store:
        assert store.keys.key(key_id) is None
        assert key_id in store.keys.destroyed()
    wal = config.retention.archive.with_name("archive.sqlite-wal")
    assert not wal.exists() or wal.stat().st_size == 0  # truncated


async def test_an_old_copy_of_the_archive_restored_brings_no_record_back(daemon: Running) -> None:
    config = daemon.config
    ticket_id = await one_ticket(daemon)
    cli(config, "requesters", "verify", EMAIL)
    cli(config, "close", str(ticket_id))
    closed = closed_at(config, ticket_id)
    assert purge(config, _at(closed, DAYS_30 + SECOND))["archived"] == 1
    backup = config.path.parent / "archive-backup.sqlite"
    shutil.copy(config.retention.archive, backup)
    assert purge(config, _at(closed, timedelta(days=4 * 366)))["closed_tickets"] == 1
    shutil.copy(backup, config.retention.archive)  # last month's copy, restored
    assert cli(config, "archive", "list", "--json") == []
    assert sqlite3.connect(config.retention.archive).execute(
        "SELECT count(*) FROM records"
    ).fetchone() == (0,)


async def test_a_ticket_closed_past_its_period_goes_without_the_archive(daemon: Running) -> None:
    config = daemon.config
    ticket_id = await one_ticket(daemon)
    cli(config, "requesters", "verify", EMAIL)
    cli(config, "close", str(ticket_id))
    counts = purge(config, _at(closed_at(config, ticket_id), timedelta(days=4 * 366)))
    assert (counts["closed_tickets"], counts["archived"], counts["files"]) == (1, 0, 1)
    assert cli(config, "tickets", "list", "--json") == []
    assert cli(config, "archive", "list", "--json") == []


async def test_a_dry_run_counts_and_changes_nothing(daemon: Running) -> None:
    config = daemon.config
    first = await one_ticket(daemon)
    await daemon.send(NO_FROM, sender="")
    second = await one_ticket_more(daemon, "verified.person@example.org")
    cli(config, "requesters", "verify", "verified.person@example.org")
    cli(config, "close", str(first))
    cli(config, "close", str(second))
    await daemon.settle()
    far = _at(closed_at(config, second), DAYS_30 + SECOND)
    before = table_counts(config)
    files = files_under(config.storage.attachments)

    due = purge(config, far, "--dry-run")
    assert removed(due) == {
        "raw_messages": 2,  # the two tickets' messages
        "quarantined": 1,
        "archived": 2,  # both closed 30 days ago
        "unverified_requesters": 1,  # Ximena, never verified
    }
    text = run_cli("--config", str(config.path), "purge", "--dry-run", env={"MAILGATE_NOW": far})
    assert text.returncode == 0 and "nothing was changed" in text.stdout
    assert table_counts(config) == before
    assert files_under(config.storage.attachments) == files
    assert not config.retention.archive.exists()

    done = purge(config, far)
    assert {**done, "files": 0} == due  # what the dry run counted is what went
    assert removed(purge(config, far, "--dry-run")) == {}


# -- the erasure hook, audit --------------------------------------------------------------


async def test_an_erased_persons_closed_tickets_go_to_the_archive_open_ones_do_not(
    daemon: Running,
) -> None:
    config = daemon.config
    closed_one = await one_ticket(daemon)
    open_one = await one_ticket_more(daemon, EMAIL)
    cli(config, "close", str(closed_one))
    async with store_for(config) as store, open_archive(config.retention.archive, store.keys) as a:
        deleted = await erase(
            store, EMAIL, config.storage.attachments, archive=archiver(store, a, config.retention)
        )
        assert deleted is not None and deleted.tickets == 2
        [record] = await a.list()
        assert record.ticket_id == closed_one and record.reason == "erasure"
        assert record.content is not None and record.content["subject"] == SUBJECT
        assert await a.get(open_one) is None
    assert cli(config, "tickets", "list", "--json") == []
    found = _in_clear([*config.retention.archive.parent.glob("archive.sqlite*")])
    assert found == []


async def test_audit_records_are_purged_after_5_years_and_archive_reads_are_audited(
    daemon: Running,
) -> None:
    """Purge runs and archive reads write audit records (subject: the keyed hash, never the
    address), and records older than `audit` go."""
    config = daemon.config
    ticket_id = await one_ticket(daemon)
    cli(config, "close", str(ticket_id))
    cli(config, "requesters", "verify", EMAIL)
    assert purge(config, _at(closed_at(config, ticket_id), DAYS_30 + SECOND))["audit"] == 0
    db = sqlite3.connect(config.storage.database)
    old = datetime(2020, 3, 10, 12, tzinfo=UTC).timestamp()
    db.execute(
        "INSERT INTO audit (at, action, via, subject, counts) VALUES (?, 'x', 'cli', NULL, '{}')",
        (old,),
    )
    db.commit()
    db.close()

    [listed] = cli(config, "archive", "list", "--json")
    cli(config, "archive", "show", str(ticket_id), "--json")
    assert removed(purge(config, "2025-03-10T11:59:59+00:00")) == {}
    assert removed(purge(config, "2025-03-10T12:00:01+00:00")) == {"audit": 1}
    records = rows(config, "SELECT action, via, subject, counts FROM audit ORDER BY id")
    assert [(action, via) for action, via, *_ in records] == [
        ("purge", "purge"),
        ("archive.list", "cli"),
        ("archive.show", "cli"),
        ("purge", "purge"),
        ("purge", "purge"),
    ]
    assert records[2][2] == listed["requester"]
    assert json.loads(records[2][3]) == {"messages": 1}
    assert EMAIL not in json.dumps(records)


# -- the scheduler ---------------------------------------------------------------------------


def test_the_daemon_purges_shortly_after_start_and_logs_counts_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mailgate serve` as systemd runs it, with the retention clock 60 days on: the first
    run archives the closed ticket, erases nothing verified, and logs counts, no address."""
    d = SubprocessDaemon(tmp_path / "daemon")
    write_config(d.folder, smtp_port=d.port, http_port=d.http_port, log_level="info")
    try:
        d.start()
        ticket_id = asyncio.run(_one_ticket_by_smtp(d))
        config = d.config
        cli(config, "requesters", "verify", EMAIL)
        cli(config, "close", str(ticket_id))
        d.kill(15)
        # The first run's purge (2 s after its start) may have logged already: the one to
        # wait for is the restarted daemon's.
        seen = len(_events(d))
        monkeypatch.setenv("MAILGATE_NOW", _at(time.time(), timedelta(days=60)))
        d.start()
        line = wait_for_event(d, "retention_purged", after=seen)
        monkeypatch.delenv("MAILGATE_NOW")
        assert cli(config, "tickets", "list", "--json") == []
        assert [r["id"] for r in cli(config, "archive", "list", "--json")] == [ticket_id]
        d.kill(15)
        assert d.proc is not None and d.proc.returncode == 0
    finally:
        d.kill()
    assert {k: line[k] for k in COUNTS} == {
        **dict.fromkeys(COUNTS, 0),
        "archived": 1,
        "raw_messages": 1,
        "files": 1,
    }
    assert line["level"] == "info"
    log = (d.folder / "daemon.log").read_text(encoding="utf-8").lower()
    assert "ximena" not in log and "retainova" not in log


def _events(d: SubprocessDaemon) -> list[dict[str, Any]]:
    return read_events(d.folder / "daemon.log")


async def _one_ticket_by_smtp(d: SubprocessDaemon) -> int:
    running = Running(d.config, "127.0.0.1", d.port, d.config.http.listen)
    await running.send(with_attachment(), sender=EMAIL)
    [ticket] = await running.tickets()
    return ticket.id


async def test_a_failed_run_is_logged_and_the_next_one_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A purge that fails (here: the archive's path is a folder) is logged, and the daemon
    and its scheduler go on; the next run (an interval shortened for the test) succeeds."""
    config = load_config(write_config(tmp_path))
    config.retention.archive.mkdir(parents=True)  # the archive cannot be opened
    async with daemon_running(config) as daemon:
        ticket_id = await one_ticket(daemon)
        cli(config, "requesters", "verify", EMAIL)
        cli(config, "close", str(ticket_id))
        monkeypatch.setenv("MAILGATE_NOW", _at(closed_at(config, ticket_id), DAYS_30 + SECOND))
        with structlog_capture() as logs:
            async with store_for(config) as store:
                scheduler = Scheduler(config, store, interval=0.05)
                task = asyncio.create_task(scheduler.run())
                deadline = time.monotonic() + 30
                while not any(e["event"] == "retention_failed" for e in logs):
                    assert time.monotonic() < deadline, "the purge did not run"
                    await asyncio.sleep(0.02)
                config.retention.archive.rmdir()  # ops fix it
                while not any(e["event"] == "retention_purged" for e in logs):
                    assert time.monotonic() < deadline, "the purge did not run again"
                    await asyncio.sleep(0.02)
                scheduler.stop()
                await asyncio.wait_for(task, 15)
        [failed, *_] = [e for e in logs if e["event"] == "retention_failed"]
        assert failed["error"].startswith("StoreUnavailable: unable to open database file")
        purged = next(e for e in logs if e["event"] == "retention_purged")
        assert purged["archived"] == 1
        await daemon.send(mail())  # the daemon went on all along
        assert len(await daemon.tickets()) == 1


async def test_an_erasure_cut_short_is_finished_by_the_next_purge(daemon: Running) -> None:
    """A crash (or a stop) after an erasure began: the next purge (the daemon's first run
    after a start) finishes it, the closed ticket archived by the hook first."""
    config = daemon.config
    closed_one = await one_ticket(daemon)
    cli(config, "close", str(closed_one))
    async with store_for(config) as store:
        assert await store.begin_erasure(EMAIL) is not None  # and then the process died
    now = _at(time.time())
    assert removed(purge(config, now, "--dry-run")) == {"erasures_resumed": 1}
    counts = purge(config, now)
    assert (counts["erasures_resumed"], counts["archived"]) == (1, 1)
    assert run_cli("--config", str(config.path), "requesters", "show", EMAIL).returncode == 1
    [record] = cli(config, "archive", "list", "--json")
    assert (record["id"], record["archived_because"]) == (closed_one, "erasure")
    assert purge(config, now)["erasures_resumed"] == 0
