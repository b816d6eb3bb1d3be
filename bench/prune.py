#!/usr/bin/env python3
"""Pruning 1,000,000 finished tasks while workers keep claiming: the claim rate with and
without the pruner running (a benchmark script; it prints figures and asserts nothing).

What it does, in a scratch database of its own (``pgidem_bench_prune_<random>``, dropped at the
end unless ``--keep``):

1. setup: inserts ``--tasks`` finished tasks (succeeded, finished 30 days ago, each with an
   attempt and an outcome, as a worker leaves them) straight into pgidem's tables with
   ``INSERT ... SELECT generate_series``, and ``--queued`` fresh queued tasks to claim
   (refilled whenever they run out); VACUUM ANALYZE;
2. baseline: ``--claimers`` threads run the worker's claim and fenced completion (the
   ``task_claim`` and ``task_complete_many`` queries, batches of ``--claim-batch``, one
   completion transaction per batch) for ``--seconds``, without pruning;
3. pruning: the claimers keep running while the pruner (pgidem/_pruner.py, as ``pgidem prune``
   and ``pgidem worker --prune-interval`` run it) deletes the old tasks in batches of
   ``--batch-size``, in alternating windows of ``--window`` seconds with and without pruning
   until it is done (on a shared machine, both kinds of window see the same drift in load);
4. after: the claimers alone again for ``--seconds``, on the pruned table.

Usage: bench/prune.py [--dsn ADMIN_DSN] [--tasks 1000000] [--seconds 15] [--batch-size 1000]
ADMIN_DSN defaults to $PGIDEM_BENCH_DSN, else host=127.0.0.1 port=5432 user=postgres.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402
from psycopg.conninfo import conninfo_to_dict, make_conninfo  # noqa: E402

from pgidem import _migrate, _store  # noqa: E402
from pgidem._pruner import Pruner, PrunerConfig  # noqa: E402

SETUP = """
INSERT INTO pgidem.tasks (id, task_name, queue, args, idempotency_key, state, attempts,
                          fencing_token, created_at, started_at, finished_at)
SELECT g, 'old', 'default', '{}', 'old-' || g, 'succeeded', 1, g,
       now() - interval '30 days', now() - interval '30 days',
       now() - interval '30 days' + g * interval '1 millisecond'
  FROM generate_series(1, %(n)s) AS g;
INSERT INTO pgidem.attempts (fencing_token, task_id, attempt, worker_id, status, claimed_at,
                             finished_at)
SELECT g, g, 1, 'bench', 'succeeded', now() - interval '30 days', now() - interval '30 days'
  FROM generate_series(1, %(n)s) AS g;
INSERT INTO pgidem.outcomes (task_id, fencing_token, state, result, recorded_at)
SELECT g, g, 'succeeded', '{"ok": true}', now() - interval '30 days'
  FROM generate_series(1, %(n)s) AS g;
SELECT setval('pgidem.fencing_token_seq', %(n)s);
SELECT setval(pg_get_serial_sequence('pgidem.tasks', 'id'), %(n)s);
INSERT INTO pgidem.tasks (task_name, queue, args)
SELECT 'fresh', 'default', jsonb_build_object('i', g) FROM generate_series(1, %(queued)s) AS g;
"""


REFILL = """
INSERT INTO pgidem.tasks (task_name, queue, args)
SELECT 'fresh', 'default', jsonb_build_object('i', g) FROM generate_series(1, %(queued)s) AS g
"""


def dsn_for(admin_dsn: str, dbname: str) -> str:
    params = conninfo_to_dict(admin_dsn)
    params["dbname"] = dbname
    return make_conninfo(**params)


@contextlib.contextmanager
def scratch_db(admin_dsn: str, keep: bool) -> Iterator[str]:
    name = f"pgidem_bench_prune_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield dsn_for(admin_dsn, name)
    finally:
        if keep:
            print(f"kept database {name}")
        else:
            with psycopg.connect(admin_dsn, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )


class Claimers:
    """Threads doing what a worker's slots do: claim a batch, complete it in one transaction."""

    def __init__(self, dsn: str, threads: int, batch: int, queued: int) -> None:
        self.dsn = dsn
        self.queued = queued
        self.threads = threads
        self.batch = batch
        self.done = 0
        self.claims = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def _run(self, n: int) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self._stop.is_set():
                    rows = _store.task_claim(
                        conn,
                        worker_id=f"bench-{n}",
                        queues=["default"],
                        task_names=["fresh"],
                        limit=self.batch,
                        lease_s=60,
                    )
                    if not rows:  # every queued task claimed: enqueue more and go on
                        conn.execute(REFILL, {"queued": self.queued})
                        continue
                    with conn.transaction():
                        for r in rows:
                            _store.task_complete(
                                conn, task_id=r["id"], token=r["fencing_token"], result_json="{}"
                            )
                    with self._lock:
                        self.done += len(rows)
                        self.claims += 1
        except BaseException as exc:
            self.errors.append(exc)
            self._stop.set()

    def start(self) -> None:
        self._stop.clear()
        self._workers = [
            threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(self.threads)
        ]
        for t in self._workers:
            t.start()

    def count(self) -> int:
        with self._lock:
            return self.done

    def stop(self) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(60)
        if self.errors:
            raise self.errors[0]


def measure(claimers: Claimers, seconds: float) -> float:
    """Tasks claimed and completed per second over ``seconds``."""
    claimers.start()
    time.sleep(1.0)  # warm up: connections, prepared plans
    start_n, start_t = claimers.count(), time.monotonic()
    time.sleep(seconds)
    rate = (claimers.count() - start_n) / (time.monotonic() - start_t)
    claimers.stop()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--dsn",
        default=os.environ.get("PGIDEM_BENCH_DSN", "host=127.0.0.1 port=5432 user=postgres"),
        help="a server's admin DSN (a scratch database is created there)",
    )
    parser.add_argument("--tasks", type=int, default=1_000_000, help="finished tasks to prune")
    # Kept small on purpose: the claim's cost grows with the queued backlog (on PostgreSQL
    # before 17 it sorts every claimable row of the queue), which is not what this measures.
    parser.add_argument(
        "--queued", type=int, default=10_000, help="fresh tasks to claim (refilled when gone)"
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="each baseline's length")
    parser.add_argument("--batch-size", type=int, default=1000, help="pruner batch size")
    parser.add_argument(
        "--window", type=float, default=5.0, help="seconds per window, pruning or not"
    )
    parser.add_argument("--claimers", type=int, default=2, help="claiming threads")
    parser.add_argument("--claim-batch", type=int, default=16, help="tasks per claim")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    ns = parser.parse_args()

    with scratch_db(ns.dsn, ns.keep) as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            _migrate.migrate(conn)
            server = conn.execute("SHOW server_version").fetchone()
            t0 = time.monotonic()
            with conn.transaction():
                for statement in filter(str.strip, SETUP.split(";")):
                    conn.execute(statement, {"n": ns.tasks, "queued": ns.queued})
            setup_s = time.monotonic() - t0
            conn.execute("VACUUM ANALYZE")
            size = conn.execute(
                "SELECT pg_size_pretty(pg_total_relation_size('pgidem.tasks')"
                " + pg_total_relation_size('pgidem.attempts')"
                " + pg_total_relation_size('pgidem.outcomes'))"
            ).fetchone()
        print(
            f"PostgreSQL {server[0] if server else '?'}; {os.cpu_count()} CPUs; setup: "
            f"{ns.tasks:,} finished tasks (+ attempts, outcomes) and {ns.queued:,} queued in "
            f"{setup_s:.1f} s; tables {size[0] if size else '?'}",
            flush=True,
        )

        claimers = Claimers(dsn, ns.claimers, ns.claim_batch, ns.queued)
        baseline = measure(claimers, ns.seconds)
        print(f"claim rate without pruning, before:  {baseline:8.0f} tasks/s", flush=True)

        # Pruning in alternating windows: `--window` seconds with the pruner running, then as
        # long without, and so on until it is done, with the claimers running throughout. On a
        # shared, noisy machine this compares like with like: both kinds of window see the
        # same drift in load and the same amount of history on average.
        def connection() -> psycopg.Connection[Any]:
            return psycopg.connect(dsn, autocommit=True)

        windows: dict[bool, list[tuple[int, float]]] = {True: [], False: []}
        pruning = threading.Event()
        finished = threading.Event()
        totals = {"tasks": 0, "batches": 0, "seconds": 0.0}

        def prune_loop() -> None:
            while not finished.is_set():
                if not pruning.wait(0.1):
                    continue
                one = Pruner(
                    connection,
                    PrunerConfig(older_than=86400.0, batch_size=ns.batch_size, max_batches=1),
                ).run_once()
                totals["tasks"] += one.tasks
                totals["batches"] += one.batches
                totals["seconds"] += one.seconds
                if one.complete:
                    finished.set()

        thread = threading.Thread(target=prune_loop, daemon=True)
        thread.start()
        claimers.start()
        time.sleep(1.0)
        on = True
        while True:
            if on:
                pruning.set()
            n0, t0 = claimers.count(), time.monotonic()
            if on:
                finished.wait(ns.window)
            else:
                time.sleep(ns.window)
            pruning.clear()
            windows[on].append((claimers.count() - n0, time.monotonic() - t0))
            if finished.is_set() and not on:
                break
            on = not on if not finished.is_set() else False
        claimers.stop()
        thread.join(30)

        def rate(ws: list[tuple[int, float]]) -> float:
            return sum(n for n, _ in ws) / sum(t for _, t in ws)

        during, between = rate(windows[True]), rate(windows[False])
        print(
            f"claim rate during pruning:           {during:8.0f} tasks/s  "
            f"({len(windows[True])} windows of up to {ns.window:g} s)",
            flush=True,
        )
        print(
            f"claim rate between pruning windows:  {between:8.0f} tasks/s  "
            f"({len(windows[False])} windows; during/between = {during / between:.0%})",
            flush=True,
        )
        print(
            f"pruned {totals['tasks']:,} tasks (with attempts and outcomes) in "
            f"{totals['batches']} batches of {ns.batch_size}, {totals['seconds']:.1f} s of "
            f"pruning ({totals['tasks'] / totals['seconds']:,.0f} tasks/s, "
            f"{totals['seconds'] / totals['batches'] * 1000:.1f} ms a batch)",
            flush=True,
        )
        after = measure(claimers, ns.seconds)
        print(f"claim rate without pruning, after:   {after:8.0f} tasks/s", flush=True)
        with psycopg.connect(dsn, autocommit=True) as conn:
            left = conn.execute(
                "SELECT count(*) FROM pgidem.tasks WHERE task_name = 'old'"
            ).fetchone()
        print(f"old tasks left: {left[0] if left else '?'}")


if __name__ == "__main__":
    main()
