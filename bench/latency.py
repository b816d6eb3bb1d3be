"""Enqueue-to-start latency on an idle worker: how fast LISTEN/NOTIFY wakes it.

Starts one `pgidem worker` process on a scratch database (its polling interval set long, 10 s
by default, so that only a NOTIFY can wake it in time), then enqueues tasks one at a time with
a pause between them (the worker is idle when each arrives). Each handler's first act is to
read the clock; latency = that time minus the time just before the enqueue call (the same
machine's clock), so it includes the enqueue round trip and commit, the NOTIFY, the wake-up,
the claim and the start of the handler. Prints p50/p90/p99/max in milliseconds.

    .venv/bin/python bench/latency.py [--dsn ADMIN_DSN] [--samples 200] [--pause 0.05]

ADMIN_DSN is a server to create the scratch database on (default ``$PGIDEM_BENCH_DSN``, else
``host=127.0.0.1 user=postgres dbname=postgres``); the database is dropped afterwards.
This module is also the worker's app (``--app latency:app``, with bench/ on the path).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgidem

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

app = pgidem.App()


@app.task(name="latency_probe")
def latency_probe(ctx: pgidem.Context, t: float) -> None:
    started = time.time()
    ctx.conn.execute(
        "INSERT INTO latency_probe (task_id, ms) VALUES (%s, %s)",
        (ctx.task_id, (started - t) * 1000.0),
    )


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100.0 * (len(ordered) - 1))))
    return ordered[k]


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dsn",
        default=os.environ.get("PGIDEM_BENCH_DSN", "host=127.0.0.1 user=postgres dbname=postgres"),
    )
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between enqueues")
    parser.add_argument("--poll-interval", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()

    name = f"pgidem_latency_{uuid.uuid4().hex[:8]}"
    params = conninfo_to_dict(args.dsn)
    with psycopg.connect(args.dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = make_conninfo(**{**params, "dbname": name})
    log_path = Path(tempfile.gettempdir()) / f"{name}-worker.log"
    worker: subprocess.Popen[bytes] | None = None
    try:
        client = pgidem.App(dsn)
        client.migrate()
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("CREATE TABLE latency_probe (task_id bigint PRIMARY KEY, ms float8)")
        env = {**os.environ, "PGIDEM_DSN": dsn, "PYTHONPATH": f"{BENCH}{os.pathsep}{ROOT}"}
        with open(log_path, "wb") as log:
            worker = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pgidem",
                    "--log-json",
                    "worker",
                    "--app",
                    "latency:app",
                    "--concurrency",
                    str(args.concurrency),
                    "--poll-interval",
                    str(args.poll_interval),
                ],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def listening() -> bool:
            with psycopg.connect(dsn, autocommit=True) as c:
                row = c.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND query = 'LISTEN pgidem'"
                ).fetchone()
                return bool(row and row[0])

        wait_for(listening, 60, "the worker to LISTEN")
        time.sleep(1.0)  # let its slots settle into their idle wait
        with psycopg.connect(dsn, autocommit=True) as c:

            def probes() -> int:
                row = c.execute("SELECT count(*) FROM latency_probe").fetchone()
                return int(row[0]) if row else 0

            total = 0
            for i in range(5 + args.samples):  # the first five warm up, and are dropped
                t = time.time()
                client.enqueue("latency_probe", {"t": t})
                total += 1
                # Wait for this one to start before the next (the worker is idle each time).
                wait_for(lambda n=total: probes() >= n, 30, f"probe {i}")
                if i == 4:
                    c.execute("TRUNCATE latency_probe")
                    total = 0
                time.sleep(args.pause)
            values = [r[0] for r in c.execute("SELECT ms FROM latency_probe").fetchall()]
        client.close()
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
        with psycopg.connect(args.dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    print(
        f"enqueue-to-handler-start latency, idle worker (concurrency {args.concurrency}, "
        f"poll interval {args.poll_interval} s: woken by NOTIFY), {len(values)} samples, "
        f"{args.pause * 1000:.0f} ms apart"
    )
    print(
        f"p50 {percentile(values, 50):.1f} ms  p90 {percentile(values, 90):.1f} ms  "
        f"p99 {percentile(values, 99):.1f} ms  max {max(values):.1f} ms  "
        f"mean {statistics.fmean(values):.1f} ms"
    )
    under = sum(1 for v in values if v < 100.0)
    print(f"under 100 ms: {under}/{len(values)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
