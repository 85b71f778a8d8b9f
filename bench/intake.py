"""SMTP intake benchmark: mailgate vs. a discard-everything aiosmtpd baseline.

Run from the repository root:

    .venv/bin/python bench/intake.py            # default run (~3-4 min on 2 cores)
    .venv/bin/python bench/intake.py --quick    # ~30 s smoke run
    .venv/bin/python bench/intake.py --messages 3000 --rounds 5
    .venv/bin/python bench/intake.py --tls      # STARTTLS: 1 and 20 messages a session
    .venv/bin/python bench/intake.py --targets discard,nometrics,mailgate --conns 10,50

Targets: discard (aiosmtpd, drops the mail), mailgate, plaintext (mailgate with its cipher
nulled), nometrics (its metrics calls nulled), discard-tls and mailgate-tls (STARTTLS
offered, with a throwaway trustme certificate, and taken by the client in every session).
`--per-session N` (default 0: one session per connection, opened before the clock) has
each connection QUIT and reconnect every N messages, handshakes inside the clock.

For each concurrency level (1, 10, 50 SMTP connections) and each round, the
two targets are measured back to back, alternating (discard, mailgate,
discard, mailgate, ...) because the machine is noisy.  Every measurement gets
a freshly started server subprocess (mailgate: fresh temp dir + config); the
load generator runs in this process, so client and server are on different
cores.  Each connection sends many messages in one session
(MAIL/RCPT/DATA repeated, no pipelining).

Measured per run: messages/s (accepted messages / time from first MAIL to the
last 250), time-to-250 per message (MAIL FROM sent -> final 250 after DATA),
server CPU time per message, client CPU utilisation (to check that the load
generator is not the bottleneck) and the server's peak RSS (VmHWM).  For
mailgate it additionally waits for all queued messages to become tickets
(polling the SQLite database read-only) and computes time from the 250 to
the ticket (inbound.processed_at - client wall clock at the 250) and the
drain time (last processed_at - last 250).

Results are printed as a table and written to bench/results.json.
Only 127.0.0.1 is ever used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from email.utils import formatdate
from pathlib import Path
from typing import Any, Protocol

HOST = "127.0.0.1"  # loopback only, never anything else
BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
VENV_BIN = ROOT / ".venv" / "bin"
RCPT = "support@example.com"
MSG_SIZE = 2048
COMMAND_TIMEOUT = 30.0  # per message transaction
READY_TIMEOUT = 30.0
DRAIN_TIMEOUT = 120.0
QUEUED_RE = re.compile(rb"Queued as <?([^\s>]+)>?", re.IGNORECASE)
CLK_TCK = os.sysconf("SC_CLK_TCK")
TARGETS = ("discard", "plaintext", "nometrics", "mailgate", "discard-tls", "mailgate-tls")
MAILGATES = ("plaintext", "nometrics", "mailgate", "mailgate-tls")
TLS_TARGETS = ("discard-tls", "mailgate-tls")  # the server offers STARTTLS, the client takes it
# Each target's baseline for the "ratio" column, and the named cost ratios of the summary.
BASELINES = {t: "discard" for t in ("plaintext", "nometrics", "mailgate")} | {
    "mailgate-tls": "discard-tls"
}
COST_RATIOS = {  # name: (numerator, denominator) of msgs/s
    "sealing": ("mailgate", "plaintext"),
    "metrics": ("mailgate", "nometrics"),
    "tls": ("mailgate-tls", "mailgate"),
    "tls (discard)": ("discard-tls", "discard"),
}
NULLED = BENCH_DIR / "nulled"  # sitecustomize: the plaintext and nometrics builds
TLS_HOSTNAME = "localhost"  # the name the throwaway certificate is issued for

CONFIG_TEMPLATE = """\
[smtp]
listen = "127.0.0.1:{smtp_port}"
hostname = "bench.localhost"
accept = ["support@example.com"]
max_message_size = 10485760
# All load comes from 127.0.0.1: lift the per-IP limit (default 20) above the 50 connections.
max_connections_per_ip = 100
{smtp_tls}[storage]
database = "var/mailgate.db"
attachments = "var/attachments"
[outbound]
transport = "file"
directory = "var/outbox"
relay = "127.0.0.1:2525"
sender = "support@example.com"
templates = "{templates}"
[http]
listen = "127.0.0.1:{http_port}"
base_url = "http://127.0.0.1:{http_port}"
[auth]
enabled = false
[log]
level = "warning"
"""

# --------------------------------------------------------------------------
# messages

_BODY_WORDS = (
    "hello support team I ordered a replacement part last week and the tracking "
    "page still says the parcel is waiting at the depot could you please check "
    "what is going on and let me know when I can expect delivery the invoice "
    "number is in the subject line and I have attached nothing to this mail "
    "thanks in advance for your help best regards"
).split()


def _body(n: int, target_len: int) -> str:
    lines: list[str] = []
    size = 0
    i = n % len(_BODY_WORDS)
    line: list[str] = []
    while size < target_len:
        w = _BODY_WORDS[i % len(_BODY_WORDS)]
        i += 1
        if sum(len(x) + 1 for x in line) + len(w) > 72:
            text = " ".join(line)
            lines.append(text)
            size += len(text) + 2
            line = []
        line.append(w)
    return "\r\n".join(lines)


def make_message(tag: str, n: int) -> tuple[str, bytes]:
    """A ~2 KB plain-text customer mail with realistic headers (CRLF, no line starts with '.')."""
    sender = f"customer{n}@example.org"
    headers = (
        f"Return-Path: <{sender}>\r\n"
        f"Received: from mail.example.org (mail.example.org [192.0.2.10])\r\n"
        f"\tby mx.example.com (Postfix) with ESMTPS id 4Xb{n:08d}\r\n"
        f"\tfor <{RCPT}>; {formatdate(localtime=False)}\r\n"
        f"Authentication-Results: mx.example.com; spf=pass smtp.mailfrom=example.org;\r\n"
        f"\tdkim=none (no signature); dmarc=none header.from=example.org\r\n"
        f"X-Originating-IP: [198.51.100.{n % 250 + 1}]\r\n"
        f"Date: {formatdate(localtime=False)}\r\n"
        f'From: "Customer {n}" <{sender}>\r\n'
        f"To: Support <{RCPT}>\r\n"
        f"Subject: Order #{100000 + n}: where is my replacement part?\r\n"
        f"Message-ID: <{tag}.{n}@example.org>\r\n"
        f"MIME-Version: 1.0\r\n"
        f'Content-Type: text/plain; charset="utf-8"; format=flowed\r\n'
        f"Content-Transfer-Encoding: 7bit\r\n"
        f"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Thunderbird/128.5.0\r\n"
        f"Content-Language: en-US\r\n"
        f"\r\n"
    )
    body = _body(n, max(200, MSG_SIZE - len(headers) - 40))
    msg = (headers + f"Hi,\r\n\r\n{body}\r\n\r\n-- \r\nCustomer {n}\r\n").encode("ascii")
    assert not any(line.startswith(b".") for line in msg.split(b"\r\n"))
    return sender, msg


# --------------------------------------------------------------------------
# SMTP clients


class SMTPError(Exception):
    pass


Result = dict[str, Any]


class Client(Protocol):
    async def connect(self, port: int, tls: ssl.SSLContext | None = None) -> None: ...
    async def send(self, sender: str, data: bytes) -> tuple[int, bytes]: ...
    async def close(self) -> None: ...


class RawClient:
    """Minimal SMTP client on asyncio streams: one command, one reply, no pipelining."""

    def __init__(self) -> None:
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter

    async def _reply(self) -> tuple[int, bytes]:
        last = b""
        texts = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise SMTPError("connection closed by server")
            texts.append(line[4:].rstrip())
            last = line
            if line[3:4] != b"-":
                break
        return int(last[:3]), b" ".join(texts)

    async def connect(self, port: int, tls: ssl.SSLContext | None = None) -> None:
        """Greeting and EHLO; with `tls`, STARTTLS and EHLO again over the encrypted stream."""
        async with asyncio.timeout(COMMAND_TIMEOUT):
            self.reader, self.writer = await asyncio.open_connection(HOST, port)
            code, text = await self._reply()
            if code != 220:
                raise SMTPError(f"banner {code} {text!r}")
            await self._command(b"EHLO loadgen.localhost", 250)
            if tls is not None:
                await self._command(b"STARTTLS", 220)
                await self.writer.start_tls(tls, server_hostname=TLS_HOSTNAME)
                await self._command(b"EHLO loadgen.localhost", 250)

    async def _command(self, line: bytes, expected: int) -> None:
        self.writer.write(line + b"\r\n")
        code, text = await self._reply()
        if code != expected:
            raise SMTPError(f"{line.decode()} {code} {text!r}")

    async def send(self, sender: str, data: bytes) -> tuple[int, bytes]:
        """Returns the final (code, text); on a rejection earlier in the
        transaction, sends RSET and returns that rejection."""
        w = self.writer
        w.write(b"MAIL FROM:<%s>\r\n" % sender.encode())
        code, text = await self._reply()
        if code == 250:
            w.write(b"RCPT TO:<%s>\r\n" % RCPT.encode())
            code, text = await self._reply()
            if code in (250, 251):
                w.write(b"DATA\r\n")
                code, text = await self._reply()
                if code == 354:
                    w.write(data)
                    w.write(b".\r\n")
                    return await self._reply()
        w.write(b"RSET\r\n")
        await self._reply()
        return code, text

    async def close(self) -> None:
        with contextlib.suppress(OSError, SMTPError, TimeoutError):
            async with asyncio.timeout(5):
                self.writer.write(b"QUIT\r\n")
                await self._reply()
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


class AioSMTPLibClient:
    """Same interface on top of aiosmtplib.SMTP (one object per connection)."""

    async def connect(self, port: int, tls: ssl.SSLContext | None = None) -> None:
        import aiosmtplib

        self.smtp = aiosmtplib.SMTP(
            hostname=HOST,
            port=port,
            timeout=COMMAND_TIMEOUT,
            use_tls=False,
            start_tls=False,
            local_hostname="loadgen.localhost",
        )
        await self.smtp.connect()
        await self.smtp.ehlo()
        if tls is not None:
            await self.smtp.starttls(tls_context=tls, server_hostname=TLS_HOSTNAME)

    async def send(self, sender: str, data: bytes) -> tuple[int, bytes]:
        import aiosmtplib

        try:
            await self.smtp.mail(sender)
            await self.smtp.rcpt(RCPT)
            resp = await self.smtp.data(data)
        except aiosmtplib.SMTPResponseException as e:
            with contextlib.suppress(aiosmtplib.SMTPException):
                await self.smtp.rset()
            return e.code, e.message.encode()
        return resp.code, resp.message.encode()

    async def close(self) -> None:
        import aiosmtplib

        try:
            await self.smtp.quit(timeout=5)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            self.smtp.close()


CLIENTS: dict[str, type[Client]] = {"raw": RawClient, "aiosmtplib": AioSMTPLibClient}


# --------------------------------------------------------------------------
# load generation


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def proc_cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime, all threads
    except (OSError, IndexError, ValueError):
        return None


def proc_status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])  # kB
    except (OSError, ValueError):
        pass
    return None


async def run_load(
    port: int,
    conns: int,
    n_messages: int,
    client_kind: str,
    tag: str,
    server_pid: int,
    max_seconds: float,
    per_session: int = 0,
    tls: ssl.SSLContext | None = None,
) -> Result:
    """`conns` connections at once share the messages. per_session 0: each connection is one
    session, opened before the clock starts; N: each connection opens a session (STARTTLS
    too, with `tls`), sends N messages and QUITs, over and over, all inside the clock."""
    msgs = [make_message(tag, i) for i in range(n_messages)]
    per_conn = [msgs[i::conns] for i in range(conns)]
    clients: list[Client | None] = [None] * conns  # each connection's open session
    if not per_session:
        clients = [CLIENTS[client_kind]() for _ in range(conns)]
        await asyncio.gather(*(c.connect(port, tls) for c in clients if c is not None))

    latencies: list[float] = []
    t250: dict[str, float] = {}  # queue id -> time.time() when the 250 arrived
    replies_without_id: list[str] = []
    errors: list[str] = []
    ends: list[float] = []
    not_sent = 0

    async def session(i: int) -> Client:
        """Close connection i's session, if open, and open a new one."""
        old, clients[i] = clients[i], None
        if old is not None:
            await old.close()
        client = CLIENTS[client_kind]()
        await client.connect(port, tls)
        clients[i] = client
        return client

    async def worker(i: int, batch: list[tuple[str, bytes]]) -> None:
        nonlocal not_sent
        perf = time.perf_counter
        wall = time.time
        client = clients[i]
        for k, (sender, data) in enumerate(batch):
            t0 = perf()
            if t0 > deadline:  # time budget for this run used up
                not_sent += len(batch) - k
                break
            try:
                async with asyncio.timeout(COMMAND_TIMEOUT):
                    if per_session and k % per_session == 0:
                        client = await session(i)
                        t0 = perf()  # the latency stays MAIL FROM -> 250; msgs/s has it all
                    assert client is not None
                    code, text = await client.send(sender, data)
            except (OSError, SMTPError, TimeoutError, ValueError) as e:
                # the connection is unusable now; count the rest of its batch as failed
                errors.append(f"{type(e).__name__}: {e}")
                errors.extend(["(skipped: connection lost)"] * (len(batch) - 1 - k))
                break
            if code == 250:
                tw = wall()
                latencies.append(perf() - t0)
                m = QUEUED_RE.search(text)
                if m:
                    t250[m.group(1).decode()] = tw
                elif len(replies_without_id) < 5:
                    replies_without_id.append(text.decode(errors="replace"))
                else:
                    replies_without_id.append("")
            else:
                errors.append(f"{code} {text.decode(errors='replace')}")
        if per_session and clients[i] is not None:  # the last QUIT is part of the work
            last, clients[i] = clients[i], None
            assert last is not None
            await last.close()
        ends.append(time.perf_counter())

    gc.collect()
    gc.disable()
    cpu0 = time.process_time()
    srv0 = proc_cpu_seconds(server_pid)
    t_start = time.perf_counter()
    deadline = t_start + max_seconds
    try:
        await asyncio.gather(*(worker(i, b) for i, b in enumerate(per_conn)))
    finally:
        t_end = max(ends) if ends else time.perf_counter()
        cpu1 = time.process_time()
        srv1 = proc_cpu_seconds(server_pid)
        gc.enable()
        left = [c.close() for c in clients if c is not None and not per_session]
        await asyncio.gather(*left, return_exceptions=True)

    wall = t_end - t_start
    ok = len(latencies)
    return {
        "messages": n_messages,
        "accepted": ok,
        "not_sent_time_budget": not_sent,
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "replies_without_queue_id": len(replies_without_id),
        "reply_samples_without_queue_id": [r for r in replies_without_id if r][:3],
        "wall_s": wall,
        "msgs_per_s": ok / wall if wall > 0 else 0.0,
        "p50_ms": (pct(latencies, 0.50) or 0) * 1e3,
        "p99_ms": (pct(latencies, 0.99) or 0) * 1e3,
        "max_ms": (max(latencies) if latencies else 0) * 1e3,
        "client_cpu_pct": 100 * (cpu1 - cpu0) / wall if wall > 0 else None,
        "server_cpu_ms_per_msg": (1e3 * (srv1 - srv0) / ok)
        if ok and srv0 is not None and srv1 is not None
        else None,
        "server_cpu_pct": (100 * (srv1 - srv0) / wall)
        if wall > 0 and srv0 is not None and srv1 is not None
        else None,
        "_t250": t250,
    }


# --------------------------------------------------------------------------
# servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class ServerProcess:
    def __init__(
        self, name: str, cmd: list[str], port: int, workdir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name, self.cmd, self.port, self.workdir = name, cmd, port, workdir
        self.env = env
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "wb")
        env = dict(self.env or os.environ, PYTHONUNBUFFERED="1")
        if self.cmd[1:3] == ["-m", "mailgate"]:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
            env=env,
        )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before "
                    f"becoming ready:\n{self.log_tail()}"
                )
            try:
                with socket.create_connection((HOST, self.port), timeout=2) as s:
                    s.settimeout(5)
                    banner = s.recv(512)
                    if banner.startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        try:
                            s.recv(512)
                        except OSError:
                            pass
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"{self.name} not ready on {HOST}:{self.port} after {READY_TIMEOUT}s:\n"
            f"{self.log_tail()}"
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def peak_rss_kib(self) -> int | None:
        return proc_status_kib(self.pid, "VmHWM")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                print(f"  ! {self.name} ignored SIGTERM for 15 s, sending SIGKILL", file=sys.stderr)
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()
        return self.proc.returncode

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def mailgate_cmd(config: Path) -> list[str]:
    exe = VENV_BIN / "mailgate"
    if exe.exists():
        return [str(exe), "--config", str(config), "serve"]
    # not installed into the venv: run it from the source tree (see ServerProcess.start)
    return [str(VENV_BIN / "python"), "-m", "mailgate", "--config", str(config), "serve"]


def fake_mailgate_cmd(config: Path) -> list[str]:
    return [
        sys.executable,
        str(BENCH_DIR / "discard_server.py"),
        "--fake-mailgate",
        "--config",
        str(config),
    ]


# --------------------------------------------------------------------------
# 250 -> ticket


def wait_for_tickets(db_path: Path, expected: int, server: ServerProcess) -> Result:
    """Poll the DB read-only until nothing is left in state 'received'."""
    uri = f"file:{db_path}?mode=ro"
    deadline = time.monotonic() + DRAIN_TIMEOUT
    last_err = None
    pending = total = None
    assert server.proc is not None
    while True:
        if server.proc.poll() is not None:
            rc = server.proc.returncode
            return {"error": f"mailgate exited ({rc}) while draining:\n{server.log_tail()}"}
        try:
            con = sqlite3.connect(uri, uri=True, timeout=5)
            try:
                pending = con.execute(
                    "SELECT count(*) FROM inbound WHERE state = 'received'"
                ).fetchone()[0]
                total = con.execute("SELECT count(*) FROM inbound").fetchone()[0]
                if pending == 0 and total >= expected:
                    rows = con.execute("SELECT id, processed_at FROM inbound").fetchall()
                    states = dict(
                        con.execute("SELECT state, count(*) FROM inbound GROUP BY state").fetchall()
                    )
                    return {"rows": rows, "states": states}
            finally:
                con.close()
            last_err = None
        except sqlite3.Error as e:
            last_err = f"{type(e).__name__}: {e}"
        if time.monotonic() > deadline:
            return {
                "error": f"not drained after {DRAIN_TIMEOUT:.0f}s: pending={pending} total={total} "
                f"expected>={expected} last_error={last_err}"
            }
        time.sleep(0.1)


def ticket_stats(t250: dict[str, float], drained: Result) -> Result:
    if "error" in drained:
        return {"error": drained["error"]}
    processed = {str(i): p for i, p in drained["rows"]}
    deltas = []
    unmatched = no_processed_at = 0
    for qid, tw in t250.items():
        if qid not in processed:
            unmatched += 1
        elif processed[qid] is None:
            no_processed_at += 1
        else:
            deltas.append(float(processed[qid]) - tw)
    out: Result = {
        "states": drained["states"],
        "matched": len(deltas),
        "unmatched_queue_ids": unmatched,
        "processed_at_null": no_processed_at,
        "_deltas": deltas,
    }
    if unmatched and t250:
        out["sample_queue_id"] = next(iter(t250))
        out["sample_db_ids"] = [str(r[0]) for r in drained["rows"][:3]]
    if deltas:
        last_250 = max(t250.values())
        last_proc = max(float(p) for p in processed.values() if p is not None)
        out.update(
            {
                "p50_ms": ms(pct(deltas, 0.5)),
                "p99_ms": ms(pct(deltas, 0.99)),
                "max_ms": max(deltas) * 1e3,
                "min_ms": min(deltas) * 1e3,
                "drain_s": last_proc - last_250,
            }
        )
    return out


# --------------------------------------------------------------------------
# orchestration


class Certificate:
    """A throwaway CA (trustme) and a certificate for TLS_HOSTNAME and 127.0.0.1, as PEM files
    for the servers and as a client context that trusts the CA only."""

    def __init__(self, folder: Path) -> None:
        import trustme

        ca = trustme.CA()
        issued = ca.issue_cert(TLS_HOSTNAME, HOST)
        self.cert, self.key = folder / "cert.pem", folder / "key.pem"
        issued.cert_chain_pems[0].write_to_path(str(self.cert))
        for pem in issued.cert_chain_pems[1:]:
            pem.write_to_path(str(self.cert), append=True)
        issued.private_key_pem.write_to_path(str(self.key))
        self.client = ssl.create_default_context()
        ca.configure_trust(self.client)


def run_one(
    target: str,
    conns: int,
    n: int,
    args: argparse.Namespace,
    tmp_root: Path,
    seq: int,
    per_session: int = 0,
) -> Result:
    workdir = Path(tempfile.mkdtemp(prefix=f"{target}-c{conns}-", dir=tmp_root))
    port = free_port()
    cert: Certificate | None = args.certificate if target in TLS_TARGETS else None
    if target.startswith("discard"):
        cmd = [sys.executable, str(BENCH_DIR / "discard_server.py"), "--port", str(port)]
        if cert is not None:
            cmd += ["--tls-cert", str(cert.cert), "--tls-key", str(cert.key)]
    else:
        http_port = free_port()
        while http_port == port:
            http_port = free_port()
        cfg = workdir / "config.toml"
        cfg.write_text(
            CONFIG_TEMPLATE.format(
                smtp_port=port,
                http_port=http_port,
                templates=ROOT / "templates",
                smtp_tls=f'tls_cert = "{cert.cert}"\ntls_key = "{cert.key}"\n' if cert else "",
            )
        )
        cmd = (fake_mailgate_cmd if args.self_test else mailgate_cmd)(cfg)
    env = None
    nulled = {"plaintext": "MAILGATE_BENCH_NULL_CIPHER", "nometrics": "MAILGATE_BENCH_NULL_METRICS"}
    if target in nulled:  # the same build with one part nulled (bench/nulled)
        env = {**os.environ, nulled[target]: "1", "PYTHONPATH": str(NULLED)}
    server = ServerProcess(target, cmd, port, workdir, env=env)
    tag = f"bench-{uuid.uuid4().hex[:12]}-{seq}"
    res: Result = {
        "target": target,
        "conns": conns,
        "per_session": per_session,
        "level": level_name(conns, per_session),
        "workdir": str(workdir),
    }
    server.start()
    try:
        res["startup_rss_kib"] = proc_status_kib(server.pid, "VmRSS")
        load = run_load(
            port,
            conns,
            n,
            args.client,
            tag,
            server.pid,
            args.max_seconds,
            per_session,
            cert.client if cert else None,
        )
        res.update(asyncio.run(load))
        t250 = res.pop("_t250")
        if target in MAILGATES:
            if not t250:
                err = "no '250 ... Queued as <ID>' replies, cannot match tickets"
                res["tickets"] = {"error": err}
            else:
                drained = wait_for_tickets(workdir / "var" / "mailgate.db", len(t250), server)
                res["tickets"] = ticket_stats(t250, drained)
        res["peak_rss_kib"] = server.peak_rss_kib()
    finally:
        rc = server.stop()
        res["exit_code"] = rc
        if rc not in (0, -signal.SIGTERM, None):
            res["log_tail"] = server.log_tail()
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return res


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def med(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def level_name(conns: int, per_session: int) -> str:
    """A level's label: "10" is 10 connections of one session each, "10x1" 10 connections
    of 1 message a session."""
    return f"{conns}x{per_session}" if per_session else str(conns)


def paired_ratio(runs: list[Result], level: str, num: str, den: str) -> Result:
    """num / den msgs/s within each round (the two measured back to back): median and range."""
    rounds: dict[int, dict[str, float]] = {}
    for r in runs:
        if r.get("level") == level and "msgs_per_s" in r:
            rounds.setdefault(r["round"], {})[r["target"]] = r["msgs_per_s"]
    ratios = sorted(p[num] / p[den] for p in rounds.values() if p.get(den) and num in p)
    return {
        "median": med(list(ratios)),
        "min": ratios[0] if ratios else None,
        "max": ratios[-1] if ratios else None,
    }


def summarise(runs: list[Result], levels: list[tuple[int, int]]) -> Result:
    summary: Result = {}
    for c, k in levels:
        level = level_name(c, k)
        row: Result = {}
        for t in TARGETS:
            rs = [r for r in runs if r.get("level") == level and r["target"] == t]
            rs = [r for r in rs if "msgs_per_s" in r]
            peak = max((r["peak_rss_kib"] for r in rs if r.get("peak_rss_kib")), default=None)
            rates = [r["msgs_per_s"] for r in rs]
            row[t] = {
                "rounds": len(rs),
                "msgs_per_s": med(rates),
                "msgs_per_s_min": min(rates, default=None),
                "msgs_per_s_max": max(rates, default=None),
                "p50_ms": med([r["p50_ms"] for r in rs]),
                "p99_ms": med([r["p99_ms"] for r in rs]),
                "server_cpu_ms_per_msg": med([r["server_cpu_ms_per_msg"] for r in rs]),
                "client_cpu_pct": med([r["client_cpu_pct"] for r in rs]),
                "peak_rss_mib": peak / 1024 if peak else None,
                "errors": sum(r["errors"] for r in rs),
            }
        # per target, against its baseline (discard, or discard-tls for mailgate-tls)
        row["ratio_to_baseline"] = {
            t: paired_ratio(runs, level, t, base) for t, base in BASELINES.items()
        }
        row["cost_ratios"] = {
            name: paired_ratio(runs, level, num, den) for name, (num, den) in COST_RATIOS.items()
        }
        deltas: list[float] = []
        drains: list[float | None] = []
        for r in runs:
            if (
                r.get("level") == level
                and r["target"] in MAILGATES
                and isinstance(r.get("tickets"), dict)
            ):
                deltas += r["tickets"].get("_deltas", [])
                drains.append(r["tickets"].get("drain_s"))
        row["ticket"] = {
            "matched": len(deltas),
            "p50_ms": ms(pct(deltas, 0.5)),
            "p99_ms": ms(pct(deltas, 0.99)),
            "max_ms": ms(max(deltas)) if deltas else None,
            "drain_s_median": med(drains),
        }
        summary[level] = row
    return summary


def problems_found(runs: list[Result], args: argparse.Namespace) -> list[str]:
    problems = []
    for r in runs:
        where = f"{r['target']} {r.get('level', r['conns'])} round {r.get('round', 0) + 1}"
        if r.get("fatal"):
            problems.append(f"{where}: {r['fatal']}")
        if r.get("not_sent_time_budget"):
            problems.append(
                f"{where}: time budget ({args.max_seconds:.0f}s) hit, "
                f"{r['not_sent_time_budget']} messages not sent"
            )
        if r.get("errors"):
            samples = r["error_samples"][:2]
            problems.append(f"{where}: {r['errors']} failed messages, e.g. {samples}")
        if r.get("replies_without_queue_id") and r["target"] in MAILGATES:
            problems.append(
                f"{where}: {r['replies_without_queue_id']} 250 replies without 'Queued as', "
                f"e.g. {r['reply_samples_without_queue_id'][:1]}"
            )
        tk = r.get("tickets") or {}
        if tk.get("error"):
            problems.append(f"{where}: tickets: {tk['error']}")
        if tk.get("unmatched_queue_ids"):
            problems.append(
                f"{where}: {tk['unmatched_queue_ids']} queue ids not found in inbound.id "
                f"(reply id {tk.get('sample_queue_id')!r}, db ids {tk.get('sample_db_ids')})"
            )
        odd_states = {k: v for k, v in (tk.get("states") or {}).items() if k != "ingested"}
        if odd_states and not args.self_test:
            problems.append(f"{where}: inbound rows not 'ingested': {odd_states}")
        if tk.get("processed_at_null"):
            problems.append(
                f"{where}: {tk['processed_at_null']} rows drained but processed_at is NULL "
                f"(states {tk.get('states')})"
            )
        if r.get("log_tail"):
            problems.append(f"{where}: exit code {r.get('exit_code')}; log tail:\n{r['log_tail']}")
        if (r.get("client_cpu_pct") or 0) > 85:
            problems.append(
                f"{where}: client CPU {r['client_cpu_pct']:.0f}% "
                "- the load generator may be the bottleneck"
            )
    return problems


def print_table(summary: Result, args: argparse.Namespace, problems: list[str]) -> None:
    print()
    print(
        f"SMTP intake, {MSG_SIZE // 1024} KB messages, client={args.client}, "
        f"{args.rounds} round(s), medians over rounds"
    )
    print("level: connections, or connections x messages per session (a new session each)")
    print("ratio: msgs/s over the baseline's (discard; discard-tls for mailgate-tls) in the")
    print("same round, median of the rounds; range: slowest-fastest round")
    hdr = (
        f"{'level':>5} {'target':<12} {'msgs/s':>8} {'range':>11} {'ratio':>6} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'srv ms/msg':>10} {'cli CPU%':>8} {'RSS MiB':>8} {'errors':>6}"
    )
    print(hdr)
    print("-" * len(hdr))
    for c, row in summary.items():
        for t in TARGETS:
            s = row[t]
            if not s["rounds"]:
                continue
            ratio = fmt(row["ratio_to_baseline"].get(t, {}).get("median"), ".2f")
            spread = f"{fmt(s['msgs_per_s_min'], '.0f')}-{fmt(s['msgs_per_s_max'], '.0f')}"
            print(
                f"{c:>5} {t:<12} {fmt(s['msgs_per_s'], '.0f'):>8} {spread:>11} "
                f"{ratio if t in BASELINES else '':>6} "
                f"{fmt(s['p50_ms'], '.2f'):>8} {fmt(s['p99_ms'], '.2f'):>8} "
                f"{fmt(s['server_cpu_ms_per_msg'], '.2f'):>10} "
                f"{fmt(s['client_cpu_pct'], '.0f'):>8} {fmt(s['peak_rss_mib'], '.1f'):>8} "
                f"{s['errors']:>6}"
            )
    print()
    for c, row in summary.items():
        for name, (num, den) in COST_RATIOS.items():
            r = row["cost_ratios"][name]
            if r["median"] is not None:
                print(
                    f"{c}: {name} cost, {num} / {den} msgs/s {fmt(r['median'], '.2f')} "
                    f"(rounds {fmt(r['min'], '.2f')}-{fmt(r['max'], '.2f')})"
                )
    print()
    print("mailgate: 250 -> ticket (rounds pooled); drain = last processed_at - last 250 (median)")
    hdr2 = f"{'conns':>5} {'matched':>8} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9} {'drain s':>8}"
    print(hdr2)
    print("-" * len(hdr2))
    for c, row in summary.items():
        t = row["ticket"]
        print(
            f"{c:>5} {t['matched']:>8} {fmt(t['p50_ms']):>9} {fmt(t['p99_ms']):>9} "
            f"{fmt(t['max_ms']):>9} {fmt(t['drain_s_median'], '.2f'):>8}"
        )
    if problems:
        print()
        print("problems:")
        for p in problems:
            print("  - " + p)


def progress_line(label: str, r: Result) -> str:
    if "msgs_per_s" not in r:
        return f"{label} FAILED: {r.get('fatal')}"
    line = (
        f"{label} {r['accepted']:>5}/{r['messages']} ok {r['msgs_per_s']:7.0f} msg/s "
        f"p50 {r['p50_ms']:6.2f} ms p99 {r['p99_ms']:7.2f} ms "
        f"cli {fmt(r['client_cpu_pct'], '.0f')}% srv {fmt(r['server_cpu_pct'], '.0f')}%"
    )
    tk = r.get("tickets")
    if tk and "p50_ms" in tk:
        line += (
            f"  250->ticket p50 {fmt(tk['p50_ms'])} ms p99 {fmt(tk['p99_ms'])} ms "
            f"drain {fmt(tk['drain_s'], '.2f')} s"
        )
    elif tk:
        line += f"  tickets: {tk.get('error') or tk}"
    return line


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="SMTP intake benchmark: mailgate vs discard baseline",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--messages",
        type=int,
        default=None,
        help="messages per round at 10/50 connections (1 connection gets a fifth); "
        "default 2500, 1000 with --quick",
    )
    ap.add_argument(
        "--rounds", type=int, default=None, help="rounds per level (default 3, 1 with --quick)"
    )
    ap.add_argument(
        "--conns", default=None, help="concurrency levels (default 1,10,50; 10 with --tls)"
    )
    ap.add_argument(
        "--per-session",
        default=None,
        help="messages per session, comma-separated: each connection opens a session, sends "
        "that many and QUITs, again and again (0: one session per connection, opened before "
        "the clock; default 0, 1,20 with --tls)",
    )
    ap.add_argument(
        "--tls",
        action="store_true",
        help="the cost of STARTTLS: targets discard, mailgate, discard-tls, mailgate-tls at "
        "10 connections, 1 and 20 messages a session (a trustme certificate); "
        "default 1000 messages a measurement",
    )
    ap.add_argument("--quick", action="store_true", help="~30 s smoke run")
    ap.add_argument(
        "--client",
        choices=sorted(CLIENTS),
        default="raw",
        help="load generator client (default raw asyncio streams: same client CPU per "
        "message as aiosmtplib at 10/50 conns, ~40%% less and lower latency at 1 conn)",
    )
    ap.add_argument(
        "--targets",
        default=None,
        help=f"comma-separated, any of {','.join(TARGETS)} (alternated in this order; default "
        "discard,plaintext,mailgate). plaintext is mailgate with its cipher nulled "
        "(bench/nulled), nometrics with its metrics calls nulled (bench/nulled); the "
        "-tls ones offer STARTTLS and the client takes it",
    )
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="stop sending new messages after this many seconds per measurement "
        "(default 25, 8 with --quick); keeps the run bounded if the target is slow",
    )
    ap.add_argument(
        "--output", default=None, help="default bench/results.json, tls-results.json with --tls"
    )
    ap.add_argument("--keep", action="store_true", help="keep per-run temp dirs (logs, DBs)")
    ap.add_argument(
        "--self-test",
        action="store_true",
        help="fake mailgate (discard_server.py --fake-mailgate) to validate the harness",
    )
    args = ap.parse_args()
    if args.output is None:
        args.output = str(BENCH_DIR / ("tls-results.json" if args.tls else "results.json"))
    if args.targets is None:
        tls_targets = "discard,mailgate,discard-tls,mailgate-tls"
        args.targets = tls_targets if args.tls else "discard,plaintext,mailgate"
    if args.conns is None:
        args.conns = "10" if args.tls else "1,10,50"
    if args.per_session is None:
        args.per_session = "1,20" if args.tls else "0"
    if args.messages is None:
        args.messages = 1000 if args.quick or args.tls else 2500
    if args.max_seconds is None:
        args.max_seconds = 8.0 if args.quick else 25.0
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    return args


def main() -> int:
    args = parse_args()
    levels = [(int(c), int(k)) for c in args.conns.split(",") for k in args.per_session.split(",")]
    targets = [t.strip() for t in args.targets.split(",")]
    if not set(targets) <= set(TARGETS):
        raise SystemExit(f"unknown target in {targets}")

    tmp_root = Path(tempfile.mkdtemp(prefix="mailgate-bench-"))
    args.certificate = Certificate(tmp_root) if set(targets) & set(TLS_TARGETS) else None
    runs: list[Result] = []
    t0 = time.monotonic()
    seq = 0
    try:
        for c, k in levels:
            n = max(c, args.messages // 5) if c == 1 else max(c, args.messages)
            for rnd in range(args.rounds):
                for target in targets:
                    seq += 1
                    label = (
                        f"[{time.monotonic() - t0:6.1f}s] {level_name(c, k):<5} "
                        f"round {rnd + 1}/{args.rounds} {target:<12}"
                    )
                    try:
                        r = run_one(target, c, n, args, tmp_root, seq, k)
                    except Exception as e:  # noqa: BLE001 - report it, go on with the next run
                        fatal = f"{type(e).__name__}: {e}"
                        r = {"target": target, "conns": c, "level": level_name(c, k)}
                        r["fatal"] = fatal
                    r["round"] = rnd
                    runs.append(r)
                    print(progress_line(label, r), flush=True)
    except KeyboardInterrupt:
        print("interrupted, summarising what we have", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(tmp_root, ignore_errors=True)

    summary = summarise(runs, levels)
    problems = problems_found(runs, args)
    print_table(summary, args, problems)
    for r in runs:
        tk = r.get("tickets")
        if isinstance(tk, dict):
            tk.pop("_deltas", None)
    out = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": time.monotonic() - t0,
        "settings": {
            "messages": args.messages,
            "rounds": args.rounds,
            "levels": [level_name(c, k) for c, k in levels],
            "client": args.client,
            "quick": args.quick,
            "max_seconds": args.max_seconds,
            "self_test": args.self_test,
            "message_bytes": len(make_message("x", 0)[1]),
            "targets": targets,
        },
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "summary": summary,
        "problems": problems,
        "runs": runs,
    }
    Path(args.output).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"\nwrote {args.output} ({time.monotonic() - t0:.0f} s total)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
