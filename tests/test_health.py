"""/healthz and /metrics on a real daemon: real SMTP, a real SQLite lock, real DNS silence.

One daemon serves the module. Its `health_max_backlog_age` is 0: any message due for ingest
and not yet ingested fails /healthz, so a test needs no clock to make the backlog "too old"
(each test leaves none behind). Its `metrics_from` is 127.0.0.1 alone, so a client bound to
127.0.0.2 (loopback too, on Linux) is one that /metrics must refuse.
"""

from __future__ import annotations

import http.client
import json
import smtplib
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SUPPORT, SubprocessDaemon, mail, run_cli, write_config
from tests.dns_stub import shared_dns_stub

SLOW = "healthz-slow.net"  # its DNS never answers: its mail waits on its sender checks
MAX_CONNECTIONS = 4


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SubprocessDaemon]:
    stub, _ = shared_dns_stub()
    stub.silent.update({f"_dmarc.{SLOW}", SLOW})
    running = SubprocessDaemon(
        tmp_path_factory.mktemp("health"),
        http_extra='health_max_backlog_age = 0\nmetrics_from = ["127.0.0.1"]\n',
        smtp_extra=f"max_connections = {MAX_CONNECTIONS}\n",
        # A silent domain's checks time out after 3 s, when `retry_for` has passed: the mail
        # is decided then (unauthenticated), without a retry.
        auth_extra="retry_for = 3\n",
        dns_timeout=3,
    )
    running.start()
    yield running
    running.kill()


def get(
    daemon: SubprocessDaemon,
    path: str,
    *,
    source: str = "127.0.0.1",
    headers: dict[str, str] | None = None,
) -> tuple[int, http.client.HTTPResponse, bytes]:
    connection = http.client.HTTPConnection(
        "127.0.0.1", daemon.http_port, timeout=30, source_address=(source, 0)
    )
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response, response.read()
    finally:
        connection.close()


def health(daemon: SubprocessDaemon) -> tuple[int, dict[str, Any]]:
    status, response, body = get(daemon, "/healthz")
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["Cache-Control"] == "no-store"
    return status, json.loads(body)


def health_until(daemon: SubprocessDaemon, wanted: int, *, within: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while (found := health(daemon))[0] != wanted:
        assert time.monotonic() < deadline, f"/healthz never answered {wanted}: {found}"
        time.sleep(0.05)
    return found[1]


def scrape(daemon: SubprocessDaemon) -> dict[str, float]:
    """Every sample of /metrics by name and labels, e.g. 'mailgate_smtp_replies_total{code=250}'."""
    status, response, body = get(daemon, "/metrics")
    assert status == 200, body
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def scrape_until(
    daemon: SubprocessDaemon, done: Callable[[dict[str, float]], bool], *, within: float = 60
) -> dict[str, float]:
    deadline = time.monotonic() + within
    while not done(found := scrape(daemon)):
        assert time.monotonic() < deadline, "the metrics never got there"
        time.sleep(0.05)
    return found


def send(daemon: SubprocessDaemon, sender: str) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
        client.send_message(mail(sender=sender), from_addr=sender, to_addrs=[SUPPORT])


def test_a_healthy_daemon_answers_200_with_every_check(daemon: SubprocessDaemon) -> None:
    status, body = health(daemon)
    assert status == 200, body
    assert body["status"] == "ok"
    assert body["checks"]["store"] == {"ok": True}
    assert body["checks"]["smtp"] == {"ok": True}
    backlog = body["checks"]["backlog"]
    assert (backlog["ok"], backlog["messages"], backlog["max_seconds"]) == (True, 0, 0)
    assert body["outbox"]["failed"] == 0


def test_a_mail_moves_the_counters_and_the_health_probe_counts_nothing(
    daemon: SubprocessDaemon,
) -> None:
    """One mail by SMTP: one session, its replies by code, one message accepted, one ticket,
    one latency observation, one DNS check, and the verification mail once it is delivered.
    The /healthz calls around it open SMTP sessions of their own, which are not counted."""
    before = scrape(daemon)
    assert health(daemon)[0] == 200
    send(daemon, "Nina <nina@example.org>")
    # A new requester's first mail: a verification mail and the acknowledgement.
    sent = "mailgate_outbound_mails_sent_total{kind=verification}"
    ack = "mailgate_outbound_mails_sent_total{kind=ticket_created}"
    scrape_until(daemon, lambda m: m[sent] > before[sent] and m[ack] > before[ack])
    assert health(daemon)[0] == 200
    after = scrape(daemon)

    def moved(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert moved("mailgate_smtp_sessions_total") == 1
    # 220 greeting; 250 to EHLO (its last line), MAIL, RCPT and the data; 354; 221 to QUIT.
    assert moved("mailgate_smtp_replies_total{code=220}") == 1
    assert moved("mailgate_smtp_replies_total{code=250}") == 4
    assert moved("mailgate_smtp_replies_total{code=354}") == 1
    assert moved("mailgate_smtp_replies_total{code=221}") == 1
    assert after["mailgate_smtp_sessions_open"] == 0
    assert moved("mailgate_messages_accepted_total") == 1
    assert moved("mailgate_messages_quarantined_total") == 0
    assert moved("mailgate_tickets_created_total") == 1
    assert moved("mailgate_ingest_latency_seconds_count") == 1
    assert moved("mailgate_auth_dns_seconds_count") == 1
    assert (moved(sent), moved(ack)) == (1, 1)
    assert moved("mailgate_outbound_delivery_attempts_total") == 2
    assert moved("mailgate_outbound_delivery_failures_total{result=deferred}") == 0
    assert after["mailgate_ingest_backlog"] == 0
    assert after["mailgate_outbox_rows{state=sent}"] >= 2


def test_a_refused_message_counts_as_rejected_by_its_code(daemon: SubprocessDaemon) -> None:
    before = scrape(daemon)
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
        client.ehlo()
        client.mail("ann@example.org")
        client.rcpt(SUPPORT)
        code, _ = client.data(b"Subject: x\r\n\r\n" + b"x" * (2 * 1024 * 1024) + b"\r\n")
    assert code == 552
    after = scrape(daemon)
    key = "mailgate_messages_rejected_total{code=552}"
    assert after[key] - before.get(key, 0) == 1
    assert after["mailgate_messages_accepted_total"] == before["mailgate_messages_accepted_total"]


def test_no_personal_data_in_health_or_metrics(daemon: SubprocessDaemon) -> None:
    send(daemon, "Olga <olga.private@example.org>")
    health_until(daemon, 200)
    text = get(daemon, "/metrics")[2].decode() + get(daemon, "/healthz")[2].decode()
    assert "olga" not in text.lower() and "example.org" not in text


def test_a_locked_store_fails_then_recovers(daemon: SubprocessDaemon) -> None:
    """Another process holds the database's write lock (an operator's sqlite3 shell, say):
    reads still answer under WAL, but no mail could be committed. /healthz says 503 with the
    store's reason, and 200 again once the lock is let go."""
    holder = sqlite3.connect(daemon.database, timeout=30, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        status, body = health(daemon)
        assert status == 503, body
        assert body["status"] == "failing"
        assert body["checks"]["store"] == {"ok": False, "reason": "no answer within 2 s"}
        assert body["checks"]["smtp"]["ok"] is True
        status, body = health(daemon)  # asked again: still the same write waiting, no pile-up
        assert status == 503 and body["checks"]["store"]["ok"] is False
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert health_until(daemon, 200)["checks"]["store"] == {"ok": True}


def test_a_message_waiting_for_ingest_past_the_limit_fails_the_backlog(
    daemon: SubprocessDaemon,
) -> None:
    """A mail whose sender's DNS never answers stays 'received' while its checks wait: with
    a limit of 0 s it is behind at once (503), and once decided (past `retry_for`) and
    ingested, /healthz is back to 200."""
    send(daemon, f"Dan <dan@{SLOW}>")
    status, body = health(daemon)
    assert status == 503, body
    backlog = body["checks"]["backlog"]
    assert (backlog["ok"], backlog["reason"], backlog["messages"]) == (
        False,
        "ingest is behind",
        1,
    )
    assert body["checks"]["store"] == {"ok": True} and body["checks"]["smtp"] == {"ok": True}
    before = scrape(daemon)["mailgate_tickets_created_total"]
    scrape_until(daemon, lambda m: m["mailgate_tickets_created_total"] > before)
    assert health_until(daemon, 200)["checks"]["backlog"]["messages"] == 0


def test_a_full_smtp_listener_fails_the_smtp_check(daemon: SubprocessDaemon) -> None:
    """Every connection the listener allows is taken: the probe is greeted with 421."""
    held = [socket.create_connection(("127.0.0.1", daemon.port)) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in held:
            assert sock.recv(100).startswith(b"220")
        status, body = health(daemon)
        assert status == 503, body
        assert body["checks"]["smtp"] == {"ok": False, "reason": "greeted with 421, not 220"}
    finally:
        for sock in held:
            sock.close()
    health_until(daemon, 200)


def test_health_checks_asked_at_once_share_one_smtp_probe(daemon: SubprocessDaemon) -> None:
    """/healthz answers anyone: many requests at once must not take as many SMTP sessions.
    With one session free, twenty requests at once all see the listener accept."""
    held = [
        socket.create_connection(("127.0.0.1", daemon.port)) for _ in range(MAX_CONNECTIONS - 1)
    ]
    try:
        for sock in held:
            assert sock.recv(100).startswith(b"220")
        with ThreadPoolExecutor(max_workers=20) as pool:
            answers = list(pool.map(lambda _: health(daemon), range(20)))
    finally:
        for sock in held:
            sock.close()
    assert [status for status, _ in answers] == [200] * 20, answers


def test_metrics_answer_only_allowed_clients_and_never_through_a_proxy(
    daemon: SubprocessDaemon,
) -> None:
    status, _, body = get(daemon, "/metrics", source="127.0.0.2")
    assert (status, body) == (403, b"forbidden\n")
    for header in ("X-Forwarded-For", "Forwarded"):
        status, _, _ = get(daemon, "/metrics", headers={header: "127.0.0.1"})
        assert status == 403
    assert get(daemon, "/healthz", source="127.0.0.2")[0] == 200  # health is for anyone
    assert get(daemon, "/metrics")[0] == 200


def test_the_config_names_a_bad_metrics_network(tmp_path: Path) -> None:
    path = write_config(tmp_path, http_extra='metrics_from = ["10.0.0.1/8"]\n')
    result = run_cli("--config", str(path), "check-config")
    assert result.returncode == 78
    assert "http.metrics_from" in result.stderr
