"""deploy/README.md, run as written: every `sh` block in order, outside the checkout.

The blocks build a wheel from the checkout, install it into a fresh virtualenv, write the
config and a template override, make the key, check the config, install the unit, start the
daemon, use the CLI and upgrade. What the test changes, and why:

- `/opt/mailgate`, `/etc/mailgate`, `/var/lib/mailgate` and `/etc/systemd/system` are moved
  into a temporary folder (the machine's own stay untouched);
- the listen ports 8025 and 8080 become free ones, and `nameservers = []` the run's DNS stub
  (tests/dns_stub.py; this machine has no resolver that answers), so parallel runs and the
  sender checks work;
- `useradd` is left out (the test must not add users to the machine it runs on; the state
  folder it would make as the user's home is made instead), and `runuser -u mailgate --`
  runs the command as the test's own user;
- `systemctl` and `journalctl` are systemd's: `systemctl enable --now mailgate` and
  `systemctl restart mailgate` are played by the test, which starts (and first stops, with
  SIGTERM) the daemon as the unit's ExecStart does; the other such lines are left out.

Building the wheel and installing its dependencies is done once for the module.
"""

from __future__ import annotations

import email.policy
import os
import re
import signal
import smtplib
import socket
import subprocess
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, mail, shared_dns

DEPLOY = REPO / "deploy" / "README.md"
PREFIXES = re.compile(
    r"(?<![\w/.-])(/opt/mailgate|/etc/mailgate|/var/lib/mailgate|/etc/systemd/system)"
)
SYSTEMD = ("systemctl ", "journalctl ")
SKIPPED = ("useradd ",)
AS_SERVICE_USER = "runuser -u mailgate -- "


@dataclass
class Block:
    section: str
    script: str


def blocks() -> list[Block]:
    """The ```sh blocks of deploy/README.md with the `##` section each is in."""
    found: list[Block] = []
    section, script = "", None
    for line in DEPLOY.read_text(encoding="utf-8").splitlines():
        if script is None and line.startswith("## "):
            section = line[3:].strip()
        elif script is None and line.strip() == "```sh":
            script = list[str]()
        elif script is not None and line.strip() == "```":
            found.append(Block(section, "\n".join(script)))
            script = None
        elif script is not None:
            script.append(line)
    return found


@dataclass
class Machine:
    """The server of deploy/README.md, moved into `root`."""

    root: Path
    smtp_port: int
    http_port: int
    dns_port: int
    daemon: subprocess.Popen[bytes] | None = None
    output: list[str] = field(default_factory=list)

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    def rewrite(self, text: str) -> str:
        text = PREFIXES.sub(lambda m: f"{self.root}{m.group(1)}", text)
        text = text.replace("127.0.0.1:8025", f"127.0.0.1:{self.smtp_port}")
        text = text.replace("127.0.0.1:8080", f"127.0.0.1:{self.http_port}")
        text = text.replace("nameservers = []", f'nameservers = ["127.0.0.1:{self.dns_port}"]')
        return text.replace(AS_SERVICE_USER, "")

    def run_section(self, section: str) -> str:
        """Run the section's blocks: shell lines by bash in the checkout, systemd's by us."""
        chosen = [b for b in blocks() if b.section == section]
        assert chosen, f"deploy/README.md has no sh block under '## {section}'"
        printed = []
        for block in chosen:
            pending: list[str] = []
            for line in self.rewrite(block.script).splitlines():
                if line.startswith(SYSTEMD):
                    printed.append(self._bash(pending))
                    pending = []
                    self.systemd(line)
                elif not line.startswith(SKIPPED):
                    pending.append(line)
            printed.append(self._bash(pending))
        return "".join(printed)

    def _bash(self, lines: list[str]) -> str:
        if not any(line.strip() for line in lines):
            return ""
        env = {k: v for k, v in os.environ.items() if k != "MAILGATE_CONFIG"}
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", "\n".join(lines)],
            cwd=REPO,  # "in a checkout of mailgate"
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert result.returncode == 0, (lines, result.stdout, result.stderr)
        return result.stdout

    def systemd(self, line: str) -> None:
        """What systemd does for the lines that matter: start (or restart) the service."""
        if line.strip() in ("systemctl enable --now mailgate", "systemctl restart mailgate"):
            self.stop()
            self.start()

    def start(self) -> None:
        """The unit's ExecStart, from a folder that is not the checkout."""
        log = self.path("/var/lib/mailgate/daemon.log").open("ab")
        self.daemon = subprocess.Popen(
            [
                str(self.path("/opt/mailgate/bin/mailgate")),
                "--config",
                str(self.path("/etc/mailgate/config.toml")),
                "serve",
            ],
            cwd=self.path("/var/lib/mailgate"),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.daemon.poll() is None, self.log()
            try:
                with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=1) as sock:
                    if sock.recv(100).startswith(b"220"):
                        return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"mailgate did not start:\n{self.log()}")

    def stop(self) -> int | None:
        """SIGTERM, as `systemctl stop`; the exit status (None if it was not running)."""
        if self.daemon is None or self.daemon.poll() is not None:
            return None
        self.daemon.send_signal(signal.SIGTERM)
        status = self.daemon.wait(timeout=60)
        self.daemon = None
        return status

    def log(self) -> str:
        return self.path("/var/lib/mailgate/daemon.log").read_text(errors="replace")

    def outbox(self) -> list[EmailMessage]:
        folder = self.path("/var/lib/mailgate/outbox")
        parser = BytesParser(policy=email.policy.default)
        found = [parser.parsebytes(p.read_bytes()) for p in sorted(folder.glob("*.eml"))]
        return [m for m in found if isinstance(m, EmailMessage)]


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    """Install and configure, as far as the systemd section."""
    server = Machine(tmp_path_factory.mktemp("server"), free_port(), free_port(), shared_dns())
    server.path("/var/lib/mailgate").mkdir(parents=True)  # useradd --create-home's part
    server.path("/etc/systemd/system").mkdir(parents=True)  # as on any systemd machine
    server.output.append(server.run_section("Install"))
    server.output.append(server.run_section("Configure"))
    yield server
    server.stop()


def test_install_and_configure_leave_a_venv_a_config_and_a_key(machine: Machine) -> None:
    venv = machine.path("/opt/mailgate")
    assert not venv.is_relative_to(REPO)
    [wheel] = (REPO / "dist").glob("mailgate-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        held = {n for n in archive.namelist() if n.startswith("mailgate/templates/")}
    shipped = {f"mailgate/{p.relative_to(REPO).as_posix()}" for p in REPO.glob("templates/*/*")}
    assert held == shipped and len(held) == 26
    assert "mailgate 0." in machine.output[0]  # mailgate --version
    site = list(venv.glob("lib/python3*/site-packages/mailgate/templates/mail"))
    assert site and (site[0] / "ticket_created.txt").is_file()
    assert not (site[0] / "ticket_created.txt").is_symlink()  # the wheel holds the files
    key = machine.path("/var/lib/mailgate/keys/master.key")
    assert key.stat().st_mode & 0o777 == 0o600
    checked = machine.output[1]
    assert "ticket_created.txt" in checked  # ls of the shipped set
    assert f"templates: overridden from {machine.path('/etc/mailgate/templates')}" in checked
    assert checked.rstrip().endswith(f"{machine.path('/etc/mailgate/config.toml')}: OK")


def test_the_installed_daemon_answers_with_the_override_and_the_shipped_set(
    machine: Machine,
) -> None:
    """1. The systemd section starts the daemon (our ExecStart). 2. One mail by SMTP.
    3. The acknowledgement's text is the override's, its subject and HTML part and the
    verification mail are the shipped ones, From is "Name <address>". 4. The command-line
    section's `status` and `tickets list` read the store beside the running daemon."""
    machine.run_section("Run it under systemd")
    assert machine.path("/etc/systemd/system/mailgate.service").is_file()
    with smtplib.SMTP("127.0.0.1", machine.smtp_port, timeout=30) as client:
        client.send_message(mail(sender="Ann <ann@example.org>"), to_addrs=["support@example.com"])
    deadline = time.monotonic() + 60
    while len(sent := machine.outbox()) < 2:
        assert time.monotonic() < deadline, machine.log()
        time.sleep(0.1)
    by_subject = {str(m["Subject"]): m for m in sent}
    ack = by_subject["We received your request [#1]"]
    assert "Please confirm your email address [#1]" in by_subject
    assert str(ack["From"]) == "Example Support <support@example.com>"
    text, html = ack.get_body(("plain",)), ack.get_body(("html",))
    assert text is not None and html is not None
    assert "Example Support has your request: it is ticket 1, and we answer" in text.get_content()
    assert "thank you for writing to us. Your request is ticket 1." in html.get_content()

    shown = machine.run_section("The command line, as the service user")
    assert re.search(r"^outbox\s+0\s+-\s+queued=0 sending=0 sent=2 failed=0$", shown, re.M), shown
    assert re.search(r"^1\s+open\s+1\s+ann@example.org\s+Printer on fire$", shown, re.M), shown


def test_an_upgrade_restarts_on_the_new_wheel_and_status_reads_the_store(
    machine: Machine,
) -> None:
    """The upgrade section: a new wheel into the same venv, a restart (SIGTERM drains the
    old daemon, exit 0; the new one migrates at start), then `status`."""
    shown = machine.run_section("Upgrading")
    assert machine.daemon is not None and machine.daemon.poll() is None
    assert "QUEUE" in shown and "inbound" in shown
    assert machine.stop() == 0, machine.log()
