"""Outbox delivery as an operator sees it: retries, give-ups, crashes, the file transport.

A real mailgate (in this event loop or as its own process), a real relay on loopback, and
the real `mailgate outbox` / `mailgate reply` command lines. Every command line runs in a
thread, so the relay and the in-process daemon keep answering while it runs.
"""

from __future__ import annotations

import asyncio
import email.policy
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from email.message import EmailMessage
from email.parser import BytesHeaderParser, BytesParser
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP

from mailgate.config import Config, load_config, parse_config
from mailgate.msgid import message_ids as load_msgids
from mailgate.service import stop_budget
from mailgate.store import store_for
from mailgate.tickets import Tickets
from tests.conftest import (
    REPO,
    SUPPORT,
    Relay,
    SubprocessDaemon,
    daemon_running,
    mail,
    run_cli,
    tmpfs,
    write_config,
)

Row = dict[str, Any]

CUSTOMER = "ann@example.org"
REPLY_STDIN = ("reply", "1", "--body-file", "-")
SETTLE_SECONDS = 2.5  # several retry periods: retry_initial 0.3 s, retry_max 1 s


class HoldingRelay(Relay):
    """The recording relay, which also notes when each DATA came (by Message-ID) and can
    hold DATA unanswered until `release()`, like a relay that hangs mid-transaction."""

    def __init__(self) -> None:
        super().__init__()
        self.data_at: list[tuple[float, str]] = []
        self.held = 0
        self._released = asyncio.Event()
        self._released.set()

    def hold(self) -> None:
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        headers = BytesHeaderParser(policy=email.policy.default).parsebytes(
            envelope.original_content
        )
        self.data_at.append((time.monotonic(), str(headers["Message-ID"]).strip("<>")))
        if not self._released.is_set():
            self.held += 1
            try:  # aiosmtpd cancels this when the client's connection goes away
                await self._released.wait()
            finally:
                self.held -= 1
        return await super().handle_DATA(server, session, envelope)

    def gaps(self, message_id: str) -> list[float]:
        """Seconds between consecutive DATA commands for one mail."""
        times = [at for at, mid in self.data_at if mid == message_id]
        return [b - a for a, b in itertools.pairwise(times)]


@pytest.fixture
async def holding_relay() -> AsyncIterator[HoldingRelay]:
    server = HoldingRelay()
    await server.start()
    yield server
    server.release()
    await server.stop()


@pytest.fixture
def relay_daemon(tmp_path: Path, holding_relay: HoldingRelay) -> Iterator[SubprocessDaemon]:
    """`mailgate serve` as its own process, delivering to `holding_relay`."""
    daemon = SubprocessDaemon(tmp_path / "daemon", relay_port=holding_relay.port)
    yield daemon
    daemon.kill()


# -- helpers --


async def cli(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real command line, in a thread."""
    return await asyncio.to_thread(run_cli, "--config", str(config_path), *args)


async def outbox(config_path: Path, state: str | None = None) -> list[Row]:
    """`mailgate outbox list --json`, optionally `--state`."""
    args = ["outbox", "list", "--json", *(["--state", state] if state else [])]
    result = await cli(config_path, *args)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    return rows


async def wait_outbox(
    config_path: Path, done: Callable[[list[Row]], bool], *, within: float = 15
) -> list[Row]:
    """Poll `outbox list` until `done(rows)` holds (with at least one row); return the rows."""
    deadline = time.monotonic() + within
    while True:
        rows = await outbox(config_path)
        if rows and done(rows):
            return rows
        assert time.monotonic() < deadline, f"outbox never got there: {rows}"
        await asyncio.sleep(0.1)


def all_in(state: str, count: int | None = None) -> Callable[[list[Row]], bool]:
    """Every row is in `state` (and there are `count` rows, if given)."""
    return lambda rows: (
        (count is None or len(rows) == count) and all(r["state"] == state for r in rows)
    )


def message_ids(relay: Relay) -> list[str]:
    """The Message-IDs the relay accepted, in order, without <>."""
    return [str(r.message["Message-ID"]).strip("<>") for r in relay.received]


async def send_to_port(port: int, message: EmailMessage) -> None:
    errors, reply = await aiosmtplib.send(
        message, sender=CUSTOMER, recipients=[SUPPORT], hostname="127.0.0.1", port=port
    )
    assert not errors, errors
    assert reply.startswith("2.0.0 Queued as "), reply


def smtp_config(tmp_path: Path, relay: Relay, outbound_extra: str = "") -> Config:
    return load_config(write_config(tmp_path, relay_port=relay.port, outbound_extra=outbound_extra))


# -- relay trouble --


async def test_relay_down_keeps_mail_queued_then_delivers_each_once(
    holding_relay: HoldingRelay, tmp_path: Path
) -> None:
    """With the relay off the air, mail stays queued with its attempts and the reason; once
    the relay is back each mail arrives exactly once, and nothing follows later."""
    relay = holding_relay
    await relay.stop()
    config = smtp_config(tmp_path, relay)
    async with daemon_running(config) as running:
        await running.send(mail(sender=f"Ann <{CUSTOMER}>"))
        rows = await wait_outbox(
            config.path,
            lambda rows: (
                len(rows) == 2 and all(r["state"] == "queued" and r["attempts"] >= 2 for r in rows)
            ),
        )
        for row in rows:
            assert row["last_error"].startswith("relay unreachable"), row
            assert str(relay.port) in row["last_error"], row
            assert row["sent_at"] is None
        assert relay.attempts == 0

        await relay.start()
        await relay.wait_for(2)
        await asyncio.sleep(SETTLE_SECONDS)
        rows = await wait_outbox(config.path, all_in("sent"))
    assert sorted(message_ids(relay)) == sorted(r["message_id"] for r in rows)
    assert len(set(message_ids(relay))) == 2
    assert relay.attempts == 2
    assert all(r["last_error"] is None and r["sent_at"] for r in rows), rows


async def test_permanent_refusal_fails_at_once_without_retries(
    relay: Relay, relay_config: Config
) -> None:
    """A 5xx answer fails the mail after one attempt, with the relay's words, and the relay
    hears nothing more about it."""
    relay.reply = "550 5.1.1 No such user"
    async with daemon_running(relay_config) as running:
        await running.send(mail(sender=CUSTOMER))
        rows = await wait_outbox(relay_config.path, all_in("failed"))
        assert len(rows) == 2
        await asyncio.sleep(SETTLE_SECONDS)
        assert relay.attempts == 2
        rows = await outbox(relay_config.path, "failed")
    assert [r["attempts"] for r in rows] == [1, 1]
    for row in rows:
        assert "550" in row["last_error"] and "No such user" in row["last_error"], row
    assert relay.received == []


async def test_temporary_refusal_backs_off_then_gives_up(
    holding_relay: HoldingRelay, tmp_path: Path
) -> None:
    """A 4xx answer is retried with growing gaps (retry_initial doubling to retry_max), and
    after max_lifetime the mail fails with "gave up after N attempts" and is left alone.

    Only what the schedule promises is asserted: no retry sooner than its delay, the gaps
    growing to retry_max, as many attempts as fit in max_lifetime, none after; how much
    later than due an attempt comes depends on the machine, and is not asserted.
    """
    relay = holding_relay
    relay.reply = "451 4.3.0 Try later"
    config = smtp_config(tmp_path, relay, outbound_extra="max_lifetime = 4\n")
    async with daemon_running(config) as running:
        await running.send(mail(sender=CUSTOMER))
        rows = await wait_outbox(config.path, all_in("failed"), within=60)
        count = relay.attempts
        await asyncio.sleep(SETTLE_SECONDS)
        assert relay.attempts == count, "a failed mail was tried again"

    for row in rows:
        match = re.fullmatch(r"gave up after (\d+) attempts: (.*)", row["last_error"])
        assert match, row
        # Due at about 0, 0.3, 0.9, 1.9, 2.9, 3.9 and 4 s (the last brought to the lifetime's
        # end): at most 7 attempts; a slow machine makes fewer, never fewer than 2.
        assert 2 <= int(match.group(1)) == row["attempts"] <= 8, row
        assert "451" in match.group(2) and "Try later" in match.group(2), row
        gaps = relay.gaps(row["message_id"])
        assert len(gaps) == row["attempts"] - 1, (gaps, row)
        # Never sooner than the schedule says (a last retry may be brought forward to the
        # lifetime's end): retry_initial (0.3 s), then doubling, capped at retry_max (1 s).
        for n, gap in enumerate(gaps[:-1]):
            assert gap >= min(0.3 * 2**n, 1.0) - 0.05, gaps
    # That it is not given up before max_lifetime: the next test.


async def test_temporary_refusal_is_not_given_up_before_max_lifetime(
    holding_relay: HoldingRelay, tmp_path: Path
) -> None:
    """A deferred mail is retried until it is max_lifetime old: 'failed' for age only
    once that much time has passed since it was queued."""
    relay = holding_relay
    relay.reply = "451 4.3.0 Try later"
    path = write_config(tmp_path, relay_port=relay.port, outbound_extra="max_lifetime = 4\n")
    path.write_text(path.read_text().replace("retry_max = 1\n", "retry_max = 10\n"))
    config = load_config(path)
    assert (config.outbound.retry_max, config.outbound.max_lifetime) == (10, 4)
    failed: list[tuple[float, Row]] = []
    async with daemon_running(config) as running:
        await running.send(mail(sender=CUSTOMER))
        deadline = time.monotonic() + 15
        while len(failed) < 2:
            assert time.monotonic() < deadline, "never gave up"
            for row in await outbox(config.path, "failed"):
                if row["id"] not in [r["id"] for _, r in failed]:
                    created = datetime.fromisoformat(row["created_at"])
                    failed.append(((datetime.now(UTC) - created).total_seconds(), row))
            await asyncio.sleep(0.05)
    for age, row in failed:
        assert row["last_error"].startswith("gave up after"), row
        # Attempts at about 0, 0.3, 0.9 and 2.1 s; the next would be due at 4.5 s.
        assert age >= 4, f"given up {age:.1f} s after it was queued: {row['last_error']}"


async def test_outbox_retry_resends_a_failed_mail_and_refuses_unknown_ids(
    relay: Relay, relay_config: Config
) -> None:
    """`outbox retry ID` makes a failed mail due again (delivered once the relay is fixed);
    other rows stay as they were; an unknown or already sent row is exit 1."""
    relay.reply = "550 5.7.1 Relaying denied"
    path = relay_config.path
    async with daemon_running(relay_config) as running:
        await running.send(mail(sender=CUSTOMER))
        _first, second = await wait_outbox(path, all_in("failed", 2))
        relay.reply = None

        result = await cli(path, "outbox", "retry", str(second["id"]))
        assert result.returncode == 0, result.stderr
        assert f"outbox {second['id']}: due now" in result.stdout
        [received] = await relay.wait_for(1)
        assert message_ids(relay) == [second["message_id"]]
        rows = await wait_outbox(path, lambda rows: rows[1]["state"] == "sent")
        assert rows[1]["attempts"] == 2 and rows[1]["last_error"] is None, rows
        assert rows[0]["state"] == "failed" and rows[0]["attempts"] == 1, rows
        assert received.rcpt_tos == [CUSTOMER]

        for unknown in (str(second["id"]), "9999"):  # sent, and never existed
            result = await cli(path, "outbox", "retry", unknown)
            assert result.returncode == 1, result
            assert f"no queued or failed outbox row {unknown}" in result.stderr
        await asyncio.sleep(SETTLE_SECONDS)
    assert len(relay.received) == 1


# -- crashes and clean stops --


async def test_kill_9_mid_delivery_sends_again_after_restart_and_never_after_clean_stop(
    holding_relay: HoldingRelay, relay_daemon: SubprocessDaemon
) -> None:
    """Mail a SIGKILL caught 'sending' is sent on the next start (its second attempt);
    a SIGTERM later and a start after it send nothing twice."""
    relay, daemon = holding_relay, relay_daemon
    relay.hold()
    await asyncio.to_thread(daemon.start)
    await send_to_port(daemon.port, mail(sender=CUSTOMER))
    deadline = time.monotonic() + 10
    while relay.held < 2:  # verification and acknowledgement, both mid-DATA
        assert time.monotonic() < deadline, f"relay holds {relay.held} of 2"
        await asyncio.sleep(0.02)
    sending = await outbox(daemon.config_path, "sending")
    assert [r["attempts"] for r in sending] == [1, 1], sending

    await asyncio.to_thread(daemon.kill, signal.SIGKILL)
    await asyncio.sleep(0.2)
    assert relay.held == 0  # the relay saw the connections drop: it took nothing
    relay.release()
    assert relay.received == []
    assert [r["state"] for r in await outbox(daemon.config_path)] == ["sending", "sending"]

    await asyncio.to_thread(daemon.start)
    await relay.wait_for(2)
    rows = await wait_outbox(daemon.config_path, all_in("sent", 2))
    assert [r["attempts"] for r in rows] == [2, 2], rows
    assert sorted(message_ids(relay)) == sorted(r["message_id"] for r in rows)

    await asyncio.to_thread(daemon.kill, signal.SIGTERM)
    assert daemon.proc is not None and daemon.proc.returncode == 0
    attempts = relay.attempts
    await asyncio.to_thread(daemon.start)
    await asyncio.sleep(2)
    assert len(relay.received) == 2
    assert relay.attempts == attempts
    assert [r["state"] for r in await outbox(daemon.config_path)] == ["sent", "sent"]


async def test_sigterm_waits_for_deliveries_under_way(
    holding_relay: HoldingRelay, relay_daemon: SubprocessDaemon
) -> None:
    """A clean stop finishes the delivery it started: the relay's late 250 marks the mail
    sent, and the next start does not send it again."""
    relay, daemon = holding_relay, relay_daemon
    relay.hold()
    await asyncio.to_thread(daemon.start)
    await send_to_port(daemon.port, mail(sender=CUSTOMER))
    deadline = time.monotonic() + 10
    while relay.held < 2:
        assert time.monotonic() < deadline, f"relay holds {relay.held} of 2"
        await asyncio.sleep(0.02)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.7)
    assert daemon.proc.poll() is None, "the daemon quit with deliveries under way"
    relay.release()
    assert await asyncio.to_thread(daemon.proc.wait, 20) == 0
    daemon.kill()  # closes its log file
    assert len(relay.received) == 2
    rows = await outbox(daemon.config_path)
    assert [(r["state"], r["attempts"]) for r in rows] == [("sent", 1), ("sent", 1)], rows

    await asyncio.to_thread(daemon.start)
    await asyncio.sleep(2)
    assert len(relay.received) == 2
    assert relay.attempts == 2


class SlowSMTP(SMTP):
    """aiosmtpd's server, answering RCPT and DATA (the 354) as late as its relay says."""

    def __init__(self, relay: SlowRelay) -> None:
        super().__init__(relay, hostname="relay.test")
        self.relay = relay

    async def smtp_RCPT(self, arg: str | None) -> None:
        self.relay.rcpts += 1
        await asyncio.sleep(self.relay.rcpt_delay)
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        self.relay.data_commands += 1
        await asyncio.sleep(self.relay.data_delay)
        await super().smtp_DATA(arg)


class SlowRelay(Relay):
    """A relay on loopback that is slow where a test says: to answer RCPT, to answer DATA
    with 354, to answer the final dot. `dots` counts the mails it got to the final dot (each
    one it may deliver), `answered` the 250s it sent for them. aiosmtpd cancels a slow answer
    when the client's connection goes away."""

    def __init__(self, *, rcpt: float = 0, data: float = 0, dot: float = 0) -> None:
        super().__init__()
        self.rcpt_delay, self.data_delay, self.dot_delay = rcpt, data, dot
        self.rcpts = self.data_commands = self.dots = self.answered = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.dots += 1
        await asyncio.sleep(self.dot_delay)
        reply = await super().handle_DATA(server, session, envelope)
        self.answered += 1
        return reply

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: SlowSMTP(self), "127.0.0.1", self.port)

    def fast(self) -> None:
        self.rcpt_delay = self.data_delay = self.dot_delay = 0


@asynccontextmanager
async def slow_relay(**delays: float) -> AsyncIterator[SlowRelay]:
    relay = SlowRelay(**delays)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop()


async def until(condition: Callable[[], bool], what: str, *, within: float = 15) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def exits(daemon: SubprocessDaemon) -> None:
    """Wait for the SIGTERMed daemon to exit, with status 0."""
    assert daemon.proc is not None
    assert await asyncio.to_thread(daemon.proc.wait, 120) == 0
    daemon.kill()  # closes its log file


async def restart(daemon: SubprocessDaemon) -> list[Row]:
    """Start the daemon again, let its outbound worker look at the outbox (several polls),
    stop it again; return the outbox."""
    await asyncio.to_thread(daemon.start)
    await asyncio.sleep(SETTLE_SECONDS)
    await asyncio.to_thread(daemon.kill, signal.SIGTERM)
    return await outbox(daemon.config_path)


ONE_MAIL = "acknowledge = false\n"  # the verification mail only


async def test_sigterm_waits_for_a_relay_that_answers_the_final_dot_late(
    tmp_path: Path,
) -> None:
    """The relay takes 6 s to answer the final dot, within `outbound.timeout = 8` and past the
    SMTP drain (5 s here): the stop waits for the answer, the mail is marked sent, the relay
    has it once, and the restart does not send it again. (That the wait is the relay's
    timeout, not a fixed budget, the next-but-one test shows from the other side: at 8 s a
    delivery is cut, where the old fixed 30 s would have waited.)"""
    async with slow_relay(dot=6) as relay:
        daemon = SubprocessDaemon(
            tmp_path / "daemon", relay_port=relay.port, outbound_timeout=8, outbound_extra=ONE_MAIL
        )
        try:
            await asyncio.to_thread(daemon.start)
            await send_to_port(daemon.port, mail(sender=CUSTOMER))
            await until(lambda: relay.dots == 1, "the mail never reached the final dot")
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGTERM)
            while not relay.answered:  # the daemon is still there to hear the answer
                assert daemon.proc.poll() is None, "the stop did not wait for the relay"
                await asyncio.sleep(0.2)
            await exits(daemon)
            relay.fast()
            rows = await restart(daemon)
        finally:
            daemon.kill()
        assert [(r["state"], r["attempts"]) for r in rows] == [("sent", 1)], rows
        assert relay.dots == 1 and len(relay.received) == 1
        assert message_ids(relay) == [rows[0]["message_id"]]


async def test_sigterm_cuts_a_delivery_before_data_and_the_restart_sends_it_once(
    tmp_path: Path,
) -> None:
    """A relay that sits on RCPT holds no mail: the stop cuts that delivery at once instead of
    waiting for the relay, the row is queued again (not left 'sending'), and the restart
    delivers it once."""
    async with slow_relay(rcpt=600) as relay:
        daemon = SubprocessDaemon(
            tmp_path / "daemon",
            relay_port=relay.port,
            outbound_timeout=600,
            outbound_extra=ONE_MAIL,
        )
        try:
            await asyncio.to_thread(daemon.start)
            await send_to_port(daemon.port, mail(sender=CUSTOMER))
            await until(lambda: relay.rcpts == 1, "the delivery never reached RCPT")
            await asyncio.to_thread(daemon.kill, signal.SIGTERM)  # waits 30 s at most
            assert daemon.proc is not None and daemon.proc.returncode == 0
            [row] = await outbox(daemon.config_path)
            assert (row["state"], row["last_error"]) == ("queued", "stopped before DATA"), row
            assert relay.dots == 0
            relay.fast()
            rows = await restart(daemon)
        finally:
            daemon.kill()
        assert [(r["state"], r["attempts"]) for r in rows] == [("sent", 2)], rows
        assert relay.dots == 1 and len(relay.received) == 1


async def test_a_delivery_cut_after_data_is_marked_unconfirmed_and_never_sent_again(
    tmp_path: Path,
) -> None:
    """A relay slow to answer DATA and then the final dot (each within `outbound.timeout`)
    outlasts the stop's wait: the delivery is cut after the relay got the dot, so the row is
    marked failed, unconfirmed, and the restart does not send it a second time."""
    async with slow_relay(data=7.5, dot=7.5) as relay:
        daemon = SubprocessDaemon(
            tmp_path / "daemon", relay_port=relay.port, outbound_timeout=8, outbound_extra=ONE_MAIL
        )
        try:
            await asyncio.to_thread(daemon.start)
            await send_to_port(daemon.port, mail(sender=CUSTOMER))
            await until(lambda: relay.data_commands == 1, "the delivery never reached DATA")
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGTERM)
            await exits(daemon)
            relay.fast()
            rows = await restart(daemon)
        finally:
            daemon.kill()
        [row] = rows
        assert (row["state"], row["attempts"]) == ("failed", 1), row
        assert row["last_error"].startswith("unconfirmed: "), row
        assert relay.dots == 1 and relay.answered == 0


def timeout_stop_sec(unit: Path) -> float:
    """TimeoutStopSec= of a systemd unit, in seconds ("150", "150s", "2min 30s")."""
    [value] = [
        line.split("=", 1)[1].strip()
        for line in unit.read_text(encoding="utf-8").splitlines()
        if line.startswith("TimeoutStopSec=")
    ]
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts and "".join(n + u for n, u in parts) == value.replace(" ", ""), value
    return sum(float(number) * units[unit_] for number, unit_ in parts)


def test_unit_stop_timeout_covers_the_stop_budget() -> None:
    """systemd kills the daemon TimeoutStopSec after SIGTERM: that must cover the whole stop
    mailgate computes for the default config and the shipped one (a later cut is a SIGKILL,
    and the deliveries it catches are sent twice)."""
    allowed = timeout_stop_sec(REPO / "deploy" / "mailgate.service")
    default = parse_config(
        {"smtp": {"accept": [SUPPORT]}, "outbound": {"sender": SUPPORT}},
        path=REPO / "config.toml",
    )
    for config in (default, load_config(REPO / "config.toml")):
        assert stop_budget(config) <= allowed
    assert default.outbound.timeout + default.smtp.drain_timeout < stop_budget(default)


async def test_the_stop_tells_systemd_its_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under systemd (Type=notify) the daemon says READY=1, and at the stop STOPPING=1 with
    EXTEND_TIMEOUT_USEC of its own budget, so a config with longer timeouts is not killed."""
    daemon = SubprocessDaemon(tmp_path / "daemon", outbound_timeout=300)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    try:
        await asyncio.to_thread(daemon.start)
        ready = (await asyncio.to_thread(notify.recv, 4096)).decode()
        assert ready.splitlines()[0] == "READY=1", ready
        await asyncio.to_thread(daemon.kill, signal.SIGTERM)
        stopping = (await asyncio.to_thread(notify.recv, 4096)).decode()
    finally:
        daemon.kill()
        notify.close()
    budget = stop_budget(load_config(daemon.config_path))
    assert budget > timeout_stop_sec(REPO / "deploy" / "mailgate.service")
    assert stopping.splitlines() == ["STOPPING=1", f"EXTEND_TIMEOUT_USEC={int(budget * 1e6)}"]


# -- file transport --


async def test_file_transport_writes_whole_eml_files(config: Config) -> None:
    """Each mail becomes one complete .eml file in var/outbox with the ticket's tag and
    the row's Message-ID; no temporary or partial file is left beside them."""
    assert config.outbound.transport == "file"
    async with daemon_running(config) as running:
        await running.send(mail(sender=f"Ann <{CUSTOMER}>"))
        rows = await wait_outbox(config.path, all_in("sent", 2))
    folder = config.path.parent / "var" / "outbox"
    files = sorted(folder.iterdir())
    assert [f.suffix for f in files] == [".eml", ".eml"], files
    assert all(re.fullmatch(r"[0-9a-f]{32}\.eml", f.name) for f in files), files
    parsed = [BytesParser(policy=email.policy.default).parsebytes(f.read_bytes()) for f in files]
    assert sorted(str(m["Message-ID"]).strip("<>") for m in parsed) == sorted(
        r["message_id"] for r in rows
    )
    for message in parsed:
        assert str(message["Subject"]).endswith("[#1]"), message["Subject"]
        assert str(message["To"]) == CUSTOMER
        assert str(message["From"]) == SUPPORT
        assert message.get_body(("plain",)) is not None
        assert message.get_body(("html",)) is not None
        assert not message.defects, message.defects


def fill(folder: Path) -> Path:
    """Write a file into `folder` until its filesystem is full; return the file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass  # ENOSPC: full
    finally:
        os.close(fd)
    return filler


async def test_full_outbox_disk_defers_mail_and_leaves_no_temp_files(tmp_path: Path) -> None:
    """With the outbox folder's disk full the mail stays queued, naming the reason; once
    there is space it is written, and no half-written temporary file stays behind."""
    with tmpfs(tmp_path / "var" / "outbox", "256k") as folder:
        config = load_config(write_config(tmp_path))
        assert config.outbound.directory == folder
        filler = fill(folder)
        async with daemon_running(config) as running:
            await running.send(mail(sender=CUSTOMER))
            rows = await wait_outbox(
                config.path,
                lambda rows: (
                    len(rows) == 2
                    and all(r["state"] == "queued" and r["attempts"] >= 2 for r in rows)
                ),
            )
            for row in rows:
                assert row["last_error"].startswith("cannot write to the outbox folder"), row
                assert "No space left" in row["last_error"], row
            filler.unlink()
            await wait_outbox(config.path, all_in("sent", 2))
        names = sorted(f.name for f in folder.iterdir())
    assert len(names) == 2 and all(re.fullmatch(r"[0-9a-f]{32}\.eml", n) for n in names), names


# -- the reply command line --


async def test_reply_usage_errors_change_nothing_and_stdin_works(
    config: Config, tmp_path: Path
) -> None:
    """Empty, whitespace-only, missing or non-UTF-8 body files are usage errors (exit 2,
    naming --body-file); an unknown ticket is exit 1; none of them stores or queues
    anything. A body on stdin ("-") is stored and mailed."""
    path = config.path
    async with daemon_running(config) as running:
        await running.send(mail(sender=CUSTOMER))
        await wait_outbox(path, lambda rows: len(rows) == 2)

        bodies = {"empty": b"", "blank": b"  \n\t\n", "latin1": b"Caf\xe9 is closed\n"}
        for name, data in bodies.items():
            (tmp_path / f"{name}.txt").write_bytes(data)
        for name in [*bodies, "missing"]:
            body_file = str(tmp_path / f"{name}.txt")
            result = await cli(path, "reply", "1", "--body-file", body_file)
            assert result.returncode == 2, (name, result)
            assert "--body-file" in result.stderr and body_file in result.stderr, result.stderr
            assert "Traceback" not in result.stderr

        (tmp_path / "ok.txt").write_text("Please unplug it.\n", encoding="utf-8")
        result = await cli(path, "reply", "99", "--body-file", str(tmp_path / "ok.txt"))
        assert result.returncode == 1, result
        assert "no ticket 99" in result.stderr

        assert len(await outbox(path)) == 2
        [ticket] = await running.tickets()
        assert [m.author for m in ticket.messages] == ["customer"]

        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "mailgate", "--config", str(path), *REPLY_STDIN],
            input="Unplug it, from stdin.\n",
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "mail queued as outbox 3" in result.stdout
        rows = await wait_outbox(path, all_in("sent", 3))
        [ticket] = await running.tickets()
    assert rows[2]["kind"] == "agent_reply" and rows[2]["recipient"] == CUSTOMER
    assert [m.author for m in ticket.messages] == ["customer", "agent"]
    assert ticket.messages[1].body_text.strip() == "Unplug it, from stdin."
    mailed = [
        BytesParser(policy=email.policy.default).parsebytes(f.read_bytes())
        for f in (path.parent / "var" / "outbox").glob("*.eml")
    ]
    replies = [m for m in mailed if str(m["Message-ID"]).strip("<>") == rows[2]["message_id"]]
    assert len(replies) == 1
    body = replies[0].get_body(("plain",))
    assert body is not None
    assert "Unplug it, from stdin." in str(body.get_content())


async def test_a_mail_that_cannot_be_composed_fails_with_the_reason(
    relay: Relay, relay_config: Config, tmp_path: Path
) -> None:
    """A row whose data cannot make a mail (here an agent reply holding a lone surrogate,
    which no charset encodes) ends 'failed' with the reason at its first attempt, rather than
    stay 'sending' until a restart; the mail after it is delivered."""
    tickets = Tickets(relay_config, load_msgids(relay_config))
    body = tmp_path / "reply.txt"
    body.write_text("Fine.\n", encoding="utf-8")
    async with daemon_running(relay_config) as running:
        await running.send(mail(sender=CUSTOMER))
        await relay.wait_for(2)
        async with store_for(relay_config) as store:
            await store.ingest(
                lambda tx: tickets.relay_agent_reply(
                    tx, 1, "Broken \udcff text\n", agent=None, at=datetime.now(UTC)
                )
            )
        rows = await wait_outbox(
            relay_config.path,
            lambda rows: len(rows) == 3 and any(r["state"] == "failed" for r in rows),
        )
        [row] = [r for r in rows if r["state"] == "failed"]
        assert row["kind"] == "agent_reply" and row["attempts"] == 1
        assert row["last_error"].startswith("composition failed: UnicodeEncodeError"), row
        result = await cli(relay_config.path, "reply", "1", "--body-file", str(body))
        assert result.returncode == 0, result.stderr
        await relay.wait_for(3)
    states = [r["state"] for r in await outbox(relay_config.path)]
    assert states == ["sent", "sent", "failed", "sent"]
