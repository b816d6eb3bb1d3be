"""PgQueuer's side of the comparison: a driver script and the orchestrator's part.

As a script, it runs inside its own virtual environment (``bench/.venvs/pgqueuer``, with
``pgqueuer==1.6.0`` and asyncpg), one subcommand per job, printing one JSON line:

    python pgqueuer_bench.py install DSN
    python pgqueuer_bench.py bulk DSN N BATCH       # time enqueueing N jobs, BATCH per call
    python pgqueuer_bench.py one DSN N              # time N single enqueues
    python pgqueuer_bench.py worker DSN BATCH       # a QueueManager until SIGTERM
    python pgqueuer_bench.py latency DSN N GAP_S    # N 'latency' jobs, GAP_S apart

As a module (imported by ``bench/run.py`` in pgidem's environment), ``bench()`` runs the same
workloads as pgidem's on a scratch database of PgQueuer's own, measured by ``benchlib``.

Handlers: ``noop`` does nothing; ``write_row`` inserts one row into ``bench_rows`` and commits
it itself (PgQueuer's completion is a separate, buffered write: it cannot be atomic with the
handler's); ``latency`` records its start minus the enqueuer's clock.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

VERSION = "1.6.0"
REQUIREMENTS = [f"pgqueuer=={VERSION}", "asyncpg==0.32.0"]
HERE = Path(__file__).resolve().parent
VENV = HERE.parent / ".venvs" / "pgqueuer"

REMAINING_SQL = "SELECT EXISTS (SELECT 1 FROM pgqueuer)::int"
#: PgQueuer logs each finished job in pgqueuer_log (status 'successful') and deletes its row.
DONE_SQL = "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'"


# -- the driver (runs in PgQueuer's virtual environment) -----------------------------------------


def _run(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


async def _connect(dsn: str) -> Any:
    import asyncpg

    return await asyncpg.connect(dsn)


async def _queries(dsn: str) -> tuple[Any, Any]:
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    conn = await _connect(dsn)
    return conn, Queries(AsyncpgDriver(conn))


async def cmd_install(dsn: str) -> dict[str, Any]:
    conn, q = await _queries(dsn)
    await q.install()
    await conn.close()
    return {"installed": True}


async def cmd_bulk(dsn: str, n: int, batch: int, entrypoint: str = "noop") -> dict[str, Any]:
    conn, q = await _queries(dsn)
    payloads = [json.dumps({"n": i}).encode() for i in range(n)]
    started = time.perf_counter()
    for start in range(0, n, batch):
        chunk = payloads[start : start + batch]
        await q.enqueue([entrypoint] * len(chunk), chunk, [0] * len(chunk))
    seconds = time.perf_counter() - started
    await conn.close()
    return {"tasks": n, "seconds": seconds}


async def cmd_one(dsn: str, n: int) -> dict[str, Any]:
    conn, q = await _queries(dsn)
    for i in range(10):
        await q.enqueue("noop", json.dumps({"n": i}).encode())
    started = time.perf_counter()
    for i in range(n):
        await q.enqueue("noop", json.dumps({"n": i}).encode())
    seconds = time.perf_counter() - started
    await conn.close()
    return {"tasks": n, "seconds": seconds}


async def cmd_latency(dsn: str, n: int, gap: float) -> dict[str, Any]:
    conn, q = await _queries(dsn)
    for _ in range(n):
        await q.enqueue("latency", json.dumps({"t": time.time()}).encode())
        await asyncio.sleep(gap)
    await conn.close()
    return {"tasks": n}


async def cmd_worker(dsn: str, batch: int) -> dict[str, Any]:
    import asyncpg
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries

    conn = await asyncpg.connect(dsn)

    async def no_reset(conn: Any) -> None:
        # asyncpg's default reset on release (RESET ALL, UNLISTEN *, ...) is one more
        # transaction per write; the handlers change no session state, so skip it: PgQueuer's
        # best setting, one commit per handler write.
        pass

    # The handlers' own connections: each write commits on its own (autocommit).
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=10, reset=no_reset)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    @qm.entrypoint("noop")
    async def noop(job: Any) -> None:
        pass

    @qm.entrypoint("write_row")
    async def write_row(job: Any) -> None:
        await pool.execute("INSERT INTO bench_rows (task_id) VALUES ($1)", job.id)

    @qm.entrypoint("latency")
    async def latency(job: Any) -> None:
        started = time.time()
        t = json.loads(job.payload)["t"]
        await pool.execute("INSERT INTO bench_latency (ms) VALUES ($1)", (started - t) * 1000)

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, qm.shutdown.set)
    loop.add_signal_handler(signal.SIGINT, qm.shutdown.set)
    await qm.run(batch_size=batch, dequeue_timeout=__import__("datetime").timedelta(seconds=5))
    await pool.close()
    await conn.close()
    return {"stopped": True}


def main(argv: list[str]) -> int:
    cmd, dsn, *rest = argv
    if cmd == "install":
        out = _run(cmd_install(dsn))
    elif cmd == "bulk":
        out = _run(cmd_bulk(dsn, int(rest[0]), int(rest[1]), *rest[2:]))
    elif cmd == "one":
        out = _run(cmd_one(dsn, int(rest[0])))
    elif cmd == "worker":
        out = _run(cmd_worker(dsn, int(rest[0])))
    elif cmd == "latency":
        out = _run(cmd_latency(dsn, int(rest[0]), float(rest[1])))
    else:
        raise SystemExit(f"unknown command {cmd}")
    print(json.dumps(out))
    return 0


# -- the orchestrator's part (runs in pgidem's environment) --------------------------------------


def ensure_venv(log: Any) -> str:
    """Create ``bench/.venvs/pgqueuer`` with the pinned packages unless it has them already;
    return its python."""
    import subprocess

    python = VENV / "bin" / "python"
    check = [str(python), "-c", "import pgqueuer, asyncpg; print(pgqueuer.__version__)"]
    if python.exists():
        got = subprocess.run(check, capture_output=True, text=True)
        if got.returncode == 0 and got.stdout.strip() == VERSION:
            return str(python)
    log(f"creating {VENV} with {' '.join(REQUIREMENTS)}")
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", *REQUIREMENTS], check=True, timeout=600
    )
    return str(python)


def bench(
    admin_dsn: str, python: str, sizes: Any, log: Any, drains_only: bool = False
) -> dict[str, Any]:
    """PgQueuer's figures: bulk and one-at-a-time enqueue, the drain grid, latency."""
    import benchlib as bl

    me = str(Path(__file__).resolve())
    out: dict[str, Any] = {"version": VERSION}

    def driver(*args: Any) -> Any:
        return bl.run_json([python, me, *map(str, args)])

    def reset(dsn: str) -> None:
        bl.exec_sql(
            dsn,
            "TRUNCATE pgqueuer, pgqueuer_log, pgqueuer_statistics, bench_rows, bench_latency",
            "VACUUM ANALYZE pgqueuer",
        )

    with bl.scratch_db(admin_dsn, "pgqueuer") as dsn:
        url = bl.url_dsn(dsn)
        driver("install", url)
        bl.setup_bench_tables(dsn)
        reset(dsn)

        if not drains_only:
            log(f"PgQueuer: bulk enqueue of {sizes.bulk}")
            best: dict[str, Any] | None = None
            for batch in (1000, 5000):
                reset(dsn)
                r = driver("bulk", url, sizes.bulk, batch)
                rate = r["tasks"] / r["seconds"]
                if best is None or rate > best["jobs_per_s"]:
                    best = {
                        "tasks": r["tasks"],
                        "seconds": round(r["seconds"], 3),
                        "jobs_per_s": round(rate, 1),
                        "method": f"Queries.enqueue with lists, {batch} jobs per call (best of "
                        "1000 and 5000)",
                    }
            out["bulk_enqueue"] = best

            reset(dsn)
            log(f"PgQueuer: one-at-a-time enqueue of {sizes.pgq_one}")
            r = driver("one", url, sizes.pgq_one)
            out["one_enqueue"] = {
                "tasks": r["tasks"],
                "seconds": round(r["seconds"], 3),
                "jobs_per_s": round(r["tasks"] / r["seconds"], 1),
            }

        drains: list[dict[str, Any]] = []
        for task in ("noop", "write_row"):
            for procs, batch in sizes.pgq_grid:

                def one(task: str = task, procs: int = procs, batch: int = batch) -> Any:
                    reset(dsn)
                    log(f"PgQueuer: drain {sizes.drain} {task}, {procs} procs, batch {batch}")
                    driver("bulk", url, sizes.drain, 5000, task)
                    bl.exec_sql(dsn, "ANALYZE pgqueuer")
                    workers = [
                        bl.Proc(
                            [python, me, "worker", url, str(batch)],
                            {},
                            HERE,
                            f"pgqueuer-{procs}-b{batch}-{i}",
                        )
                        for i in range(procs)
                    ]
                    verify = (
                        "SELECT count(DISTINCT task_id) FROM bench_rows"
                        if task == "write_row"
                        else DONE_SQL
                    )
                    return bl.drain(
                        admin_dsn=admin_dsn,
                        dsn=dsn,
                        procs=workers,
                        tasks=sizes.drain,
                        remaining_sql=REMAINING_SQL,
                        verify_sql=verify,
                    )

                drains.append(
                    {
                        "task": task,
                        "processes": procs,
                        "batch_size": batch,
                        "setting": f"{procs} procs, batch {batch}",
                        **bl.best_drain(1, one),
                    }
                )
        out["drains"] = drains
        if drains_only:
            return out

        reset(dsn)
        log(f"PgQueuer: latency, {sizes.proc_latency * 3} samples")
        out["latency"] = _latency(bl, url, dsn, python, me, sizes.proc_latency * 3, sizes)
    return out


def _latency(
    bl: Any, url: str, dsn: str, python: str, me: str, n: int, sizes: Any
) -> dict[str, Any]:
    worker = bl.Proc([python, me, "worker", url, "10"], {}, HERE, "pgqueuer-latency").start()
    try:
        time.sleep(3.0)  # start-up: PgQueuer has no worker registry to wait for
        bl.run_json([python, me, "latency", url, "5", str(sizes.latency_gap_s)])
        _wait_rows(bl, dsn, 5, worker)
        bl.exec_sql(dsn, "DELETE FROM bench_latency")
        bl.run_json([python, me, "latency", url, str(n), str(sizes.latency_gap_s)])
        _wait_rows(bl, dsn, n, worker)
    finally:
        worker.stop()
    summary: dict[str, Any] = bl.latency_summary(
        bl.fetch_floats(dsn, "SELECT ms FROM bench_latency")
    )
    summary["method"] = (
        f"1 worker (batch 10), idle; one enqueue every {sizes.latency_gap_s * 1000:.0f} ms"
    )
    return summary


def _wait_rows(bl: Any, dsn: str, n: int, worker: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while bl.fetch_floats(dsn, "SELECT count(*) FROM bench_latency")[0] < n:
        if not worker.alive() or time.monotonic() > deadline:
            raise bl.BenchError(f"PgQueuer latency: waited for {n} rows:\n{worker.tail()}")
        time.sleep(0.05)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(sys.argv[1:]))
