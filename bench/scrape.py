"""How long one `/metrics` scrape and one `/healthz` take on a daemon holding many rows.

    .venv/bin/python bench/scrape.py                   # 10,000 and 100,000 rows
    .venv/bin/python bench/scrape.py --rows 10000 --requests 5

Both read the store's queues at request time (`Store.queues`: inbound and outbox counted
by state, the oldest pending row of each), so their cost grows with the tables. The
daemon takes a few hundred real messages over SMTP (tickets, acknowledgements in the
outbox), is stopped, and its inbound and outbox rows are copied in SQL (new ids, the rest
as it was) until each table holds `rows` rows; then it is started again on that store and
asked, alternately, `/metrics` and `/healthz` `--requests` times each. The first answer of
each is reported apart (the store's pages not yet in SQLite's cache), then the median and
range of the rest. Only 127.0.0.1 is ever used.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import intake  # bench/intake.py: the load generator, server process and ticket statistics

SEED_MESSAGES = 300


def fill(db: Path, table: str, rows: int, unique: str) -> None:
    """Copy `table`'s rows until it holds `rows`: the primary key anew (text ids get a
    suffix, integer ids are left to SQLite), `unique` suffixed, everything else as it was."""
    # The SQL is built from this script's own table and the store's column names only.
    con = sqlite3.connect(db)
    try:
        cols = [r[1] for r in con.execute(f"PRAGMA table_info({table})")]
        first = f"SELECT typeof(id) FROM {table} LIMIT 1"  # noqa: S608
        text_id = con.execute(first).fetchone()[0] == "text"
        count = f"SELECT count(*) FROM {table}"  # noqa: S608
        while (have := con.execute(count).fetchone()[0]) < rows:
            out = [c for c in cols if text_id or c != "id"]
            # the count so far makes every copy's suffix new, whatever was copied before
            values = [f"{c} || '-{have}'" if c in ("id", unique) else c for c in out]
            con.execute(
                f"INSERT INTO {table} ({', '.join(out)}) SELECT {', '.join(values)} "  # noqa: S608
                f"FROM {table} WHERE rowid IN (SELECT rowid FROM {table} LIMIT ?)",
                (rows - have,),
            )
            con.commit()
    finally:
        con.close()


def get(port: int, path: str) -> tuple[int, float]:
    """One request on a new connection, as a scraper makes it: (status, seconds)."""
    t0 = time.perf_counter()
    con = http.client.HTTPConnection(intake.HOST, port, timeout=30)
    try:
        con.request("GET", path)
        resp = con.getresponse()
        resp.read()
        return resp.status, time.perf_counter() - t0
    finally:
        con.close()


def start(workdir: Path, smtp_port: int, http_port: int) -> intake.ServerProcess:
    cfg = workdir / "config.toml"
    if not cfg.exists():
        cfg.write_text(
            intake.CONFIG_TEMPLATE.format(
                smtp_port=smtp_port,
                http_port=http_port,
                templates=intake.ROOT / "templates",
                smtp_tls="",
            )
        )
    server = intake.ServerProcess("mailgate", intake.mailgate_cmd(cfg), smtp_port, workdir)
    server.start()
    return server


def seed(workdir: Path, smtp_port: int, http_port: int) -> None:
    server = start(workdir, smtp_port, http_port)
    try:
        load = intake.run_load(smtp_port, 10, SEED_MESSAGES, "raw", "scrape", server.pid, 60)
        res = asyncio.run(load)
        drained = intake.wait_for_tickets(workdir / "var" / "mailgate.db", res["accepted"], server)
        if "error" in drained:
            raise SystemExit(drained["error"])
    finally:
        server.stop()


def measure(workdir: Path, smtp_port: int, http_port: int, requests: int) -> dict[str, Any]:
    server = start(workdir, smtp_port, http_port)
    times: dict[str, list[float]] = {"/metrics": [], "/healthz": []}
    try:
        for _ in range(requests):
            for path, seconds in times.items():
                status, took = get(http_port, path)
                if status != 200:
                    raise SystemExit(f"{path} answered {status}:\n{server.log_tail()}")
                seconds.append(took)
    finally:
        server.stop()
    out: dict[str, Any] = {}
    for path, seconds in times.items():
        rest = seconds[1:] or seconds
        out[path] = {
            "first_ms": seconds[0] * 1e3,
            "median_ms": statistics.median(rest) * 1e3,
            "min_ms": min(rest) * 1e3,
            "max_ms": max(rest) * 1e3,
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="10000,100000", help="rows per table, comma-separated")
    ap.add_argument("--requests", type=int, default=9, help="requests to each path per size")
    ap.add_argument("--output", default=str(intake.BENCH_DIR / "scrape-results.json"))
    args = ap.parse_args()
    sizes = sorted(int(x) for x in args.rows.split(","))

    workdir = Path(tempfile.mkdtemp(prefix="mailgate-scrape-"))
    smtp_port, http_port = intake.free_port(), intake.free_port()
    results: dict[str, Any] = {}
    try:
        seed(workdir, smtp_port, http_port)
        db = workdir / "var" / "mailgate.db"
        for rows in sizes:
            fill(db, "inbound", rows, unique="")
            fill(db, "outbox", rows, unique="message_id")
            mib = sum(p.stat().st_size for p in db.parent.glob("mailgate.db*")) / 2**20
            r = results[str(rows)] = measure(workdir, smtp_port, http_port, args.requests)
            r["db_mib"] = mib
            print(f"{rows:>7} rows per table, store {mib:.0f} MiB")
            for path in ("/metrics", "/healthz"):
                t = r[path]
                print(
                    f"  {path:<9} first {t['first_ms']:7.1f} ms, then median "
                    f"{t['median_ms']:7.1f} ms ({t['min_ms']:.1f}-{t['max_ms']:.1f})"
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
