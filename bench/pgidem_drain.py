"""pgidem's side of the benchmark: schema, enqueue, drain, latency, history and memory runs.

Each function takes the admin DSN (the maintenance database, for statistics) and the DSN of a
scratch database that ``bench/run.py`` created. Workers are real ``pgidem worker`` processes
running ``bench/apps.py``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from typing import Any

import psycopg
from benchlib import (
    BENCH,
    BenchError,
    DrainResult,
    Poller,
    Proc,
    drain,
    exec_sql,
    fetch_floats,
    latency_summary,
    rss_kib,
    setup_bench_tables,
)

import pgidem

#: Tasks not yet finished (0 when the drain is done). EXISTS on each partial index's exact
#: predicate: cheap however much history the table holds, so polling does not load the server.
REMAINING_SQL = (
    "SELECT (EXISTS (SELECT 1 FROM pgidem.tasks WHERE state = 'queued')"
    " OR EXISTS (SELECT 1 FROM pgidem.tasks WHERE state = 'running'))::int"
)
#: Tasks the drain finished (the history rows have a task name of their own).
SUCCEEDED_SQL = (
    "SELECT count(*) FROM pgidem.tasks WHERE state = 'succeeded' AND task_name <> 'history'"
)


def setup(dsn: str) -> None:
    """Migrate the scratch database and create the handlers' tables."""
    with pgidem.App(dsn) as app:
        app.migrate()
    setup_bench_tables(dsn)


def reset(dsn: str) -> None:
    """Empty pgidem's tables and the handlers' tables, and refresh the planner's statistics."""
    exec_sql(
        dsn,
        "TRUNCATE pgidem.tasks, pgidem.workers, bench_rows, bench_latency CASCADE",
        "VACUUM ANALYZE pgidem.tasks",
    )


def enqueue_bulk(dsn: str, n: int, task: str = "noop") -> float:
    """Enqueue ``n`` tasks with ``App.enqueue_many`` (its default batch size); return seconds."""
    args = [{"n": i} for i in range(n)]
    with pgidem.App(dsn, pool_size=1) as app:
        with app.pool.connection():
            pass  # the pool is open and the schema checked before the clock starts
        started = time.perf_counter()
        ids = app.enqueue_many(task, args)
        seconds = time.perf_counter() - started
    if len(ids) != n:
        raise BenchError(f"enqueue_many returned {len(ids)} ids for {n} tasks")
    return seconds


def _round_trips(app: pgidem.App, calls: int) -> float:
    """Round trips per ``App.enqueue`` call, counted as ReadyForQuery messages in libpq's
    protocol trace of the pool's one connection."""
    with tempfile.NamedTemporaryFile("w+", suffix=".trace") as trace:
        with app.pool.connection() as conn:
            conn.pgconn.trace(trace.fileno())
            conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        for i in range(calls):
            app.enqueue("noop", {"n": i})
        with app.pool.connection() as conn:
            conn.pgconn.untrace()
        trace.seek(0)
        text = trace.read()
    ready = sum(1 for line in text.splitlines() if "\tReadyForQuery\t" in line and "B\t" in line)
    # The last `with app.pool.connection()` above ran nothing on the wire.
    return ready / calls


def enqueue_one(dsn: str, n: int) -> dict[str, Any]:
    """Enqueue ``n`` tasks one ``App.enqueue`` call at a time (each its own transaction, from
    the app's pool); return tasks/s and round trips per call."""
    with pgidem.App(dsn, pool_size=1) as app:
        for i in range(10):  # warm up: pool open, schema checked, statement prepared
            app.enqueue("noop", {"n": i})
        started = time.perf_counter()
        for i in range(n):
            app.enqueue("noop", {"n": i})
        seconds = time.perf_counter() - started
        trips = _round_trips(app, 50)
    return {
        "tasks": n,
        "seconds": round(seconds, 3),
        "jobs_per_s": round(n / seconds, 1),
        "round_trips_per_call": round(trips, 2),
    }


def worker_procs(
    dsn: str, procs: int, concurrency: int, batch_size: int, extra: tuple[str, ...] = ()
) -> list[Proc]:
    """``procs`` worker processes with the given settings (not started)."""
    cmd = [
        sys.executable,
        "-m",
        "pgidem",
        "--log-level",
        "WARNING",
        "--log-json",
        "worker",
        "--app",
        "apps:app",
        "--concurrency",
        str(concurrency),
        "--batch-size",
        str(batch_size),
        *extra,
    ]
    env = {
        "PGIDEM_DSN": dsn,
        "PYTHONPATH": os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")]),
    }
    return [
        Proc(cmd, env, BENCH, f"pgidem-{procs}x{concurrency}-b{batch_size}-{i}")
        for i in range(procs)
    ]


def run_drain(
    admin_dsn: str,
    dsn: str,
    *,
    tasks: int,
    task: str,
    procs: int,
    concurrency: int,
    batch_size: int,
    rss_every: float | None = None,
) -> DrainResult:
    """Enqueue ``tasks`` tasks (untimed), then time ``procs`` workers draining them."""
    enqueue_bulk(dsn, tasks, task)
    exec_sql(dsn, "ANALYZE pgidem.tasks")
    verify = (
        "SELECT count(DISTINCT task_id) FROM bench_rows" if task == "write_row" else SUCCEEDED_SQL
    )
    result = drain(
        admin_dsn=admin_dsn,
        dsn=dsn,
        procs=worker_procs(dsn, procs, concurrency, batch_size),
        tasks=tasks,
        remaining_sql=REMAINING_SQL,
        verify_sql=verify,
        rss_every=rss_every,
        done_sql=SUCCEEDED_SQL if rss_every else None,
    )
    if task == "write_row":
        rows = fetch_floats(dsn, "SELECT count(*) FROM bench_rows")[0]
        if rows != tasks:
            raise BenchError(f"{rows:.0f} rows written for {tasks} tasks: not exactly once")
    return result


def run_latency(admin_dsn: str, dsn: str, *, samples: int, gap_s: float) -> dict[str, Any]:
    """Enqueue-to-start latency on an idle worker (1 process, default settings): one task at a
    time, ``gap_s`` apart, each carrying the enqueuer's clock from just before ``enqueue``."""
    worker = worker_procs(dsn, 1, 4, 16)[0].start()
    poller = Poller(dsn)
    try:
        deadline = time.monotonic() + 60
        while poller.count("SELECT count(*) FROM pgidem.workers") < 1:
            if not worker.alive() or time.monotonic() > deadline:
                raise BenchError(f"latency worker did not start:\n{worker.tail()}")
            time.sleep(0.05)
        with pgidem.App(dsn, pool_size=1) as app:
            for _ in range(5):  # warm-up: the worker's statements are prepared
                app.enqueue("latency", {"t": time.time()})
                time.sleep(gap_s)
            _wait_count(poller, "SELECT count(*) FROM bench_latency", 5, worker)
            exec_sql(dsn, "DELETE FROM bench_latency")
            time.sleep(gap_s)
            for _ in range(samples):
                app.enqueue("latency", {"t": time.time()})
                time.sleep(gap_s)
        _wait_count(poller, "SELECT count(*) FROM bench_latency", samples, worker)
    finally:
        poller.close()
        worker.stop()
    return latency_summary(fetch_floats(dsn, "SELECT ms FROM bench_latency"))


def _wait_count(poller: Poller, query: str, n: int, worker: Proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while poller.count(query) < n:
        if not worker.alive() or time.monotonic() > deadline:
            raise BenchError(f"waited for {n} rows of {query!r}:\n{worker.tail()}")
        time.sleep(0.02)


def add_history(dsn: str, rows: int) -> float:
    """Put ``rows`` finished tasks in the history, as the worker would have left them: a
    succeeded task, its attempt and its outcome each. Return seconds taken."""
    started = time.perf_counter()
    exec_sql(
        dsn,
        f"""
        INSERT INTO pgidem.tasks (task_name, queue, args, state, attempts, fencing_token,
                                  run_at, created_at, started_at, finished_at)
        SELECT 'history', 'default', jsonb_build_object('n', g), 'succeeded', 1,
               nextval('pgidem.fencing_token_seq'),
               now() - interval '2 hours', now() - interval '2 hours',
               now() - interval '1 hour', now() - interval '1 hour'
          FROM generate_series(1, {int(rows)}) g
        """,
        """
        INSERT INTO pgidem.attempts (fencing_token, task_id, attempt, worker_id, status,
                                     claimed_at, finished_at)
        SELECT fencing_token, id, 1, 'bench-history', 'succeeded', started_at, finished_at
          FROM pgidem.tasks WHERE state = 'succeeded'
        """,
        """
        INSERT INTO pgidem.outcomes (task_id, fencing_token, state, result, recorded_at)
        SELECT id, fencing_token, 'succeeded', 'null', finished_at
          FROM pgidem.tasks WHERE state = 'succeeded'
        """,
        "VACUUM ANALYZE pgidem.tasks",
        "VACUUM ANALYZE pgidem.attempts",
        "VACUUM ANALYZE pgidem.outcomes",
    )
    seconds = time.perf_counter() - started
    checkpoint(dsn)
    return seconds


def clear_drained(dsn: str) -> None:
    """Delete the tasks a drain finished, keep the history (the rows named ``history``)."""
    exec_sql(
        dsn,
        "DELETE FROM pgidem.tasks WHERE task_name <> 'history'",
        "VACUUM ANALYZE pgidem.tasks",
        "VACUUM ANALYZE pgidem.attempts",
        "VACUUM ANALYZE pgidem.outcomes",
    )
    checkpoint(dsn)


def checkpoint(dsn: str) -> None:
    """CHECKPOINT, if this role may: after loading the history, a checkpoint due to its WAL
    would otherwise land in the drain that follows and be counted as the history's cost (the
    first change to each page after a checkpoint writes the whole page to the WAL)."""
    with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
        exec_sql(dsn, "CHECKPOINT")


#: Tasks waiting or running (each count on its partial index).
PENDING_SQL = (
    "SELECT (SELECT count(*) FROM pgidem.tasks WHERE state = 'queued')"
    " + (SELECT count(*) FROM pgidem.tasks WHERE state = 'running')"
)


def run_memory(dsn: str, *, tasks: int, chunk: int = 10_000) -> DrainResult:
    """One worker with the CLI defaults runs ``tasks`` no-op tasks, fed ``chunk`` at a time
    whenever fewer than half a chunk wait (a steady backlog, so that the run measures the
    worker's memory and not the claim's cost on a deep queue); VmRSS sampled every second."""
    worker = worker_procs(dsn, 1, 4, 16)[0]
    poller = Poller(dsn)
    samples: list[tuple[float, int, int]] = []
    enqueued = 0
    with pgidem.App(dsn, pool_size=1) as app:

        def feed() -> int:
            n = min(chunk, tasks - enqueued)
            app.enqueue_many("noop", [{"n": i} for i in range(n)])
            return n

        enqueued += feed()
        try:
            started = time.perf_counter()
            worker.start()
            next_sample = started
            while True:
                pending = poller.count(PENDING_SQL)
                done = enqueued - pending
                now = time.perf_counter()
                if now >= next_sample:
                    kib = rss_kib(worker.pid)
                    if kib is not None:
                        samples.append((now - started, done, kib))
                    next_sample = now + 1.0
                if done >= tasks:
                    break
                if pending < chunk // 2 and enqueued < tasks:
                    enqueued += feed()
                if not worker.alive():
                    raise BenchError(f"memory worker exited:\n{worker.tail()}")
                if now - started > 900:
                    raise BenchError(f"memory run not done after 900 s ({done} of {tasks})")
                time.sleep(0.05)
            seconds = time.perf_counter() - started
            kib = rss_kib(worker.pid)
            if kib is not None:
                samples.append((seconds, tasks, kib))
            verified = poller.count(SUCCEEDED_SQL)
        finally:
            poller.close()
            if worker.popen is not None:
                worker.stop()
    if verified != tasks:
        raise BenchError(f"memory run: {verified} tasks succeeded of {tasks}")
    return DrainResult(tasks, seconds, 0, verified, samples)


def rss_summary(result: DrainResult) -> dict[str, Any]:
    """Start (first sample after the first finished task), 10 % mark, peak and end RSS."""
    samples = result.rss_samples
    if not samples:
        raise BenchError("no RSS samples")
    started = next((s for s in samples if s[1] > 0), samples[0])
    tenth = next((s for s in samples if s[1] >= result.tasks // 10), started)
    end = samples[-1]
    return {
        "tasks": result.tasks,
        "seconds": round(result.seconds, 2),
        "jobs_per_s": round(result.jobs_per_s, 1),
        "samples": len(samples),
        "start_kib": started[2],
        "at_10pct_kib": tenth[2],
        "peak_kib": max(s[2] for s in samples),
        "end_kib": end[2],
        "growth_from_10pct_kib": end[2] - tenth[2],
    }
