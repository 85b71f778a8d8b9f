"""What lands in the journal: JSON lines, session context, and no personal data."""

from __future__ import annotations

import json
import signal
import smtplib
import subprocess
import sys
import timeit
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

import pytest

from mailgate.log import mask_address, mask_addresses
from mailgate.model import Address, HostPort
from tests.conftest import SUPPORT, SubprocessDaemon, write_config

SENDER = "Jane.Doe@example.org"
FOREIGN = "someone.else@elsewhere.example"
BODY_WORD = "xylophone-secret"


def read_events(log: Path) -> list[dict[str, Any]]:
    events = []
    for number, line in enumerate(log.read_text(encoding="utf-8").splitlines(), 1):
        try:
            event = json.loads(line)
        except ValueError:
            pytest.fail(f"line {number} is not JSON: {line!r}")
        assert isinstance(event, dict), line
        events.append(event)
    return events


def one(events: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [e for e in events if e.get("event") == name]
    assert len(found) == 1, (name, events)
    return found[0]


def test_daemon_log_is_json_with_context_and_no_personal_data(
    subprocess_daemon: SubprocessDaemon,
) -> None:
    d = subprocess_daemon
    write_config(d.folder, smtp_port=d.port, log_level="info")  # the fixture's is "warning"
    d.start()

    message = EmailMessage()
    message["From"] = f"Jane Doe <{SENDER}>"
    message["To"] = SUPPORT
    message["Subject"] = "Help with the xylophone"
    message["Date"] = formatdate()
    message["Message-ID"] = make_msgid(domain="client.example")
    message.set_content(f"The password is {BODY_WORD}.\n")

    with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as client:
        client.ehlo("client.example")
        assert client.mail(SENDER)[0] == 250
        code, _ = client.rcpt(FOREIGN)
        assert code == 550
        assert client.rcpt(SUPPORT)[0] == 250
        code, reply = client.data(message.as_bytes())
        assert code == 250, reply
    text = reply.decode()
    assert text.startswith("2.0.0 Queued as "), text
    queue_id = text.rsplit(" ", 1)[1]

    # Stop as systemd does.
    d.kill(signal.SIGTERM)
    assert d.proc is not None
    assert d.proc.returncode == 0

    log = d.folder / "daemon.log"
    raw = log.read_text(encoding="utf-8")
    events = read_events(log)
    assert events, "the daemon logged nothing at level info"

    lowered = raw.lower()
    assert SENDER.lower() not in lowered
    assert "jane.doe" not in lowered
    assert FOREIGN.lower() not in lowered
    assert "someone.else" not in lowered
    assert BODY_WORD not in lowered

    queued = one(events, "message_queued")
    assert queued["queue_id"] == queue_id
    assert queued["peer"].startswith("127.0.0.1:")
    assert isinstance(queued["session"], str) and queued["session"]

    rejected = one(events, "recipient_rejected")
    assert rejected["peer"] == queued["peer"]
    assert rejected["session"] == queued["session"]
    assert "someone.else" not in json.dumps(rejected)

    one(events, "daemon_started")
    one(events, "daemon_stopped")
    names = [e.get("event") for e in events]
    assert names.index("daemon_started") < names.index("message_queued")
    assert names.index("message_queued") < names.index("daemon_stopped")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Jane.Doe@example.org", "J***@example.org"),
        ("jane+tickets@example.org", "j***@example.org"),
        ("kunde@bücher.example", "k***@bücher.example"),
        ("user@xn--bcher-kva.example", "u***@xn--bcher-kva.example"),
        ("用户@例子.广告", "用***@例子.广告"),
        (
            "from a@example.org to Bob <bob.smith@example.net>",
            "from a***@example.org to Bob <b***@example.net>",
        ),
        ("a@example.org,b@example.net", "a***@example.org,b***@example.net"),
        ("no address here", "no address here"),
        ("root@localhost", "r***@localhost"),
        ('"jane doe"@example.org', "j***@example.org"),
        ("root@vm", "r***@vm"),
        ("printer@[192.0.2.10]", "p***@[192.0.2.10]"),
        ("ops@[IPv6:2001:db8::1]", "o***@[IPv6:2001:db8::1]"),
    ],
)
def test_mask_address(text: str, expected: str) -> None:
    assert mask_address(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("user@[192.0.2.1]", "u***@[192.0.2.1]"),
        ("peer said jane.doe@[IPv6:2001:db8::1] twice", "peer said j***@[IPv6:2001:db8::1] twice"),
        ('"john @ doe"@example.com', "j***@example.com"),
        ('From: "john @ doe"@example.com, x', "From: j***@example.com, x"),
        ('"jane@home"@example.org', "j***@example.org"),
        ('"jane \\" doe"@example.org', "j***@example.org"),
        ('<"john doe"@[192.0.2.1]>', "<j***@[192.0.2.1]>"),
    ],
)
def test_mask_address_literals_and_quoted_local_parts(text: str, expected: str) -> None:
    assert mask_address(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        '"unclosed@example.org',
        '"' * 5000 + "jane@example.org",
        '"\\' * 5000 + "jane@example.org",
        "[" * 5000 + "jane@example.org",
        "jane@[" + "1" * 5000,
        "\ud800jane@example.org\udfff",
        "\x00jane@example.org\x00",
        "@" * 5000 + "jane@example.org",
    ],
)
def test_mask_address_never_raises_and_still_masks(text: str) -> None:
    masked = mask_address(text)
    assert isinstance(masked, str)
    assert "jane" not in masked


def test_mask_address_takes_linear_time() -> None:
    """A long token without "@" was scanned again from each of its characters (40 KB took
    6 s); each character is now looked at a bounded number of times."""

    def best(text: str) -> float:
        return min(timeit.repeat(lambda: mask_address(text), number=1, repeat=5))

    for unit in ("a", '"\\', "a@"):
        small, large = unit * 20_000, unit * 80_000
        assert best(large) < 10 * best(small), unit  # quadratic would be 16 times


def test_masking_covers_nested_values() -> None:
    event = {"auth": {"spf": "pass (jane@example.org)"}, "to": ["bob@example.net"]}
    masked = mask_addresses(None, "info", event)
    assert masked == {"auth": {"spf": "pass (j***@example.org)"}, "to": ["b***@example.net"]}


def test_masking_never_raises_on_named_tuples() -> None:
    """A HostPort (a NamedTuple) in an event made the processor, and so the log call, raise."""
    event = {"relay": HostPort("relay.example", 25), "peer": ("jane@example.org", 25)}
    assert mask_addresses(None, "info", event) == {
        "relay": ("relay.example", 25),
        "peer": ("j***@example.org", 25),
    }


def test_masking_covers_keys_sets_and_objects() -> None:
    """Dict keys, sets and objects the renderer would print by repr (an exception, an
    Address) are masked too."""
    event = {
        "refused": {"jane@example.org": 550},
        "seen": {"bob@example.net"},
        "error": ValueError("no mailbox jane@example.org"),
        "who": Address("jane@example.org", "Jane"),
    }
    masked = mask_addresses(None, "info", event)
    assert masked["refused"] == {"j***@example.org": 550}
    assert masked["seen"] == ["b***@example.net"]
    assert "jane@" not in repr(masked) and "bob@" not in repr(masked)
    assert "j***@example.org" in masked["error"] and "j***@example.org" in masked["who"]


def test_masking_never_raises() -> None:
    class Hostile:
        def __repr__(self) -> str:
            raise RuntimeError("no repr for jane@example.org")

    looped: list[object] = ["jane@example.org"]
    looped.append(looped)
    event = {"hostile": Hostile(), "looped": looped, "deep": [[[[[[["x@y.example"]]]]]]]}
    masked = mask_addresses(None, "info", event)
    assert masked["hostile"] == "[unloggable]"
    assert masked["looped"][0] == "j***@example.org"
    assert "jane@" not in repr(masked)


_LOG_A_TRACEBACK = """\
import structlog
from mailgate.log import configure_logging
configure_logging("info", fmt="{fmt}")
try:
    raise LookupError("no requester jane.doe@example.org")
except LookupError:
    structlog.get_logger("t").exception("lookup_failed", extra={{"to": ("bob@example.net",)}})
"""


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_tracebacks_are_masked_in_either_format(fmt: str) -> None:
    """The traceback's text (exc_info) is rendered before masking, on a terminal too."""
    result = subprocess.run(
        [sys.executable, "-c", _LOG_A_TRACEBACK.format(fmt=fmt)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "LookupError" in result.stdout and "Traceback" in result.stdout, result.stdout
    assert "j***@example.org" in result.stdout and "b***@example.net" in result.stdout
    assert "jane.doe@" not in result.stdout and "bob@" not in result.stdout
