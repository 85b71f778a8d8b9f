"""The daemon as systemd runs it: sd_notify over a real NOTIFY_SOCKET, the drain at SIGTERM,
a second signal, and SIGHUP's reload. Each test runs a real `mailgate serve` process and
talks SMTP to it; what was stored is read from the store after it exited."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mailgate.store import store_for
from mailgate.systemd import watchdog_interval
from tests.conftest import (
    REPO,
    SUPPORT,
    SubprocessDaemon,
    events,
    mail,
    run_cli,
    wait_for_event,
)
from tests.test_process_hygiene import alive, descendants
from tests.test_tls import make_pki

CUSTOMER = "customer@example.org"
WAIT = 30  # seconds: an upper bound for what comes at once


def in_data(port: int, n: int) -> tuple[smtplib.SMTP, bytes]:
    """A session that has sent half of message `n` after DATA; the other half to send."""
    client = smtplib.SMTP("127.0.0.1", port, timeout=WAIT)
    client.ehlo("client.example")
    assert client.mail(CUSTOMER)[0] == 250
    assert client.rcpt(SUPPORT)[0] == 250
    client.putcmd("data")
    assert client.getreply()[0] == 354
    raw = mail(subject=f"Message {n} in DATA", sender=CUSTOMER).as_bytes().replace(b"\n", b"\r\n")
    half = len(raw) // 2
    client.send(raw[:half])
    return client, raw[half:] + b"\r\n.\r\n"


def stored(daemon: SubprocessDaemon) -> int:
    """How many messages the store holds (each one committed before its 250; ingest may not
    have made its ticket before the stop: that is the next start's work)."""

    async def count() -> int:
        async with store_for(daemon.config) as store:
            return sum((await store.queues()).inbound.by_state.values())

    return asyncio.run(count())


# -- systemd's notify protocol ------------------------------------------------------------


class NotifySocket:
    """The datagram socket systemd listens on; every message received, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(WAIT)

    def next(self) -> dict[str, str]:
        fields = self.sock.recv(4096).decode().split("\n")
        return dict(field.split("=", 1) for field in fields)

    def until(self, key: str) -> dict[str, str]:
        """The next message with `key` (pings before it are passed over)."""
        while True:
            message = self.next()
            if key in message:
                return message


def smtp_greets(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
            return sock.recv(100).startswith(b"220")
    except OSError:
        return False


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
    except OSError:
        return False
    return True


def test_systemd_hears_ready_status_pings_reload_and_stopping(tmp_path: Path) -> None:
    """READY=1 (with STATUS=) comes once SMTP and HTTP accept; WATCHDOG=1 every half of
    WATCHDOG_USEC; RELOADING=1 with MONOTONIC_USEC and READY=1 around a SIGHUP; STOPPING=1
    at SIGTERM, and exit 0."""
    daemon = SubprocessDaemon(tmp_path / "daemon")
    notify = NotifySocket(tmp_path / "notify")
    ready: dict[str, Any] = {}

    def on_ready() -> None:  # at once when READY=1 arrives: the sockets must listen now
        ready["message"] = notify.until("READY")
        ready["smtp"] = smtp_greets(daemon.port)
        ready["http"] = accepts(daemon.http_port)

    watcher = threading.Thread(target=on_ready)
    watcher.start()
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}
    try:
        daemon.start(env=env)
        watcher.join(WAIT)
        assert ready["message"]["READY"] == "1" and ready["smtp"] and ready["http"], ready
        assert re.fullmatch(  # the queues, counted (the start's own probe is a session)
            r"\d+ SMTP sessions; inbound 0 to ingest; outbox 0 queued, 0 sending, 0 failed",
            ready["message"]["STATUS"],
        ), ready

        pings = 0
        while pings < 5:  # one every 0.2 s
            message = notify.next()
            pings += message.get("WATCHDOG") == "1"

        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        reloading = notify.until("RELOADING")
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        after_reload = notify.until("READY")
        assert "STATUS" in after_reload

        daemon.proc.send_signal(signal.SIGTERM)
        stopping = notify.until("STOPPING")
        assert int(stopping["EXTEND_TIMEOUT_USEC"]) > 0
        assert daemon.proc.wait(WAIT) == 0
    finally:
        daemon.kill()
        notify.sock.close()


@pytest.mark.parametrize(
    ("pid", "expected"),
    [(None, 0.2), ("self", 0.2), ("other", None)],
    ids=["unset", "ours", "other"],
)
def test_watchdog_pings_go_only_to_the_process_watchdog_pid_names(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pid: str | None, expected: float | None
) -> None:
    """sd_watchdog_enabled(3): WATCHDOG_PID, when set, names the process that must ping."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() if pid == "self" else os.getppid()))
    assert watchdog_interval() == expected


# -- the stop -------------------------------------------------------------------------------


def test_sigterm_lets_three_messages_in_data_finish_and_answers_421_to_the_rest(
    tmp_path: Path,
) -> None:
    """Three sessions are in DATA when SIGTERM comes: each finishes its message after the
    signal and gets its 250, and the three are stored. An idle session's next command, and
    that of a session whose DATA is done, get 421 4.3.2; a new connection is refused (or
    answered 421). The daemon exits 0 and logs the signal."""
    daemon = SubprocessDaemon(tmp_path / "daemon", log_level="info")
    daemon.start()
    assert daemon.proc is not None
    sessions = [in_data(daemon.port, n) for n in (1, 2, 3)]
    idle = smtplib.SMTP("127.0.0.1", daemon.port, timeout=WAIT)
    try:
        idle.ehlo("idle.example")

        daemon.proc.send_signal(signal.SIGTERM)
        stopping = wait_for_event(daemon, "daemon_stopping")
        assert stopping["signal"] == "SIGTERM"
        assert wait_for_event(daemon, "smtp_draining")["receiving"] == 3

        assert idle.docmd("NOOP") == (421, b"4.3.2 Service shutting down")
        assert not smtp_greets(daemon.port)  # refused, or a 421 in place of the greeting

        (first, rest), *others = sessions
        first.send(rest)
        code, reply = first.getreply()
        assert code == 250 and reply.startswith(b"2.0.0 Queued as "), reply
        assert first.docmd("NOOP") == (421, b"4.3.2 Service shutting down")
        for client, rest in others:
            client.send(rest)
            code, reply = client.getreply()
            assert code == 250, reply
        assert daemon.proc.wait(WAIT) == 0
    finally:
        for client in [idle, *(session for session, _ in sessions)]:
            client.close()
        daemon.kill()
    assert stored(daemon) == 3
    assert any(e.get("event") == "daemon_stopped" for e in events(daemon))


def test_a_second_sigint_exits_at_once_and_loses_no_acknowledged_mail(tmp_path: Path) -> None:
    """SIGINT starts the drain (a session is in DATA, so it would wait); a second SIGINT exits
    at once (status 130, not the drain's 0), the parser process goes with it, and the mail
    answered 250 before is in the store."""
    daemon = SubprocessDaemon(tmp_path / "daemon", log_level="info")
    daemon.start()
    assert daemon.proc is not None
    try:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=WAIT) as client:
            client.sendmail(CUSTOMER, [SUPPORT], mail(subject="Acknowledged").as_bytes())
        helpers = descendants(daemon.proc.pid)
        assert helpers, "no parser process"
        client, _ = in_data(daemon.port, 1)
        with client:
            daemon.proc.send_signal(signal.SIGINT)
            wait_for_event(daemon, "smtp_draining")
            daemon.proc.send_signal(signal.SIGINT)
            assert daemon.proc.wait(WAIT) == 128 + signal.SIGINT
            assert wait_for_event(daemon, "daemon_exit_forced")["signal"] == "SIGINT"
            with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError)):
                client.send(b"\r\n.\r\n")
                client.getreply()  # no 250 for the message cut off
    finally:
        daemon.kill()
    deadline = time.monotonic() + WAIT  # liveness only: they go at once
    while alive(helpers):
        assert time.monotonic() < deadline, alive(helpers)
        time.sleep(0.05)
    assert stored(daemon) == 1


# -- reload ---------------------------------------------------------------------------------


def rcpt(port: int, address: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=WAIT) as client:
        client.ehlo("client.example")
        assert client.mail(CUSTOMER)[0] == 250
        return client.rcpt(address)[0]


def test_sighup_applies_the_new_accept_list_and_keeps_the_old_config_when_invalid(
    tmp_path: Path,
) -> None:
    """A SIGHUP with a changed accept list holds for the next session, and a session open
    across it keeps working; a key that needs a restart is named and kept. A config that is
    invalid, or names a broken template, is refused with its key or file, the old one stays
    in force, and the daemon keeps taking mail."""
    daemon = SubprocessDaemon(tmp_path / "daemon", log_level="info")
    daemon.start()
    assert daemon.proc is not None
    original = daemon.config_path.read_text(encoding="utf-8")
    old_accept = 'accept = ["support@example.com", "@help.example.com"]'
    assert old_accept in original
    try:
        assert rcpt(daemon.port, "sales@example.com") == 550
        across = smtplib.SMTP("127.0.0.1", daemon.port, timeout=WAIT)
        across.ehlo("client.example")

        changed = original.replace(old_accept, 'accept = ["support@example.com", "sales@x.test"]')
        daemon.config_path.write_text(changed, encoding="utf-8")
        # check-config before the reload: the ports the daemon holds are its own, no error.
        checked = run_cli("--config", str(daemon.config_path), "check-config")
        assert checked.returncode == 0, checked.stderr
        changed = changed.replace('hostname = "mailgate.test"', 'hostname = "other.test"')
        daemon.config_path.write_text(changed, encoding="utf-8")
        taken = run_cli("--config", str(daemon.config_path), "check-config")  # not ours now
        assert taken.returncode == 78 and "smtp.listen" in taken.stderr, taken.stderr
        seen = len(events(daemon))
        daemon.proc.send_signal(signal.SIGHUP)
        reloaded = wait_for_event(daemon, "config_reloaded", after=seen)
        assert reloaded["changed"] == ["smtp.accept"]
        assert wait_for_event(daemon, "reload_needs_restart", after=seen)["keys"] == [
            "smtp.hostname"
        ]
        assert rcpt(daemon.port, "sales@x.test") == 250
        assert rcpt(daemon.port, "anyone@help.example.com") == 550
        assert across.mail(CUSTOMER)[0] == 250  # the session open across the reload
        assert across.rcpt("sales@x.test")[0] == 250
        across.quit()

        daemon.config_path.write_text(changed.replace('"sales@x.test"]', "]\nbad = 1"), "utf-8")
        seen = len(events(daemon))
        daemon.proc.send_signal(signal.SIGHUP)
        refused = wait_for_event(daemon, "reload_refused", after=seen)
        assert "smtp.bad: unknown key" in refused["error"], refused

        templates = tmp_path / "templates"
        shutil.copytree(REPO / "templates", templates)
        (templates / "mail" / "verification.txt").write_text("{{ oops(", encoding="utf-8")
        broken = changed.replace(
            f'templates = "{REPO / "templates"}"', f'templates = "{templates}"'
        )
        assert broken != changed
        daemon.config_path.write_text(broken, encoding="utf-8")
        seen = len(events(daemon))
        daemon.proc.send_signal(signal.SIGHUP)
        refused = wait_for_event(daemon, "reload_refused", after=seen)
        assert "verification.txt:1" in refused["error"], refused

        assert daemon.proc.poll() is None
        assert rcpt(daemon.port, "sales@x.test") == 250  # the last good config holds
    finally:
        daemon.kill(signal.SIGTERM)
    assert daemon.proc.returncode == 0


# -- the unit file --------------------------------------------------------------------------


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_the_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` on deploy/mailgate.service, with ExecStart pointed at a real
    executable (the unit's own, /opt/mailgate/bin/mailgate, does not exist here). verify
    does not look users up: User=mailgate passes whether or not the user exists, so the
    copy keeps it as shipped; deploy/README.md creates the user."""
    assert SYSTEMD_ANALYZE is not None
    unit = (REPO / "deploy" / "mailgate.service").read_text(encoding="utf-8")
    assert "ExecStart=/opt/mailgate/bin/mailgate --config /etc/mailgate/config.toml serve" in unit
    copy = tmp_path / "mailgate.service"
    copy.write_text(unit.replace("/opt/mailgate/bin/mailgate", "/bin/true"), encoding="utf-8")
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(copy)], capture_output=True, text=True, check=False
    )
    # Warnings about the machine (no systemd running as PID 1 in a container) are not the
    # unit's; anything naming the unit file is.
    complaints = [line for line in result.stderr.splitlines() if "mailgate.service" in line]
    assert result.returncode == 0 and not complaints, result.stderr


def _handshake(port: int, context: ssl.SSLContext) -> bool:
    """STARTTLS with `context`: True if the certificate verified."""
    with smtplib.SMTP("127.0.0.1", port, timeout=WAIT) as client:
        client.ehlo("client.example")
        try:
            client.starttls(context=context)
        except ssl.SSLCertVerificationError:
            return False
        client.ehlo("client.example")
        return client.mail(CUSTOMER)[0] == 250


def test_sighup_swaps_the_tls_certificate_for_the_next_handshake(tmp_path: Path) -> None:
    """A renewed certificate (certbot writes new files, then reloads): after SIGHUP the
    next STARTTLS gets the new one; a certificate file that does not load refuses the
    reload, naming the key, and the one in use stays."""
    old, new = make_pki(tmp_path / "old"), make_pki(tmp_path / "new")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(old.cert, cert)
    shutil.copy(old.key, key)
    daemon = SubprocessDaemon(
        tmp_path / "daemon", log_level="info", smtp_extra=f'tls_cert = "{cert}"\ntls_key = "{key}"'
    )
    daemon.start()
    assert daemon.proc is not None
    try:
        assert _handshake(daemon.port, old.client())
        assert not _handshake(daemon.port, new.client())
        shutil.copy(new.cert, cert)
        shutil.copy(new.key, key)
        seen = len(events(daemon))
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for_event(daemon, "config_reloaded", after=seen)
        assert _handshake(daemon.port, new.client())
        assert not _handshake(daemon.port, old.client())

        cert.write_text("not a certificate\n", encoding="utf-8")
        seen = len(events(daemon))
        daemon.proc.send_signal(signal.SIGHUP)
        refused = wait_for_event(daemon, "reload_refused", after=seen)
        assert "smtp.tls_cert" in refused["error"], refused
        assert _handshake(daemon.port, new.client())
    finally:
        daemon.kill(signal.SIGTERM)
    assert daemon.proc.returncode == 0
