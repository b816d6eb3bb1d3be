"""Procrastinate's side of the comparison: a driver script and the orchestrator's part.

As a script, it runs inside its own virtual environment (``bench/.venvs/procrastinate``, with
``procrastinate==3.10.0`` and psycopg 3), one subcommand per job, printing one JSON line:

    python procrastinate_bench.py install DSN
    python procrastinate_bench.py bulk DSN N BATCH [TASK]   # time batch_defer of N jobs
    python procrastinate_bench.py one DSN N                 # time N single defers
    python procrastinate_bench.py worker DSN CONCURRENCY    # a worker until SIGTERM
    python procrastinate_bench.py latency DSN N GAP_S

As a module, ``bench()`` runs the workloads on a scratch database of Procrastinate's own.

Handlers are async (Procrastinate's concurrency is asyncio's): ``noop``; ``write_row`` inserts
one row through the app's connector, committed on its own; ``latency``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

VERSION = "3.10.0"
REQUIREMENTS = [f"procrastinate=={VERSION}", "psycopg[binary]==3.3.9"]
HERE = Path(__file__).resolve().parent
VENV = HERE.parent / ".venvs" / "procrastinate"

REMAINING_SQL = (
    "SELECT EXISTS (SELECT 1 FROM procrastinate_jobs WHERE status IN ('todo', 'doing'))::int"
)
DONE_SQL = "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'"


# -- the driver (runs in Procrastinate's virtual environment) ------------------------------------


def make_app(dsn: str, pool_max: int = 10) -> Any:
    import procrastinate

    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(conninfo=dsn, min_size=1, max_size=pool_max)
    )

    @app.task(name="noop")
    async def noop(**_: Any) -> None:
        pass

    @app.task(name="write_row", pass_context=True)
    async def write_row(context: Any, **_: Any) -> None:
        await context.app.connector.execute_query_async(
            "INSERT INTO bench_rows (task_id) VALUES (%(id)s)", id=context.job.id
        )

    @app.task(name="latency", pass_context=True)
    async def latency(context: Any, t: float, **_: Any) -> None:
        started = time.time()
        await context.app.connector.execute_query_async(
            "INSERT INTO bench_latency (ms) VALUES (%(ms)s)", ms=(started - t) * 1000
        )

    return app


async def cmd_install(dsn: str) -> dict[str, Any]:
    app = make_app(dsn)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
    return {"installed": True}


async def cmd_bulk(dsn: str, n: int, batch: int, task: str = "noop") -> dict[str, Any]:
    app = make_app(dsn)
    async with app.open_async():
        t = app.tasks[task]
        await app.connector.execute_query_async("SELECT 1")  # the pool is open
        started = time.perf_counter()
        for start in range(0, n, batch):
            await t.batch_defer_async(*({"n": i} for i in range(start, min(n, start + batch))))
        seconds = time.perf_counter() - started
    return {"tasks": n, "seconds": seconds}


async def cmd_one(dsn: str, n: int) -> dict[str, Any]:
    app = make_app(dsn)
    async with app.open_async():
        t = app.tasks["noop"]
        for i in range(10):
            await t.defer_async(n=i)
        started = time.perf_counter()
        for i in range(n):
            await t.defer_async(n=i)
        seconds = time.perf_counter() - started
    return {"tasks": n, "seconds": seconds}


async def cmd_latency(dsn: str, n: int, gap: float) -> dict[str, Any]:
    app = make_app(dsn)
    async with app.open_async():
        t = app.tasks["latency"]
        for _ in range(n):
            await t.defer_async(t=time.time())
            await asyncio.sleep(gap)
    return {"tasks": n}


async def cmd_worker(dsn: str, concurrency: int) -> dict[str, Any]:
    app = make_app(dsn, pool_max=concurrency + 4)
    async with app.open_async():
        await app.run_worker_async(concurrency=concurrency, wait=True, install_signal_handlers=True)
    return {"stopped": True}


def main(argv: list[str]) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING)
    cmd, dsn, *rest = argv
    if cmd == "install":
        out = asyncio.run(cmd_install(dsn))
    elif cmd == "bulk":
        out = asyncio.run(cmd_bulk(dsn, int(rest[0]), int(rest[1]), *rest[2:]))
    elif cmd == "one":
        out = asyncio.run(cmd_one(dsn, int(rest[0])))
    elif cmd == "worker":
        out = asyncio.run(cmd_worker(dsn, int(rest[0])))
    elif cmd == "latency":
        out = asyncio.run(cmd_latency(dsn, int(rest[0]), float(rest[1])))
    else:
        raise SystemExit(f"unknown command {cmd}")
    print(json.dumps(out))
    return 0


# -- the orchestrator's part (runs in pgidem's environment) --------------------------------------


def ensure_venv(log: Any) -> str:
    """Create ``bench/.venvs/procrastinate`` with the pinned packages unless it has them; return
    its python."""
    import subprocess

    python = VENV / "bin" / "python"
    check = [
        str(python),
        "-c",
        "import importlib.metadata as m, psycopg; print(m.version('procrastinate'))",
    ]
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
    """Procrastinate's figures: bulk and one-at-a-time enqueue, a drain grid, latency."""
    import benchlib as bl

    me = str(Path(__file__).resolve())
    out: dict[str, Any] = {"version": VERSION}

    def driver(*args: Any) -> Any:
        return bl.run_json([python, me, *map(str, args)])

    def reset(dsn: str) -> None:
        bl.exec_sql(
            dsn,
            "TRUNCATE procrastinate_jobs, procrastinate_events, bench_rows, bench_latency CASCADE",
            "VACUUM ANALYZE procrastinate_jobs",
        )

    with bl.scratch_db(admin_dsn, "procrastinate") as dsn:
        driver("install", dsn)
        bl.setup_bench_tables(dsn)
        reset(dsn)

        if not drains_only:
            log(f"Procrastinate: bulk enqueue of {sizes.bulk}")
            r = driver("bulk", dsn, sizes.bulk, 5000)
            out["bulk_enqueue"] = {
                "tasks": r["tasks"],
                "seconds": round(r["seconds"], 3),
                "jobs_per_s": round(r["tasks"] / r["seconds"], 1),
                "method": "Task.batch_defer_async, 5000 jobs per call",
            }

            reset(dsn)
            log(f"Procrastinate: one-at-a-time enqueue of {sizes.proc_one}")
            r = driver("one", dsn, sizes.proc_one)
            out["one_enqueue"] = {
                "tasks": r["tasks"],
                "seconds": round(r["seconds"], 3),
                "jobs_per_s": round(r["tasks"] / r["seconds"], 1),
            }

        drains: list[dict[str, Any]] = []
        n = sizes.proc_drain
        for task in ("noop", "write_row"):
            for procs, conc in sizes.proc_grid:

                def one(task: str = task, procs: int = procs, conc: int = conc) -> Any:
                    reset(dsn)
                    log(f"Procrastinate: drain {n} {task}, {procs} procs x {conc}")
                    driver("bulk", dsn, n, 5000, task)
                    bl.exec_sql(dsn, "ANALYZE procrastinate_jobs")
                    workers = [
                        bl.Proc(
                            [python, me, "worker", dsn, str(conc)],
                            {},
                            HERE,
                            f"procrastinate-{procs}x{conc}-{i}",
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
                        tasks=n,
                        remaining_sql=REMAINING_SQL,
                        verify_sql=verify,
                    )

                drains.append(
                    {
                        "task": task,
                        "processes": procs,
                        "concurrency": conc,
                        "setting": f"{procs} procs x {conc} async",
                        **bl.best_drain(1, one),
                    }
                )
        out["drains"] = drains
        if drains_only:
            return out

        reset(dsn)
        log(f"Procrastinate: latency, {sizes.proc_latency} samples")
        out["latency"] = _latency(bl, dsn, python, me, sizes.proc_latency, sizes)
    return out


def _latency(bl: Any, dsn: str, python: str, me: str, n: int, sizes: Any) -> dict[str, Any]:
    worker = bl.Proc([python, me, "worker", dsn, "10"], {}, HERE, "procrastinate-lat").start()
    try:
        time.sleep(3.0)  # start-up
        bl.run_json([python, me, "latency", dsn, "5", str(sizes.latency_gap_s)])
        _wait_rows(bl, dsn, 5, worker)
        bl.exec_sql(dsn, "DELETE FROM bench_latency")
        bl.run_json([python, me, "latency", dsn, str(n), str(sizes.latency_gap_s)])
        _wait_rows(bl, dsn, n, worker)
    finally:
        worker.stop()
    summary: dict[str, Any] = bl.latency_summary(
        bl.fetch_floats(dsn, "SELECT ms FROM bench_latency")
    )
    summary["method"] = (
        f"1 worker (concurrency 10), idle; one defer every {sizes.latency_gap_s * 1000:.0f} ms"
    )
    return summary


def _wait_rows(bl: Any, dsn: str, n: int, worker: Any, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while bl.fetch_floats(dsn, "SELECT count(*) FROM bench_latency")[0] < n:
        if not worker.alive() or time.monotonic() > deadline:
            raise bl.BenchError(f"Procrastinate latency: waited for {n} rows:\n{worker.tail()}")
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
