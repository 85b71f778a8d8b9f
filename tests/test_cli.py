"""The `mailgate` command line against a running daemon: what an agent or ops script reads."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from datetime import datetime
from typing import Any

from mailgate.cli import build_parser
from tests.conftest import REPO, Running, as_sent, cli_json, mail, run_cli

TICKET_KEYS = {"id", "subject", "status", "requester", "created_at", "message_count"}
ATTACHMENT = b"%PDF-1.4\n" + bytes(range(256)) * 4

NO_FROM = (
    b"To: support@example.com\r\n"
    b"Subject: Who sent this?\r\n"
    b"Date: Wed, 20 Mar 2024 04:04:04 +0000\r\n"
    b"Message-ID: <cli-no-from@client.example>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"This message has no From header.\r\n"
    b".A line that starts with a dot survives dot-stuffing.\r\n"
    b"..And so does one with two.\r\n"
    b"\r\n"
    b"Bye\r\n"
)


def assert_timestamp(value: Any) -> None:
    assert isinstance(value, str)
    moment = datetime.fromisoformat(value)
    assert moment.tzinfo is not None and moment.utcoffset() is not None, value


def assert_address(value: Any, email: str, name: str | None) -> None:
    assert isinstance(value, dict)
    assert set(value) >= {"name", "email"}
    assert value["email"] == email
    assert value["name"] == name


def assert_ticket_shape(item: Any) -> None:
    assert isinstance(item, dict)
    assert set(item) >= TICKET_KEYS, item
    assert isinstance(item["id"], int) and not isinstance(item["id"], bool)
    assert isinstance(item["subject"], str)
    assert item["status"] in ("open", "closed")
    assert isinstance(item["requester"]["email"], str)
    assert item["requester"]["name"] is None or isinstance(item["requester"]["name"], str)
    assert_timestamp(item["created_at"])
    assert isinstance(item["message_count"], int)


def assert_one_line_error(result: subprocess.CompletedProcess[str], exit_status: int = 1) -> None:
    assert result.returncode == exit_status, (result.returncode, result.stdout, result.stderr)
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def raw_cli(running: Running, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI and keep stdout as bytes (text mode would turn CRLF into LF)."""
    return subprocess.run(
        [sys.executable, "-m", "mailgate", "--config", str(running.config.path), *args],
        capture_output=True,
        timeout=60,
        check=False,
    )


async def test_tickets_list_json(daemon: Running) -> None:
    await daemon.send(mail(sender="Ann Example <ann@example.org>", subject="Printer on fire"))
    await daemon.send(mail(sender="bob@example.net", subject="Refund please"))
    await daemon.settle()
    tickets = cli_json(daemon, "tickets", "list")
    assert isinstance(tickets, list)
    assert len(tickets) == 2
    for item in tickets:
        assert_ticket_shape(item)
    by_subject = {t["subject"]: t for t in tickets}
    assert set(by_subject) == {"Printer on fire", "Refund please"}
    assert_address(by_subject["Printer on fire"]["requester"], "ann@example.org", "Ann Example")
    assert_address(by_subject["Refund please"]["requester"], "bob@example.net", None)
    assert all(t["status"] == "open" and t["message_count"] == 1 for t in tickets)
    assert len({t["id"] for t in tickets}) == 2


async def test_tickets_list_json_is_empty_array_without_tickets(daemon: Running) -> None:
    assert cli_json(daemon, "tickets", "list") == []


async def test_status_filter_and_close(daemon: Running) -> None:
    await daemon.send(mail(sender="ann@example.org", subject="Keep me open"))
    await daemon.send(mail(sender="bob@example.net", subject="Close me"))
    await daemon.settle()
    ids = {t["subject"]: t["id"] for t in cli_json(daemon, "tickets", "list")}

    closed = daemon.cli("close", str(ids["Close me"]))
    assert closed.returncode == 0, closed.stderr
    assert str(ids["Close me"]) in closed.stdout

    open_ = cli_json(daemon, "tickets", "list", "--status", "open")
    assert [(t["id"], t["status"]) for t in open_] == [(ids["Keep me open"], "open")]
    closed_ = cli_json(daemon, "tickets", "list", "--status", "closed")
    assert [(t["id"], t["status"]) for t in closed_] == [(ids["Close me"], "closed")]
    assert len(cli_json(daemon, "tickets", "list")) == 2


async def test_tickets_show_json_with_attachment(daemon: Running) -> None:
    message = mail(
        sender="Ann Example <ann@example.org>",
        subject="Invoice attached",
        body="Please see the attached invoice.\n",
        message_id="<invoice@client.example>",
    )
    message.add_attachment(
        ATTACHMENT, maintype="application", subtype="pdf", filename="invoice.pdf"
    )
    await daemon.send(message)
    await daemon.settle()
    [listed] = cli_json(daemon, "tickets", "list")

    ticket = cli_json(daemon, "tickets", "show", str(listed["id"]))
    assert_ticket_shape(ticket)
    assert ticket["id"] == listed["id"]
    assert ticket["subject"] == "Invoice attached"
    assert_address(ticket["requester"], "ann@example.org", "Ann Example")
    [msg] = ticket["messages"]
    assert set(msg) >= {
        "from",
        "body_text",
        "received_at",
        "message_id",
        "thread_reason",
        "attachments",
    }
    assert_address(msg["from"], "ann@example.org", "Ann Example")
    assert "Please see the attached invoice." in msg["body_text"]
    assert_timestamp(msg["received_at"])
    assert msg["message_id"] in ("<invoice@client.example>", "invoice@client.example")
    assert msg["thread_reason"] == "new"
    [attachment] = msg["attachments"]
    assert attachment["filename"] == "invoice.pdf"
    assert attachment["content_type"] == "application/pdf"
    assert attachment["size"] == len(ATTACHMENT)


async def test_human_readable_list_and_show(daemon: Running) -> None:
    await daemon.send(mail(sender="Ann Example <ann@example.org>", subject="Printer on fire"))
    await daemon.settle()
    [ticket] = cli_json(daemon, "tickets", "list")

    listing = daemon.cli("tickets", "list")
    assert listing.returncode == 0, listing.stderr
    assert "Printer on fire" in listing.stdout
    assert "ann@example.org" in listing.stdout
    assert not listing.stdout.lstrip().startswith(("[", "{")), "plain output must not be JSON"

    shown = daemon.cli("tickets", "show", str(ticket["id"]))
    assert shown.returncode == 0, shown.stderr
    assert "Printer on fire" in shown.stdout
    assert "ann@example.org" in shown.stdout
    assert "Hello, my printer is on fire." in shown.stdout
    assert not shown.stdout.lstrip().startswith("{")


async def test_unknown_ticket_is_exit_1(daemon: Running) -> None:
    shown = daemon.cli("tickets", "show", "999")
    assert_one_line_error(shown)
    assert "999" in shown.stderr
    assert shown.stdout == ""
    shown_json = daemon.cli("tickets", "show", "999", "--json")
    assert_one_line_error(shown_json)
    closed = daemon.cli("close", "999")
    assert_one_line_error(closed)
    assert "999" in closed.stderr
    assert closed.stdout == ""


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    declared = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert result.stdout == f"mailgate {declared['project']['version']}\n"


async def test_message_without_from_or_envelope_sender_is_quarantined(daemon: Running) -> None:
    """No From and a null sender name nobody: quarantine (with an envelope sender it is a
    ticket, test_senders)."""
    queue_id = await daemon.send(NO_FROM, sender="")
    await daemon.settle()
    assert cli_json(daemon, "tickets", "list") == []

    [row] = cli_json(daemon, "quarantine", "list")
    assert row["id"] == queue_id
    assert isinstance(row["reason"], str) and row["reason"]
    assert "From" in row["reason"]

    listing = daemon.cli("quarantine", "list")
    assert listing.returncode == 0, listing.stderr
    assert queue_id in listing.stdout

    shown = daemon.cli("quarantine", "show", queue_id)
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    assert detail["id"] == queue_id
    assert detail["reason"] == row["reason"]
    assert detail["subject"] == "Who sent this?"
    raw = raw_cli(daemon, "quarantine", "show", queue_id, "--raw").stdout
    assert detail["size"] == len(raw) and as_sent(raw) == NO_FROM


async def test_quarantine_show_raw_is_byte_exact(daemon: Running) -> None:
    queue_id = await daemon.send(NO_FROM, sender="")
    await daemon.settle()
    result = raw_cli(daemon, "quarantine", "show", queue_id, "--raw")
    assert result.returncode == 0, result.stderr
    assert as_sent(result.stdout) == NO_FROM  # after our Received field


async def test_replay_of_still_broken_message_stays_quarantined(daemon: Running) -> None:
    queue_id = await daemon.send(NO_FROM, sender="")
    await daemon.settle()
    [before] = cli_json(daemon, "quarantine", "list")

    replay = daemon.cli("quarantine", "replay", queue_id)
    assert replay.returncode == 1, (replay.stdout, replay.stderr)
    assert queue_id in replay.stdout + replay.stderr

    await daemon.settle()
    [after] = cli_json(daemon, "quarantine", "list")
    assert after["id"] == queue_id
    assert after["reason"] == before["reason"]
    assert cli_json(daemon, "tickets", "list") == []
    assert as_sent(raw_cli(daemon, "quarantine", "show", queue_id, "--raw").stdout) == NO_FROM


async def test_replay_and_show_of_unknown_or_ingested_id_is_exit_1(daemon: Running) -> None:
    ingested = await daemon.send(mail())
    await daemon.settle()
    assert len(cli_json(daemon, "tickets", "list")) == 1

    for queue_id in ("NOSUCHQUEUEID", ingested):
        replay = daemon.cli("quarantine", "replay", queue_id)
        assert_one_line_error(replay)
        assert queue_id in replay.stderr
        shown = daemon.cli("quarantine", "show", queue_id)
        assert_one_line_error(shown)
        assert shown.stdout == ""

    # The ingested message was left alone: still one ticket with one message.
    [ticket] = cli_json(daemon, "tickets", "list")
    assert ticket["message_count"] == 1
    assert cli_json(daemon, "quarantine", "list") == []


# -- global options, help, reopen (issue 11) --


def _leaves(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every runnable command as (its words, its parser), by walking the subparsers."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _leaves(sub, (*path, name))
    return found or [(path, parser)]


def _words(path: tuple[str, ...], parser: argparse.ArgumentParser) -> list[str]:
    """The command's words and a value for each of its positional arguments."""
    required = [a for a in parser._actions if not a.option_strings and a.required]
    args = [*path, *("1" for _ in required)]
    if path == ("reply",):
        args += ["--body-file", "-"]
    return args


LEAVES = _leaves(build_parser())


def test_every_command_takes_config_after_it_and_the_later_one_wins() -> None:
    parser = build_parser()
    for path, sub in LEAVES:
        words = _words(path, sub)
        assert parser.parse_args([*words, "--config", "after"]).config == "after", path
        assert parser.parse_args(["--config", "before", *words]).config == "before", path
        both = parser.parse_args(["--config", "before", *words, "--config", "after"])
        assert both.config == "after", path


def test_every_command_with_json_output_takes_json_before_or_after_it() -> None:
    parser = build_parser()
    with_json = [(p, s) for p, s in LEAVES if s.get_default("prints_json")]
    assert {" ".join(p) for p, _ in with_json} >= {"status", "tickets list", "stats"}
    for path, sub in with_json:
        words = _words(path, sub)
        assert parser.parse_args([*words, "--json"]).json is True, path
        assert parser.parse_args(["--json", *words]).json is True, path
        assert parser.parse_args(words).json is False, path


async def test_global_options_in_either_place_reach_the_same_store(daemon: Running) -> None:
    await daemon.send(mail())
    await daemon.settle()
    path = str(daemon.config.path)
    forms = [
        ("--config", path, "--json", "tickets", "list"),
        ("tickets", "list", "--config", path, "--json"),
        ("--json", "tickets", "list", "--config", path),
        ("--config", "/nonexistent.toml", "tickets", "list", "--json", "--config", path),
    ]
    for form in forms:
        result = run_cli(*form)
        assert result.returncode == 0, (form, result.stderr)
        assert [t["id"] for t in json.loads(result.stdout)] == [1], form
    by_env = run_cli("tickets", "list", "--json", env={"MAILGATE_CONFIG": path})
    assert [t["id"] for t in json.loads(by_env.stdout)] == [1], by_env.stderr
    no_json = run_cli("--json", "close", "1", "--config", path)
    assert no_json.returncode == 2 and "--json" in no_json.stderr
    assert daemon.cli("tickets", "show", "1", "--json").returncode == 0


def test_help_is_written_for_operators() -> None:
    """`mailgate --help` opens with what mailgate does; every command and argument says what
    it is (and its metavar shows what to write)."""
    result = run_cli("--help")
    assert result.returncode == 0
    description = result.stdout.split("\n\n")[1]
    assert description.startswith("mailgate turns mail to your support address into tickets")
    assert "argparse" not in result.stdout and "sys.exit" not in result.stdout
    assert "MAILGATE_CONFIG" in result.stdout and "78" in result.stdout

    def check(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        assert parser.description, path
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {c.dest: c.help for c in action._choices_actions}
                for name, sub in action.choices.items():
                    assert helped.get(name), (*path, name)
                    check(sub, (*path, name))
            elif not isinstance(action, argparse._HelpAction | argparse._VersionAction):
                assert action.help, (path, action.dest)
                if not action.option_strings:
                    assert action.metavar and str(action.metavar).isupper(), (path, action.dest)

    check(build_parser(), ())
    shown = run_cli("status", "--help")
    assert shown.returncode == 0 and "--json" in shown.stdout and "--config" in shown.stdout
    assert "read-only, safe while the daemon runs" in " ".join(shown.stdout.split())


async def test_reopen_opens_a_closed_ticket_and_stats_count_it(daemon: Running) -> None:
    await daemon.send(mail())
    await daemon.settle()
    assert daemon.cli("close", "1").returncode == 0
    reopened = daemon.cli("reopen", "1")
    assert (reopened.returncode, reopened.stdout) == (0, "ticket 1 reopened\n"), reopened.stderr
    assert cli_json(daemon, "tickets", "show", "1")["status"] == "open"
    again = daemon.cli("reopen", "1")
    assert (again.returncode, again.stdout) == (0, "ticket 1 is open already\n")
    stats = cli_json(daemon, "stats")
    assert stats["reopen"]["reopened"] == 1, stats["reopen"]
    unknown = daemon.cli("reopen", "999")
    assert_one_line_error(unknown)
    assert "no ticket 999" in unknown.stderr and unknown.stdout == ""
