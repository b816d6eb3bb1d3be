#!/usr/bin/env python3
"""Enqueue throughput: bulk (App.enqueue_many) and one at a time (App.enqueue). Prints figures.

Runs in a scratch database it creates on the server and drops at the end. The server is --dsn,
else PGIDEM_DSN, else 127.0.0.1:5432 as user postgres. Round trips are counted from libpq's
protocol trace of the connection (one ReadyForQuery from the server ends each round trip), not
assumed.

    .venv/bin/python bench/enqueue.py [--dsn DSN] [--bulk 20000] [--one 2000] [--batch-size N]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import structlog
from psycopg import pq
from psycopg.conninfo import make_conninfo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pgidem
from pgidem import _migrate
from pgidem.app import DEFAULT_BATCH_SIZE


@contextmanager
def round_trips(conn: psycopg.Connection[Any]) -> Iterator[Callable[[], int]]:
    """Trace a connection; the yielded function returns the round trips so far (after exit)."""
    counted = [0]
    with tempfile.TemporaryFile() as trace:
        conn.pgconn.trace(trace.fileno())
        conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            yield lambda: counted[0]
        finally:
            conn.pgconn.untrace()
            trace.seek(0)
            counted[0] = sum(
                1
                for line in trace.read().decode(errors="replace").splitlines()
                if line.startswith("B\t") and "\tReadyForQuery" in line
            )


@contextmanager
def scratch_database(admin: str) -> Iterator[str]:
    name = f"pgidem_enqueue_scratch_{os.getpid()}"
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}"')
        c.execute(f'CREATE DATABASE "{name}"')
    try:
        dsn = make_conninfo(admin, dbname=name)
        with psycopg.connect(dsn, autocommit=True) as c:
            _migrate.migrate(c)
        yield dsn
    finally:
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def traced_pool_connection(app: pgidem.App) -> psycopg.Connection[Any]:
    """The single connection of a pool_size=1 App (the one every call will borrow)."""
    conn = app.pool.getconn()
    app.pool.putconn(conn)
    return conn


def bench_bulk(
    dsn: str, n: int, batch_size: int, label: str, keys_prefix: str | None, runs: int = 1
) -> None:
    """Time one ``enqueue_many`` of ``n`` tasks; with ``runs`` > 1 (calls without keys, which
    can be repeated), the fastest of that many (a call lasts about 0.2 s: one hiccup of a
    shared machine weighs on a single one)."""
    with pgidem.App(dsn, pool_size=1) as app:
        app.enqueue("warm_up", {})
        conn = traced_pool_connection(app)
        args = [{"order": i, "amount": 100 + i % 7} for i in range(n)]
        keys = None if keys_prefix is None else [f"{keys_prefix}-{i}" for i in range(n)]
        timings = []
        for _ in range(runs):
            with round_trips(conn) as trips:
                start = time.perf_counter()
                ids = app.enqueue_many("charge", args, idempotency_keys=keys, batch_size=batch_size)
                timings.append(time.perf_counter() - start)
            assert len(ids) == n
        seconds = min(timings)
        batches = -(-n // batch_size)
        # The call is BEGIN, one statement per batch, COMMIT.
        per_batch = (trips() - 2) / batches
        best = f" (the fastest of {runs} calls)" if runs > 1 else ""
        print(
            f"{label:<44} {n / seconds:>10,.0f} tasks/s  {seconds:6.2f} s  "
            f"{batches} batch(es) of up to {batch_size}, {trips()} round trips "
            f"(BEGIN + {per_batch:g} per batch + COMMIT){best}"
        )


def bench_one(dsn: str, n: int) -> None:
    with pgidem.App(dsn, pool_size=1) as app:
        app.enqueue("warm_up", {})
        conn = traced_pool_connection(app)
        with round_trips(conn) as trips:
            start = time.perf_counter()
            for i in range(n):
                app.enqueue("charge", {"order": i, "amount": 100}, idempotency_key=f"one-{i}")
            seconds = time.perf_counter() - start
        print(
            f"{'one at a time, App.enqueue with a key':<44} {n / seconds:>10,.0f} tasks/s  "
            f"{seconds:6.2f} s  {trips() / n:g} round trips per call (autocommit: one commit "
            "each)"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=None, help="the server (a scratch database is made)")
    parser.add_argument("--bulk", type=int, default=20_000, help="tasks per bulk enqueue")
    parser.add_argument("--one", type=int, default=2_000, help="tasks enqueued one at a time")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    opts = parser.parse_args()
    # Figures only: pgidem's info log lines (database_selected) would interleave with them.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    admin = (
        opts.dsn
        or os.environ.get("PGIDEM_DSN")
        or make_conninfo(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    )
    with psycopg.connect(admin, autocommit=True) as c:
        version = c.execute("SHOW server_version").fetchone()
    print(f"pgidem enqueue benchmark: PostgreSQL {version[0] if version else '?'}, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    with scratch_database(admin) as dsn:
        bench_bulk(dsn, opts.bulk, opts.batch_size, "bulk, new keys", "order")
        bench_bulk(
            dsn, opts.bulk, opts.batch_size, "bulk, the same keys again (all dedupe)", "order"
        )
        bench_bulk(dsn, opts.bulk, opts.batch_size, "bulk, no keys", None, runs=2)
        bench_one(dsn, opts.one)
    return 0


if __name__ == "__main__":
    sys.exit(main())
