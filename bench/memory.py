"""Peak memory of a real `mailgate serve` with every session sending a maximum-size message.

Run from the repository root:

    .venv/bin/python bench/memory.py   # 100 x 2 MiB, 4 x 25 MiB, 100 x 25 MiB, 2 x 25 MiB empty
    .venv/bin/python bench/memory.py --quick    # 20 x 2 MiB, 2 x 25 MiB, 1 x 10 MiB empty
    .venv/bin/python bench/memory.py --run 100x25 --run 1x25:empty  # connections x MiB

What bounds the daemon's memory is `max_connections` x about one read buffer: DATA is read in
pieces, a message past 1 MiB goes to an unnamed spool file as it arrives and is copied into
the database by the commit, and ingest leaves the raw bytes to the parser process, which
reads them from the database one message at a time (it used to be `max_connections` x
`max_message_size`: every message was held whole until committed); 100 x 25 MiB, the
defaults at their worst, is the scenario that shows it. Each scenario starts a fresh daemon
(fresh temp dir and config, `max_connections` and `max_connections_per_ip` set to the
number of connections), opens all connections, sends one message of just under
`max_message_size` on each at the same time (a base64 attachment, as large mail usually is),
waits for every 250 and for ingest to turn every message into a ticket, then reads the peak
RSS (VmHWM in /proc/<pid>/status) of the daemon and of each child process (the parser).
With authentication on (the default; `--no-auth` to compare), every message is DKIM-signed
(dkimpy) by example.org, whose key, SPF and DMARC record a DNS stub on loopback serves
(tests/dns_stub.py, in a thread of this process): the daemon looks them up and the parser
process verifies each signature over the whole body. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
RCPT = "support@example.com"
TIMEOUT = 120.0

CONFIG = """\
[smtp]
listen = "127.0.0.1:{port}"
hostname = "bench.localhost"
accept = ["support@example.com"]
max_message_size = {size}
max_connections = {conns}
max_connections_per_ip = {conns}
[storage]
database = "var/mailgate.db"
attachments = "var/attachments"
[outbound]
transport = "file"
directory = "var/outbox"
sender = "support@example.com"
templates = "{templates}"
acknowledge = false
[http]
listen = "127.0.0.1:0"
[auth]
enabled = {auth}
nameservers = ["127.0.0.1:{dns_port}"]
[log]
level = "warning"
"""


@dataclass
class Scenario:
    connections: int
    size: int  # max_message_size, bytes
    shape: str = "base64"  # or "empty": nothing but empty lines, the most lines per byte


@dataclass
class Result:
    scenario: Scenario
    accepted: int
    wall_s: float
    start_kib: int
    daemon_kib: int
    intake_kib: int  # highest sampled daemon RSS until the last 250
    children_kib: dict[str, int]

    @property
    def total_kib(self) -> int:
        return self.daemon_kib + sum(self.children_kib.values())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class Sampler(threading.Thread):
    """Samples a process's RSS every 5 ms (VmHWM has no phases; this tells intake apart)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_kib = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.005):
            self.peak_kib = max(self.peak_kib, status_kib(self.pid, "VmRSS"))

    def __enter__(self) -> Sampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join()


def children(pid: int) -> dict[int, str]:
    """Descendant processes of `pid` with a short name (parser, resource tracker)."""
    found: dict[int, str] = {}
    parents = {pid}
    for _ in range(3):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in found:
                continue
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if int(stat[1]) in parents:
                name = "resource tracker" if "resource_tracker" in cmdline else "parser"
                found[int(entry.name)] = name
        parents |= set(found)
    return found


def message(n: int, scenario: Scenario, attachment: bytes) -> bytes:
    """A customer mail of just under the size limit on the wire (CRLF lines).

    base64: a text part and a base64 attachment, as large mail usually is. empty: headers and
    empty lines, the hostile shape (aiosmtpd 1.4.6 alone spent ~90 bytes on each line).
    """
    size = scenario.size
    if scenario.shape == "empty":
        head = f"From: customer{n}@example.org\r\nTo: {RCPT}\r\nSubject: Empty {n}\r\n\r\n"
        return head.encode() + b"\r\n" * ((size - len(head) - 4096) // 2)
    head_bytes = (
        f"From: Customer {n} <customer{n}@example.org>\r\n"
        f"To: {RCPT}\r\nSubject: Big attachment {n}\r\n"
        f"Message-ID: <memory.{n}.{time.time_ns()}@example.org>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nSee the attachment.\r\n"
        "--b\r\nContent-Type: application/octet-stream\r\n"
        'Content-Disposition: attachment; filename="dump.bin"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    tail = b"\r\n--b--\r\n"
    room = size - len(head_bytes) - len(tail) - 4096  # margin under the limit
    lines = room // 78  # 76 base64 characters + CRLF
    encoded = base64.b64encode(attachment[: lines * 57])
    body = b"\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    data = head_bytes + body + tail
    assert len(data) < size
    return data


async def reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed by the server")
        if line[3:4] != b"-":
            return line


async def send_one(port: int, data: bytes, ready: asyncio.Barrier) -> bool:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        steps = [b"EHLO bench.localhost", b"MAIL FROM:<customer@example.org>", b"RCPT TO:<%s>"]
        assert (await reply(reader)).startswith(b"220")
        for step in steps:
            writer.write((step % RCPT.encode() if b"%s" in step else step) + b"\r\n")
            assert (await reply(reader)).startswith(b"250"), step
        writer.write(b"DATA\r\n")
        assert (await reply(reader)).startswith(b"354")
        await ready.wait()  # every session is in DATA: all messages are in memory at once
        writer.write(data + b".\r\n")
        await writer.drain()
        return (await reply(reader)).startswith(b"250")
    finally:
        writer.close()


def wait_ingested(database: Path, count: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        while time.monotonic() < deadline:
            (pending,) = db.execute(
                "SELECT count(*) FROM inbound WHERE state = 'received'"
            ).fetchone()
            (total,) = db.execute("SELECT count(*) FROM inbound").fetchone()
            if total >= count and not pending:
                return
            time.sleep(0.1)
    raise TimeoutError("ingest did not finish")


def start_daemon(
    folder: Path, scenario: Scenario, dns_port: int | None
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = folder / "config.toml"
    config.write_text(
        CONFIG.format(
            port=port,
            size=scenario.size,
            conns=scenario.connections,
            templates=ROOT / "templates",
            auth="true" if dns_port else "false",
            dns_port=dns_port or 53,
        )
    )
    log = (folder / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailgate", "--config", str(config), "serve"],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((folder / "daemon.log").read_text())
        try:
            with socket.create_connection((HOST, port), timeout=2) as sock:
                if sock.recv(100).startswith(b"220"):
                    return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("daemon did not start")


async def run(scenario: Scenario, attachment: bytes, signer: Signer | None) -> Result:
    with tempfile.TemporaryDirectory(prefix="mailgate-memory-") as tmp:
        folder = Path(tmp)
        proc, port = start_daemon(folder, scenario, signer.dns_port if signer else None)
        try:
            await asyncio.sleep(1.0)  # the parser child finishes importing
            start_kib = status_kib(proc.pid, "VmRSS")
            ready = asyncio.Barrier(scenario.connections)
            messages = [message(n, scenario, attachment) for n in range(scenario.connections)]
            if signer is not None:
                messages = [signer.sign(m) for m in messages]
            began = time.monotonic()
            with Sampler(proc.pid) as sampler:
                async with asyncio.timeout(TIMEOUT):
                    outcomes = await asyncio.gather(*(send_one(port, m, ready) for m in messages))
            intake_kib = sampler.peak_kib
            del messages
            accepted = sum(outcomes)
            await asyncio.to_thread(wait_ingested, folder / "var" / "mailgate.db", accepted)
            wall = time.monotonic() - began
            daemon_kib = status_kib(proc.pid, "VmHWM")
            kids = {
                f"{name} {pid}": status_kib(pid, "VmHWM")
                for pid, name in children(proc.pid).items()
            }
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    return Result(scenario, accepted, wall, start_kib, daemon_kib, intake_kib, kids)


@dataclass
class Signer:
    """example.org's DKIM key, published with SPF and DMARC on a DNS stub on loopback."""

    private_pem: bytes
    dns_port: int

    @classmethod
    def start(cls, folder: Path) -> Signer:
        sys.path.insert(0, str(ROOT))
        from tests.dns_stub import dkim_key_pair, shared_dns_stub

        private, record = dkim_key_pair(folder, 2048)
        stub, port = shared_dns_stub()
        stub.txt("sel._domainkey.example.org", record)
        stub.txt("_dmarc.example.org", "v=DMARC1; p=reject")
        stub.txt("example.org", "v=spf1 ip4:127.0.0.0/8 -all")
        return cls(private, port)

    def sign(self, data: bytes) -> bytes:
        import dkim

        signature = dkim.sign(data, b"sel", b"example.org", self.private_pem, linesep=b"\r\n")
        return bytes(signature) + data


def mib(kib: int) -> str:
    return f"{kib / 1024:8.1f}"


def print_table(results: list[Result]) -> None:
    print()
    print(
        f"{'conns':>5} {'size MiB':>8} {'shape':>6} {'accepted':>8} {'wall s':>6} {'start':>8} "
        f"{'intake':>8} {'daemon':>8} {'parser':>8} {'total':>8} {'intake/data':>11}"
    )
    for r in results:
        s = r.scenario
        parser = sum(v for k, v in r.children_kib.items() if k.startswith("parser"))
        held = s.connections * s.size / 1024  # KiB
        ratio = (r.intake_kib - r.start_kib) / held
        print(
            f"{s.connections:>5} {s.size / MIB:>8.0f} {s.shape:>6} {r.accepted:>8} "
            f"{r.wall_s:>6.1f} "
            f"{mib(r.start_kib)} {mib(r.intake_kib)} {mib(r.daemon_kib)} {mib(parser)} "
            f"{mib(r.total_kib)} {ratio:>11.2f}"
        )
    print("\nMiB. start: daemon RSS before the load; intake: highest daemon RSS sampled until")
    print("the last 250; daemon, parser: peak RSS (VmHWM) over the run, ingest included;")
    print("total: daemon + children peaks; intake/data: (intake - start) / (conns x size).")


def parse_scenario(text: str) -> Scenario:
    counts, _, shape = text.lower().partition(":")
    conns, size = counts.split("x")
    return Scenario(int(conns), int(size) * MIB, shape or "base64")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer connections")
    parser.add_argument(
        "--run",
        metavar="CONNSxMIB[:empty]",
        action="append",
        help="a scenario of your own, such as 20x25 or 2x25:empty (repeatable)",
    )
    parser.add_argument("--no-auth", action="store_true", help="authentication off")
    args = parser.parse_args()
    keys = tempfile.TemporaryDirectory(prefix="mailgate-memory-key-")
    signer = None if args.no_auth else Signer.start(Path(keys.name))
    print(f"authentication {'off' if signer is None else 'on (signed mail, DNS stub)'}")
    if args.run:
        scenarios = [parse_scenario(run) for run in args.run]
    elif args.quick:
        scenarios = [Scenario(20, 2 * MIB), Scenario(2, 25 * MIB), Scenario(1, 10 * MIB, "empty")]
    else:
        scenarios = [
            Scenario(100, 2 * MIB),
            Scenario(4, 25 * MIB),
            Scenario(100, 25 * MIB),
            Scenario(2, 25 * MIB, "empty"),
        ]
    attachment = random.Random(4).randbytes(max(s.size for s in scenarios))
    results = []
    for scenario in scenarios:
        print(
            f"{scenario.connections} x {scenario.size // MIB} MiB ({scenario.shape}) ...",
            end=" ",
            flush=True,
        )
        results.append(asyncio.run(run(scenario, attachment, signer)))
        print(f"{results[-1].wall_s:.1f} s")
    print_table(results)
    failed = [r for r in results if r.accepted != r.scenario.connections]
    if failed:
        sys.exit(f"not every message was accepted: {[r.accepted for r in failed]}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
