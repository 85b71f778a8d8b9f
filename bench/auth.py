"""250 -> ticket with sender authentication on, against a DNS stub that answers slowly or loses.

Run from the repository root:

    .venv/bin/python bench/auth.py              # 1,000 mails, ~1-2 min on 2 cores
    .venv/bin/python bench/auth.py --messages 200

A real `mailgate serve` (subprocess) gets 1,000 mails from 1,000 domains over 10 connections.
Each domain publishes a DKIM key, SPF for loopback and DMARC p=reject on a DNS stub on
loopback (tests/dns_stub.py, in a thread of this process) that holds every answer back 20 ms;
each mail is signed (dkimpy), so every message costs three lookups and a verification. The
run is done twice, with every answer and with one answer in five lost, and reports 250 ->
ticket p50/p99 and the time until all are tickets, side by side. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dkim
import intake  # bench/intake.py: the load generator, server process and ticket statistics

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.dns_stub import DnsStub, dkim_key_pair, shared_dns_stub  # noqa: E402

CONFIG = """\
[smtp]
listen = "127.0.0.1:{smtp_port}"
hostname = "bench.localhost"
accept = ["support@example.com"]
max_connections_per_ip = 100
[storage]
database = "var/mailgate.db"
attachments = "var/attachments"
[outbound]
transport = "file"
directory = "var/outbox"
sender = "support@example.com"
templates = "{templates}"
[http]
listen = "127.0.0.1:{http_port}"
[auth]
enabled = true
nameservers = ["127.0.0.1:{dns_port}"]
[log]
level = "warning"
"""


def publish(stub: DnsStub, domains: list[str], record: str) -> None:
    for domain in domains:
        stub.records.pop((f"sel._domainkey.{domain}", "TXT"), None)
        stub.txt(f"sel._domainkey.{domain}", record)
        stub.records.pop((f"_dmarc.{domain}", "TXT"), None)
        stub.txt(f"_dmarc.{domain}", "v=DMARC1; p=reject")
        stub.records.pop((domain, "TXT"), None)
        stub.txt(domain, "v=spf1 ip4:127.0.0.0/8 -all")


def signed_messages(tag: str, domains: list[str], private: bytes) -> list[tuple[str, bytes]]:
    out = []
    for n, domain in enumerate(domains):
        _sender, message = intake.make_message(tag, n)
        sender = f"customer{n}@{domain}"
        message = message.replace(f"customer{n}@example.org".encode(), sender.encode())
        signature = dkim.sign(message, b"sel", domain.encode(), private, linesep=b"\r\n")
        out.append((sender, bytes(signature) + message))
    return out


async def send_all(port: int, messages: list[tuple[str, bytes]], conns: int) -> dict[str, float]:
    """Send over `conns` connections; the wall-clock time of each 250, by queue id."""
    t250: dict[str, float] = {}
    clients = [intake.RawClient() for _ in range(conns)]
    await asyncio.gather(*(c.connect(port) for c in clients))

    async def worker(client: intake.RawClient, batch: list[tuple[str, bytes]]) -> None:
        for sender, data in batch:
            code, text = await client.send(sender, data)
            found = intake.QUEUED_RE.search(text)
            if code == 250 and found:
                t250[found.group(1).decode()] = time.time()

    await asyncio.gather(*(worker(c, messages[i::conns]) for i, c in enumerate(clients)))
    await asyncio.gather(*(c.close() for c in clients))
    return t250


def run(
    label: str, stub: DnsStub, dns_port: int, n: int, private: bytes, tmp: Path
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"auth-{label}-", dir=tmp))
    port, http_port = intake.free_port(), intake.free_port()
    config = workdir / "config.toml"
    config.write_text(
        CONFIG.format(
            smtp_port=port, http_port=http_port, dns_port=dns_port, templates=ROOT / "templates"
        )
    )
    tag = f"{label}-{time.time_ns()}"
    domains = [f"{label}{i}-mail.net" for i in range(n)]
    messages = signed_messages(tag, domains, private)
    server = intake.ServerProcess("mailgate", intake.mailgate_cmd(config), port, workdir)
    server.start()
    try:
        lost_before, asked_before = stub.lost, len(stub.queries)
        started = time.time()
        t250 = asyncio.run(send_all(port, messages, 10))
        drained = intake.wait_for_tickets(workdir / "var" / "mailgate.db", len(t250), server)
        stats = intake.ticket_stats(t250, drained)
        stats.pop("_deltas", None)
        if "rows" in drained:
            stats["all_tickets_s"] = max(float(p) for _i, p in drained["rows"]) - started
        stats["dns_queries"] = len(stub.queries) - asked_before
        stats["dns_lost"] = stub.lost - lost_before
        stats["peak_rss_kib"] = server.peak_rss_kib()
        con = sqlite3.connect(f"file:{workdir}/var/mailgate.db?mode=ro", uri=True)
        stats["trust"] = dict(
            con.execute(
                "SELECT json_extract(auth, '$.trust'), count(*) FROM messages GROUP BY 1"
            ).fetchall()
        )
        con.close()
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--delay", type=float, default=0.02, help="seconds per DNS answer")
    parser.add_argument("--output", default=str(intake.BENCH_DIR / "auth-results.json"))
    args = parser.parse_args()
    stub, dns_port = shared_dns_stub()
    stub.delay = args.delay
    tmp = Path(tempfile.mkdtemp(prefix="mailgate-auth-bench-"))
    try:
        private, record = dkim_key_pair(tmp, 2048)
        results = {}
        for label, loss in (("clean", 0.0), ("lossy", 0.2)):
            publish(stub, [f"{label}{i}-mail.net" for i in range(args.messages)], record)
            stub.loss = loss
            results[label] = run(label, stub, dns_port, args.messages, private, tmp)
            r = results[label]
            print(
                f"{label:6} {loss:.0%} of answers lost: 250->ticket"
                f" p50 {intake.fmt(r.get('p50_ms'), '.0f')} ms"
                f"  p99 {intake.fmt(r.get('p99_ms'), '.0f')} ms"
                f"  all {args.messages} tickets {intake.fmt(r.get('all_tickets_s'), '.1f')} s"
                f"  (DNS queries {r['dns_queries']}, lost {r['dns_lost']}; trust {r['trust']};"
                f" peak RSS {(r['peak_rss_kib'] or 0) // 1024} MiB)"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.output).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
