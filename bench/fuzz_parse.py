"""A bounded fuzz session of the parser (not run in CI).

    .venv/bin/pip install atheris          # optional: coverage-guided (libFuzzer)
    .venv/bin/python bench/fuzz_parse.py --seconds 240

With atheris, libFuzzer mutates a corpus seeded from tests/data/mail/*.eml (and CPython's own
email test messages when the interpreter ships them), guided by coverage of mailgate and the
stdlib's email package, with a MIME dictionary and a MIME-aware mutator beside its own.
Without atheris, a plain mutation loop does the same, unguided. Every input goes through
`prepare` (parse_mail, then the attachment files), as in the parser process.

Findings go to bench/fuzz-out/ (gitignored), one input per distinct finding:
  exception-*   an exception escaped parse_mail (only Unparseable may)
  invariant-*   parsed text broke a promise (controls in a header, a path in a filename)
  slow-*        one input took longer than --slow seconds
and libFuzzer's own crash-*/timeout-* files. The summary (executions, time, findings, the
slowest inputs) is printed and kept in bench/fuzz-out/summary.json, rewritten every few
seconds, since libFuzzer ends the process without running Python's exit handlers.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import random
import shutil
import sys
import sysconfig
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "fuzz-out"
SEEDS = [
    *sorted((REPO / "tests" / "data" / "mail").glob("*.eml")),
    *sorted((Path(sysconfig.get_paths()["stdlib"]) / "test" / "test_email" / "data").glob("*.txt")),
]
# Tokens for the MIME-aware mutator and libFuzzer's dictionary.
TOKENS = [
    b"\r\n", b"\n", b"\r", b"\r\n\r\n", b"\r\n ", b"\x00", b"--", b"--B--", b"\r\n--B\r\n",
    b"Content-Type: multipart/mixed; boundary=B\r\n", b"Content-Type: message/rfc822\r\n",
    b"Content-Type: text/html\r\n", b"Content-Type: text/plain; charset=", b"boundary=",
    b'boundary="', b"name*0*=", b"filename*=utf-8''%ff", b"name*", b"; ", b'"', b"=?utf-8?b?",
    b"=?utf-8?q?", b"?=", b"=?iso-2022-jp?b?", b"Content-Transfer-Encoding: base64\r\n",
    b"Content-Transfer-Encoding: quoted-printable\r\n", b"Content-Disposition: attachment; ",
    b"message/delivery-status", b"multipart/report; report-type=delivery-status", b"From: ",
    b"To: ", b"Subject: ", b"<a@b.example>", b"(", b")", b"<", b">", b"<!--", b"<script>", b"&#",
    b"\xff", b"\xc3\xa9", b"charset=x-unknown", b"begin 644 f\n", b"=\r\n", b"=ZZ",
]  # fmt: skip


class Session:
    """Runs inputs through `prepare` and keeps count of what they did."""

    def __init__(self, slow: float) -> None:
        from mailgate.errors import Unparseable
        from mailgate.ingest.prepare import prepare

        self._prepare = prepare
        self._unparseable = Unparseable
        # Attachment files are fsynced: on a RAM disk that costs nothing. One fixed folder,
        # emptied at the start: under atheris the process ends without cleaning up.
        shm = Path("/dev/shm")  # noqa: S108 - a folder of our own name in it
        self._attachments = shm / "mailgate-fuzz" if shm.is_dir() else OUT / "attachments"
        shutil.rmtree(self._attachments, ignore_errors=True)
        self.slow = slow
        self.started = time.monotonic()
        self.executions = 0
        self.outcomes: dict[str, int] = {}
        self.findings: dict[str, dict[str, Any]] = {}
        self.slowest: list[tuple[float, int, str]] = []  # (seconds, size, saved as)
        self._last_dump = 0.0

    def run(self, data: bytes) -> None:
        self.executions += 1
        started = time.perf_counter()
        try:
            result = self._prepare(data, self._attachments)
        except Exception as exc:  # noqa: BLE001 - prepare must not raise: that is a finding
            self._found("exception", data, f"prepare raised {_where(exc)}")
            result = None
        elapsed = time.perf_counter() - started
        if result is not None:
            failure = result.failure or "ticket"
            if failure.startswith("parser failed"):
                self._found("exception", data, failure)
            self._count(failure if result.failure else "ticket")
            if result.mail is not None:
                for problem in _broken_promises(result.mail):
                    self._found("invariant", data, problem)
        self._time(elapsed, data)
        if time.monotonic() - self._last_dump > 5:
            self.dump()

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def _time(self, elapsed: float, data: bytes) -> None:
        if elapsed > self.slow:
            self._found("slow", data, f"{elapsed:.2f} s for {len(data)} bytes")
        if len(self.slowest) < 10 or elapsed > self.slowest[-1][0]:
            saved = _save("timing", data) if elapsed > 0.05 else ""
            self.slowest = sorted([*self.slowest, (elapsed, len(data), saved)], reverse=True)[:10]

    def _found(self, kind: str, data: bytes, what: str) -> None:
        key = f"{kind}: {what}" if kind != "slow" else f"slow: {_digest(data)}"
        if key not in self.findings:
            self.findings[key] = {"kind": kind, "what": what, "input": _save(kind, data)}
            print(f"FOUND {key} -> {self.findings[key]['input']}", file=sys.stderr, flush=True)
        self.findings[key]["count"] = self.findings[key].get("count", 0) + 1

    def summary(self) -> dict[str, Any]:
        return {
            "engine": ENGINE,
            "seconds": round(time.monotonic() - self.started, 1),
            "executions": self.executions,
            "outcomes": self.outcomes,
            "findings": list(self.findings.values()),
            "slowest": [
                {
                    "seconds": round(s, 4),
                    "bytes": n,
                    "us_per_byte": round(s / max(n, 1) * 1e6, 2),
                    "input": saved,
                }
                for s, n, saved in self.slowest
            ],
        }

    def dump(self) -> None:
        self._last_dump = time.monotonic()
        (OUT / "summary.json").write_text(json.dumps(self.summary(), indent=2) + "\n")

    def close(self) -> None:
        self.dump()
        shutil.rmtree(self._attachments, ignore_errors=True)


def _broken_promises(mail: Any) -> list[str]:
    """What the parser promises about its output (text.py, parse.py), checked."""
    problems = []
    lines = {"subject": mail.subject, "sender name": mail.sender.name or ""}
    for address in (*mail.to, *mail.cc):
        lines["address name"] = address.name or ""
    for name, text in lines.items():
        if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text):
            problems.append(f"control character in the {name}")
    for part in mail.attachments:
        name = part.filename or ""
        if "/" in name or "\\" in name or len(name) > 255 or name.startswith("."):
            problems.append("unsafe attachment filename")
    if "\x00" in mail.body_text or "\r" in mail.body_text:
        problems.append("NUL or CR in the body text")
    return problems


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1] if frames else None
    place = f" at {Path(last.filename).name}:{last.lineno}" if last else ""
    return f"{type(exc).__name__}{place}"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _save(kind: str, data: bytes) -> str:
    path = OUT / f"{kind}-{_digest(data)}.eml"
    path.write_bytes(data)
    return str(path.relative_to(REPO))


def mime_mutate(data: bytes, rng: random.Random) -> bytes:
    """Structural mutations byte flips rarely find: MIME tokens, nesting, cuts, line endings."""
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, len(data))
        op = rng.randrange(7)
        if op == 0:
            data = data[:at] + rng.choice(TOKENS) + data[at:]
        elif op == 1 and data:  # repeat a slice: nests multiparts and messages deeper
            end = min(len(data), at + rng.randint(1, 300))
            data = data[:at] + data[at:end] * rng.randint(2, 200) + data[end:]
        elif op == 2:
            data = data[:at]
        elif op == 3 and data:
            data = data[:at] + data[rng.randint(at, len(data)) :]
        elif op == 4:
            data = data.replace(b"\r\n", b"\n") if b"\r\n" in data else data.replace(b"\n", b"\r\n")
        elif op == 5 and at < len(data):
            data = data[:at] + bytes([rng.randrange(256)]) + data[at + 1 :]
        else:  # splice in the start of another seed
            other = SEED_DATA[rng.randrange(len(SEED_DATA))] if SEED_DATA else b""
            data = data[:at] + other[: rng.randint(0, len(other))]
    return data


SEED_DATA: list[bytes] = []
ENGINE = "mutation"


def run_atheris(atheris: Any, session: Session, seconds: int, max_len: int) -> None:
    corpus = OUT / "corpus"
    corpus.mkdir(exist_ok=True)
    for seed in SEEDS:
        shutil.copy(seed, corpus / seed.name)
    dictionary = OUT / "mime.dict"
    dictionary.write_text("".join(f'"{_escape(t)}"\n' for t in TOKENS))

    def mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.5:
            return bytes(atheris.Mutate(data, max_size))
        return mime_mutate(data, rng)[:max_size]

    args = [
        sys.argv[0], f"-max_total_time={seconds}", "-timeout=20", f"-max_len={max_len}",
        "-rss_limit_mb=4096", f"-dict={dictionary}", f"-artifact_prefix={OUT}/",
        "-print_final_stats=1", str(corpus),
    ]  # fmt: skip
    atheris.Setup(args, session.run, custom_mutator=mutator)
    atheris.Fuzz()


def _escape(token: bytes) -> str:
    return "".join(chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02x}" for b in token)


def run_mutation(session: Session, seconds: int, max_len: int, seed: int) -> None:
    rng = random.Random(seed)
    pool = list(SEED_DATA)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        data = mime_mutate(rng.choice(pool), rng)[:max_len]
        session.run(data)
        if rng.random() < 0.05:
            pool.append(data)  # keep some mutants to mutate further
            pool = pool[-2000:]


def main() -> None:
    global ENGINE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=240)
    parser.add_argument("--slow", type=float, default=1.0, help="report inputs slower than this")
    parser.add_argument("--max-len", type=int, default=256 * 1024)
    parser.add_argument("--engine", choices=["auto", "atheris", "mutation"], default="auto")
    parser.add_argument("--seed", type=int, default=1)
    options = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    SEED_DATA.extend(path.read_bytes() for path in SEEDS)
    atheris = None
    if options.engine != "mutation":
        try:
            atheris = importlib.import_module("atheris")
        except ImportError:
            if options.engine == "atheris":
                raise
    if atheris is not None:
        ENGINE = "atheris"
        with atheris.instrument_imports(include=["mailgate", "email", "html"]):
            session = Session(options.slow)
        run_atheris(atheris, session, options.seconds, options.max_len)  # exits the process
        return
    session = Session(options.slow)
    try:
        run_mutation(session, options.seconds, options.max_len, options.seed)
    finally:
        session.close()
        print(json.dumps(session.summary(), indent=2))


if __name__ == "__main__":
    main()
