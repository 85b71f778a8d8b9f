"""`mailgate status` beside a running daemon: the queues, what was quarantined, what failed."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from mailgate.config import Config
from tests.conftest import Relay, daemon_running, mail
from tests.test_cli import NO_FROM


def status(running: Any, *extra: str) -> Any:
    result = running.cli("status", *extra)
    assert result.returncode == 0, result.stderr
    return result


async def test_status_shows_queues_quarantine_and_masked_delivery_errors(
    relay: Relay, relay_config: Config
) -> None:
    """1. A message with no usable sender is quarantined; a customer's mail is refused by
    the relay with a reply that quotes the address. 2. `status --json` (read while the
    daemon runs) counts both queues, names the quarantine reason and the failed rows with
    the address masked; the text form shows the same."""
    relay.refuse["ann@example.org"] = "550 5.1.1 <ann@example.org>: Recipient address rejected"
    async with daemon_running(relay_config) as running:
        quarantined = await running.send(NO_FROM, sender="")
        await running.send(mail(sender="Ann <ann@example.org>"))
        deadline = time.monotonic() + 30
        while True:
            shown = json.loads(status(running, "--json").stdout)
            if len(shown["delivery_errors"]) == 2 and shown["inbound"]["pending"] == 0:
                break
            assert time.monotonic() < deadline, shown
            await asyncio.sleep(0.1)
        text = status(running).stdout

    assert shown["inbound"] == {
        "by_state": {"received": 0, "ingested": 1, "quarantined": 1},
        "pending": 0,
        "oldest_pending": None,
    }
    assert shown["outbox"]["by_state"] == {"queued": 0, "sending": 0, "sent": 0, "failed": 2}
    [row] = shown["quarantined"]
    assert row["id"] == quarantined and "From" in row["reason"]
    assert {e["kind"] for e in shown["delivery_errors"]} == {"verification", "ticket_created"}
    for error in shown["delivery_errors"]:
        assert (error["state"], error["attempts"], error["ticket_id"]) == ("failed", 1, 1)
        assert "a***@example.org" in error["last_error"]
    assert "ann@" not in json.dumps(shown) and "ann@" not in text
    assert quarantined in text and row["reason"] in text
    assert "Latest delivery errors (2):" in text
    assert "inbound  0" in text and "failed=2" in text


async def test_status_of_an_idle_daemon_names_no_errors(config: Config) -> None:
    async with daemon_running(config) as running:
        shown = json.loads(status(running, "--json").stdout)
    assert shown["quarantined"] == [] and shown["delivery_errors"] == []
    assert shown["outbox"]["pending"] == 0 and shown["outbox"]["oldest_pending"] is None
