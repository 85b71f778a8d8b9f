"""The override folder's templates change only at SIGHUP, and only once they are checked.

A real `mailgate serve` with an override folder; the page shown for an unknown link
(`page/token_invalid.html`) is what a user sees of a template.
"""

from __future__ import annotations

import signal
import smtplib
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import SubprocessDaemon, events, wait_for_event

WAIT = 30.0


def unknown_link_page(daemon: SubprocessDaemon) -> tuple[int, str]:
    url = f"http://127.0.0.1:{daemon.http_port}/verify/{'0' * 43}"
    try:
        with urllib.request.urlopen(url, timeout=WAIT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_an_edited_override_waits_for_sighup_and_a_broken_one_never_shows(
    tmp_path: Path,
) -> None:
    """An override edited on disk (half written, or broken) changes nothing until SIGHUP;
    at SIGHUP a broken one is refused and the page stays as it was; a good one then holds.
    Before: jinja2 read the edited file at the next use, and the page answered 500."""
    overrides = tmp_path / "overrides"
    (overrides / "page").mkdir(parents=True)
    page = overrides / "page" / "token_invalid.html"
    page.write_text("<p>first {{ purpose }}</p>\n", encoding="utf-8")
    daemon = SubprocessDaemon(tmp_path / "daemon", log_level="info", templates=overrides)
    daemon.start()
    assert daemon.proc is not None
    try:
        assert unknown_link_page(daemon) == (404, "<p>first verification</p>")

        page.write_text("<p>{{ oops(</p>\n", encoding="utf-8")
        assert unknown_link_page(daemon) == (404, "<p>first verification</p>")
        seen = len(events(daemon))
        daemon.proc.send_signal(signal.SIGHUP)
        refused = wait_for_event(daemon, "reload_refused", after=seen)
        assert "token_invalid.html:1" in refused["error"], refused
        assert unknown_link_page(daemon) == (404, "<p>first verification</p>")

        page.write_text("<p>second {{ purpose }}</p>\n", encoding="utf-8")
        assert unknown_link_page(daemon) == (404, "<p>first verification</p>")
        seen = len(events(daemon))
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for_event(daemon, "config_reloaded", after=seen)
        assert unknown_link_page(daemon) == (404, "<p>second verification</p>")

        page.unlink()  # the folder's file gone: nothing changes before SIGHUP either
        assert unknown_link_page(daemon) == (404, "<p>second verification</p>")
    finally:
        daemon.kill(signal.SIGTERM)


def rcpt(port: int, address: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=WAIT) as client:
        client.ehlo("client.example")
        assert client.mail("customer@example.org")[0] == 250
        return client.rcpt(address)[0]


@pytest.mark.parametrize(
    "new_privacy",
    ['address = "gdpr@example.com"', ""],
    ids=["another address", "none"],
)
def test_a_reload_that_changes_the_privacy_address_keeps_the_old_one_working(
    tmp_path: Path, new_privacy: str
) -> None:
    """privacy.address needs a restart, and the privacy address is accepted implicitly (it
    is added to smtp.accept, which reloads). A SIGHUP that moves or removes it is refused,
    naming the key, and the address in force stays accepted; before, the new accept list
    (without that address) was applied, and requests to it were refused 550."""
    daemon = SubprocessDaemon(tmp_path / "daemon", log_level="info")
    config = daemon.config_path.read_text(encoding="utf-8")
    daemon.config_path.write_text(config + '\n[privacy]\naddress = "privacy@example.com"\n')
    daemon.start()
    assert daemon.proc is not None
    try:
        assert rcpt(daemon.port, "privacy@example.com") == 250
        daemon.config_path.write_text(config + f"\n[privacy]\n{new_privacy}\n")
        seen = len(events(daemon))
        daemon.proc.send_signal(signal.SIGHUP)
        refused = wait_for_event(daemon, "reload_refused", after=seen)
        assert refused["error"] == "privacy.address: changed; needs a restart", refused
        assert rcpt(daemon.port, "privacy@example.com") == 250
        assert rcpt(daemon.port, "support@example.com") == 250
    finally:
        daemon.kill(signal.SIGTERM)
