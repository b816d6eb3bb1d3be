"""pgidem's benchmark suite: one command, a table of figures, and a JSON file.

    python bench/run.py [--dsn DSN] [--quick] [--compare] [--no-pgbench] [--json FILE]

Every figure is measured in this run, on scratch databases this script creates on the server
and drops afterwards (``pgidem_bench_*``); see bench/README.md for what each figure means and
how it is measured.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg
from benchlib import (
    BENCH,
    BenchError,
    DrainResult,
    admin_connect,
    best_drain,
    dbname_of,
    scratch_db,
    wait_idle,
    xact_commit,
)
from psycopg.conninfo import conninfo_to_dict

DEFAULT_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
#: Where the other engineers' scripts (enqueue.py, latency.py, ...) are run from: bench/, or
#: the snapshot's bench/ with --ref.
EXTERNAL = BENCH
RESULTS = BENCH / "results"


@dataclass(frozen=True)
class Sizes:
    """How much work each section does."""

    pgbench_s: int
    bulk: int
    one: int
    drain: int
    grid: tuple[tuple[int, int, int], ...]  # (processes, concurrency, batch size)
    latency: int
    latency_gap_s: float
    history: int
    rss: int
    pgq_grid: tuple[tuple[int, int], ...]  # (processes, batch size)
    pgq_one: int
    proc_drain: int
    proc_grid: tuple[tuple[int, int], ...]  # (processes, concurrency)
    proc_one: int
    proc_latency: int
    #: Rounds of every system's drain grid, taken in turn; per setting the fastest run counts.
    drain_runs: int = 1


FULL = Sizes(
    pgbench_s=12,
    bulk=20_000,
    one=2_000,
    drain=20_000,
    grid=((1, 4, 16), (2, 4, 32), (2, 2, 500), (2, 1, 500)),
    latency=300,
    latency_gap_s=0.02,
    history=500_000,
    rss=100_000,
    pgq_grid=((1, 100), (2, 100), (2, 500), (1, 500)),
    pgq_one=2_000,
    proc_drain=2_000,
    proc_grid=((2, 10), (2, 30)),
    proc_one=1_000,
    proc_latency=100,
    drain_runs=2,
)
QUICK = Sizes(
    pgbench_s=3,
    bulk=1_000,
    one=100,
    drain=1_000,
    grid=((1, 4, 16), (2, 4, 16)),
    latency=20,
    latency_gap_s=0.02,
    history=20_000,
    rss=0,
    pgq_grid=((2, 500),),
    pgq_one=100,
    proc_drain=300,
    proc_grid=((2, 10),),
    proc_one=100,
    proc_latency=10,
)
#: The least that exercises every section (the smoke test's mode): figures mean nothing.
SMOKE = Sizes(
    pgbench_s=1,
    bulk=200,
    one=20,
    drain=200,
    grid=((1, 2, 16),),
    latency=5,
    latency_gap_s=0.02,
    history=2_000,
    rss=300,
    pgq_grid=((1, 100),),
    pgq_one=20,
    proc_drain=50,
    proc_grid=((1, 4),),
    proc_one=20,
    proc_latency=3,
)

PGBENCH_SCRIPT = """\
\\set aid random(1, 100000 * :scale)
\\set bid random(1, 1 * :scale)
\\set tid random(1, 10 * :scale)
\\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime)
  VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
END;
"""


def log(message: str) -> None:
    print(f"[{datetime.now(UTC).strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the machine ---------------------------------------------------------------------------------


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine(admin_dsn: str) -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    with admin_connect(admin_dsn) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN ('fsync', "
                "'synchronous_commit', 'shared_buffers', 'max_connections', 'wal_level', "
                "'full_page_writes')"
            ).fetchall()
        )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgres": version[0] if version else "?",
        "postgres_settings": settings,
        "psycopg": psycopg.__version__,
    }


# -- pgbench -------------------------------------------------------------------------------------


def run_pgbench(admin_dsn: str, seconds: int) -> dict[str, Any]:
    """pgbench's commit rate: one UPDATE + one INSERT per transaction, 4 clients."""
    with scratch_db(admin_dsn, "pgbench") as dsn:
        params = conninfo_to_dict(dsn)
        base = [
            "pgbench",
            "-h",
            str(params.get("host", "127.0.0.1")),
            "-p",
            str(params.get("port", 5432)),
            "-U",
            str(params.get("user", "postgres")),
        ]
        env = {**os.environ}
        if params.get("password"):
            env["PGPASSWORD"] = str(params["password"])
        db = dbname_of(dsn)
        subprocess.run([*base, "-i", "-s", "1", "-q", db], check=True, capture_output=True, env=env)
        with tempfile.NamedTemporaryFile("w", suffix=".sql") as script:
            script.write(PGBENCH_SCRIPT)
            script.flush()
            wait_idle(admin_dsn, db)
            before = xact_commit(admin_dsn, db)
            out = subprocess.run(
                [*base, "-n", "-c", "4", "-j", "2", "-T", str(seconds), "-f", script.name, db],
                check=True,
                capture_output=True,
                text=True,
                env=env,
            ).stdout
            wait_idle(admin_dsn, db)
            after = xact_commit(admin_dsn, db)
    match = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out)
    if not match:
        raise BenchError(f"cannot read pgbench's tps from:\n{out}")
    return {
        "clients": 4,
        "seconds": seconds,
        "tps": round(float(match.group(1)), 1),
        "xact_commit_delta": after - before,
        "script": "BEGIN; UPDATE pgbench_accounts; INSERT INTO pgbench_history; END",
    }


# -- pgidem --------------------------------------------------------------------------------------


def use_ref(ref: str) -> dict[str, str]:
    """Run pgidem from a snapshot of a commit (``git archive``), not from the working tree:
    figures for committed code while the tree is being edited. Put it first on the path of
    this process and of every worker it starts."""
    root = BENCH.parent
    commit = subprocess.run(
        ["git", "rev-parse", ref], cwd=root, check=True, capture_output=True, text=True
    ).stdout.strip()
    snap = Path(tempfile.mkdtemp(prefix=f"pgidem-bench-{commit[:8]}-"))
    archive = subprocess.run(
        ["git", "archive", commit, "pgidem", "sql", "bench"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(snap)], input=archive, check=True)
    sys.path.insert(1, str(snap))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(snap), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    global EXTERNAL
    EXTERNAL = snap / "bench"
    return {"ref": ref, "commit": commit, "snapshot": str(snap)}


def working_tree() -> dict[str, str]:
    root = BENCH.parent
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "pgidem", "sql"],
        cwd=root,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {"ref": "working tree", "commit": commit, "dirty": "yes" if dirty else "no"}


def compile_bytecode(root: Path) -> None:
    """Write the bytecode of pgidem and of the bench's modules under ``root``, as installing a
    wheel does. The compared systems run from packages pip installed and byte-compiled; pgidem
    runs from source, and where ``PYTHONDONTWRITEBYTECODE`` is set (as on the 2-core machine)
    every worker process compiled pgidem again as it started: about 40 ms of a 20,000-task
    drain's 1.5 to 1.7 s. The workers still read what is written here (that variable only
    stops writing)."""
    for path in (root / "pgidem", root / "bench"):
        compileall.compile_dir(str(path), quiet=1, workers=1)


def pgidem_drain_grid(admin_dsn: str, dsn: str, sizes: Sizes) -> list[dict[str, Any]]:
    """pgidem's drain grid, each setting once, in the scratch database ``dsn``."""
    import pgidem_drain as pgd

    drains: list[dict[str, Any]] = []
    for task in ("noop", "write_row"):
        for procs, conc, batch in sizes.grid:

            def one(
                task: str = task, procs: int = procs, conc: int = conc, batch: int = batch
            ) -> DrainResult:
                pgd.reset(dsn)
                log(f"pgidem: drain {sizes.drain} {task}, {procs} x {conc}, batch {batch}")
                return pgd.run_drain(
                    admin_dsn,
                    dsn,
                    tasks=sizes.drain,
                    task=task,
                    procs=procs,
                    concurrency=conc,
                    batch_size=batch,
                )

            drains.append(
                {
                    "task": task,
                    "processes": procs,
                    "concurrency": conc,
                    "batch_size": batch,
                    "setting": f"{procs} procs x {conc} threads, batch {batch}",
                    **best_drain(1, one),
                }
            )
    return drains


def bench_pgidem(admin_dsn: str, sizes: Sizes, quick: bool) -> dict[str, Any]:
    import pgidem_drain as pgd

    out: dict[str, Any] = {}
    with scratch_db(admin_dsn, "pgidem") as dsn:
        pgd.setup(dsn)
        pgd.reset(dsn)
        external = external_enqueue(admin_dsn, sizes)
        if external is not None:
            out.update(external)
        else:
            log(f"pgidem: bulk enqueue of {sizes.bulk}")
            seconds = pgd.enqueue_bulk(dsn, sizes.bulk)
            out["bulk_enqueue"] = {
                "tasks": sizes.bulk,
                "seconds": round(seconds, 3),
                "jobs_per_s": round(sizes.bulk / seconds, 1),
                "method": "App.enqueue_many (default batch size), one transaction, no keys",
                "source": "bench/pgidem_drain.py",
            }
            pgd.reset(dsn)
            log(f"pgidem: one-at-a-time enqueue of {sizes.one}")
            out["one_enqueue"] = pgd.enqueue_one(dsn, sizes.one)
            out["one_enqueue"]["source"] = "bench/pgidem_drain.py"

        drains = pgidem_drain_grid(admin_dsn, dsn, sizes)
        out["drains"] = drains

        pgd.reset(dsn)
        latency = external_latency(admin_dsn, sizes)
        if latency is None:
            log(f"pgidem: latency, {sizes.latency} samples")
            latency = pgd.run_latency(
                admin_dsn, dsn, samples=sizes.latency, gap_s=sizes.latency_gap_s
            )
            latency["method"] = (
                "1 worker (concurrency 4, batch 16, poll 1 s), idle; one App.enqueue every "
                f"{sizes.latency_gap_s * 1000:.0f} ms; handler start minus the enqueuer's "
                "clock before the call"
            )
            latency["source"] = "bench/pgidem_drain.py"
        out["latency"] = latency

        best = max((d for d in drains if d["task"] == "noop"), key=lambda d: d["jobs_per_s"])
        procs, conc, batch = best["processes"], best["concurrency"], best["batch_size"]

        # The two sides take turns, each in a database of its own (a drain of 20,000 no-op
        # tasks lasts about a second, and this machine's speed drifts by 10-15 % over the 20
        # s that one side's drains took when they ran one after the other: the same code's
        # ratio read 0.80 to 1.05 between runs). Three drains each, alternating; the best of
        # each side counts. The empty table is emptied before each of its drains, the
        # history's previous drain deleted before each of its own.
        with scratch_db(admin_dsn, "history") as hdsn:
            pgd.setup(hdsn)
            pgd.reset(hdsn)
            log(f"pgidem: history: inserting {sizes.history} finished tasks")
            insert_s = pgd.add_history(hdsn, sizes.history)
            sides: dict[str, list[DrainResult]] = {"empty": [], "history": []}
            for i in range(3):
                for side, side_dsn in (("empty", dsn), ("history", hdsn)):
                    if side == "empty":
                        pgd.reset(dsn)
                        pgd.checkpoint(dsn)
                    elif i:
                        pgd.clear_drained(hdsn)
                    log(f"pgidem: history: {side} ({i + 1}/3), {procs} x {conc}, batch {batch}")
                    sides[side].append(
                        pgd.run_drain(
                            admin_dsn,
                            side_dsn,
                            tasks=sizes.drain,
                            task="noop",
                            procs=procs,
                            concurrency=conc,
                            batch_size=batch,
                        )
                    )
        empty, full = (max(sides[k], key=lambda d: d.jobs_per_s) for k in ("empty", "history"))
        out["history"] = {
            "history_rows": sizes.history,
            "insert_seconds": round(insert_s, 1),
            "setting": best["setting"],
            "empty": empty.as_dict(),
            "with_history": full.as_dict(),
            "ratio": round(full.jobs_per_s / empty.jobs_per_s, 3),
            "runs_jobs_per_s": {k: [round(d.jobs_per_s, 1) for d in v] for k, v in sides.items()},
        }

        if sizes.rss:
            pgd.reset(dsn)
            log(f"pgidem: memory over a {sizes.rss}-task run (1 worker, defaults)")
            r = pgd.run_memory(dsn, tasks=sizes.rss, chunk=min(10_000, sizes.rss))
            out["rss"] = pgd.rss_summary(r)
            out["rss"]["setting"] = (
                "1 proc x 4 threads, batch 16 (the CLI defaults); tasks fed 10,000 at a time "
                "whenever fewer than 5,000 wait"
            )
    return out


def _external(script: str, *args: str) -> str | None:
    """Run another engineer's bench script (if it exists) and return its stdout, or None when
    it is missing or fails (then run.py measures with its own code, and says so)."""
    path = EXTERNAL / script
    if not path.exists():
        return None
    log(f"pgidem: running bench/{script} {' '.join(args)}")
    try:
        proc = subprocess.run(
            [sys.executable, str(path), *args],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=EXTERNAL.parent,
        )
    except subprocess.TimeoutExpired:
        log(f"bench/{script} timed out; measuring with run.py's own code")
        return None
    if proc.returncode != 0:
        log(f"bench/{script} failed ({proc.returncode}); measuring with run.py's own code:")
        log(proc.stderr[-1500:])
        return None
    return proc.stdout


def external_enqueue(admin_dsn: str, sizes: Sizes) -> dict[str, Any] | None:
    """Bulk and one-at-a-time enqueue from bench/enqueue.py (the core engineer's), parsed."""
    text = _external(
        "enqueue.py", "--dsn", admin_dsn, "--bulk", str(sizes.bulk), "--one", str(sizes.one)
    )
    if text is None:
        return None
    line = re.compile(
        r"^(?P<label>\S.*?)\s{2,}(?P<rate>[\d,]+) tasks/s\s+(?P<s>[\d.]+) s\s+(?P<rest>.*)$"
    )
    rows = {m["label"]: m for m in map(line.match, text.splitlines()) if m}
    bulk = rows.get("bulk, no keys")
    one = next((m for label, m in rows.items() if label.startswith("one at a time")), None)
    trips = re.search(r"([\d.]+) round trips per call", one["rest"]) if one else None
    if bulk is None or one is None or trips is None:
        log("cannot read bench/enqueue.py's output; measuring with run.py's own code")
        return None
    return {
        "bulk_enqueue": {
            "tasks": sizes.bulk,
            "seconds": float(bulk["s"]),
            "jobs_per_s": float(bulk["rate"].replace(",", "")),
            "method": f"bulk, no keys: {bulk['rest']}",
            "source": "bench/enqueue.py",
            "variants": {
                label: float(m["rate"].replace(",", ""))
                for label, m in rows.items()
                if label.startswith("bulk")
            },
        },
        "one_enqueue": {
            "tasks": sizes.one,
            "seconds": float(one["s"]),
            "jobs_per_s": float(one["rate"].replace(",", "")),
            "round_trips_per_call": float(trips[1]),
            "method": f"{one['label']}: {one['rest']}",
            "source": "bench/enqueue.py",
        },
    }


def external_latency(admin_dsn: str, sizes: Sizes) -> dict[str, Any] | None:
    """Enqueue-to-start latency from bench/latency.py (the worker engineer's), parsed."""
    text = _external(
        "latency.py",
        "--dsn",
        admin_dsn,
        "--samples",
        str(sizes.latency),
        "--pause",
        str(sizes.latency_gap_s),
    )
    if text is None:
        return None
    m = re.search(r"p50 ([\d.]+) ms\s+p90 ([\d.]+) ms\s+p99 ([\d.]+) ms\s+max ([\d.]+) ms", text)
    if m is None:
        log("cannot read bench/latency.py's output; measuring with run.py's own code")
        return None
    p50, p90, p99, top = map(float, m.groups())
    return {
        "samples": sizes.latency,
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
        "max_ms": top,
        "method": text.strip().splitlines()[0],
        "source": "bench/latency.py",
    }


def run_extras(admin_dsn: str, sizes: Sizes) -> dict[str, str]:
    """The other engineers' separate benchmarks (pruning under load, the cost of queue limits),
    run as they are; their printed output goes into the report verbatim."""
    small = sizes is not FULL
    extras = {
        "prune.py": [
            "--dsn",
            admin_dsn,
            "--tasks",
            "20000" if small else "200000",
            "--seconds",
            "1" if small else "5",
            "--window",
            "1" if small else "3",
        ],
        "claim_limits.py": [
            "--dsn",
            admin_dsn,
            "--tasks",
            "2000" if small else "20000",
            "--seconds",
            "0.5" if small else "1",
        ],
    }
    out: dict[str, str] = {}
    for script, args in extras.items():
        text = _external(script, *args)
        out[script] = text.strip() if text is not None else "(missing or failed)"
    return out


# -- competitors ---------------------------------------------------------------------------------


def bench_competitors(admin_dsn: str, sizes: Sizes, drains_only: bool = False) -> dict[str, Any]:
    from compare import pgqueuer_bench, procrastinate_bench

    out: dict[str, Any] = {}
    for name, module, label in (
        ("pgqueuer", pgqueuer_bench, "PgQueuer"),
        ("procrastinate", procrastinate_bench, "Procrastinate"),
    ):
        log(f"{label}: virtual environment")
        python = module.ensure_venv(log)
        out[name] = module.bench(admin_dsn, python, sizes, log, drains_only=drains_only)
    return out


def merge_drains(into: list[dict[str, Any]], again: list[dict[str, Any]]) -> None:
    """Fold a later round's drains into the first round's: per setting and task, the faster
    run's figures, and every run's jobs/s in ``runs_jobs_per_s``."""
    later = {(d["setting"], d["task"]): d for d in again}
    for i, first in enumerate(into):
        other = later.get((first["setting"], first["task"]))
        if other is None:
            continue
        runs = first["runs_jobs_per_s"] + other["runs_jobs_per_s"]
        faster = other if other["jobs_per_s"] > first["jobs_per_s"] else first
        into[i] = {**faster, "runs_jobs_per_s": runs}


def drain_rounds(admin_dsn: str, sizes: Sizes, result: dict[str, Any], compare: bool) -> None:
    """The drain grids again, ``sizes.drain_runs - 1`` more rounds, every system in turn (so
    that a system's runs are not all in one stretch of the machine's drift); per setting the
    faster run counts."""
    import pgidem_drain as pgd

    for n in range(2, sizes.drain_runs + 1):
        log(f"drain round {n} of {sizes.drain_runs}")
        with scratch_db(admin_dsn, "pgidem") as dsn:
            pgd.setup(dsn)
            merge_drains(result["pgidem"]["drains"], pgidem_drain_grid(admin_dsn, dsn, sizes))
        if compare:
            for name, data in bench_competitors(admin_dsn, sizes, drains_only=True).items():
                merge_drains(result["compare"][name]["drains"], data["drains"])


# -- the table -----------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def _best(drains: list[dict[str, Any]], task: str) -> dict[str, Any] | None:
    rows = [d for d in drains if d["task"] == task]
    return max(rows, key=lambda d: d["jobs_per_s"]) if rows else None


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with what was measured and whether it is met."""
    p = result["pgidem"]
    pgq = result.get("compare", {}).get("pgqueuer")
    rows: list[dict[str, Any]] = []

    def add(name: str, measured: float | None, op: str, limit: float, unit: str = "") -> None:
        met = None
        if measured is not None:
            met = measured >= limit if op == ">=" else measured <= limit
        rows.append(
            {
                "target": name,
                "measured": None if measured is None else round(measured, 3),
                "wanted": f"{op} {limit}{unit}",
                "met": met,
            }
        )

    noop, write = _best(p["drains"], "noop"), _best(p["drains"], "write_row")
    pgq_noop = _best(pgq["drains"], "noop") if pgq else None
    pgq_write = _best(pgq["drains"], "write_row") if pgq else None
    add(
        "drain no-op, x PgQueuer best",
        _ratio(noop and noop["jobs_per_s"], pgq_noop and pgq_noop["jobs_per_s"]),
        ">=",
        1.0,
        "x",
    )
    add(
        "drain one-row write, x PgQueuer best",
        _ratio(write and write["jobs_per_s"], pgq_write and pgq_write["jobs_per_s"]),
        ">=",
        2.0,
        "x",
    )
    add("commits per task, best no-op drain", noop and noop["commits_per_task"], "<=", 0.25)
    add("commits per task, best one-row drain", write and write["commits_per_task"], "<=", 0.25)
    add(
        "bulk enqueue, x PgQueuer",
        _ratio(p["bulk_enqueue"]["jobs_per_s"], pgq and pgq["bulk_enqueue"]["jobs_per_s"]),
        ">=",
        1.5,
        "x",
    )
    # Two decimals: psycopg prepares the statement once per connection (one extra round trip
    # in the whole run), which is not a round trip per call.
    add(
        "one-at-a-time enqueue, round trips per call",
        round(p["one_enqueue"]["round_trips_per_call"], 2),
        "<=",
        1.0,
    )
    add("latency p50", p["latency"]["p50_ms"], "<=", 3.0, " ms")
    add("latency p99", p["latency"]["p99_ms"], "<=", 15.0, " ms")
    add("drain with history, x empty table", p["history"]["ratio"], ">=", 0.9, "x")
    if "rss" in p:
        r = p["rss"]
        add(
            "worker RSS, end / at 10 % of the run",
            r["end_kib"] / r["at_10pct_kib"],
            "<=",
            1.05,
            "x",
        )
    return rows


def table(result: dict[str, Any]) -> str:
    """The whole result as Markdown tables."""
    p = result["pgidem"]
    cmp_ = result.get("compare", {})
    pgq, proc = cmp_.get("pgqueuer"), cmp_.get("procrastinate")
    tps = result.get("pgbench", {}).get("tps")
    lines: list[str] = []
    m = result["machine"]
    lines.append(
        f"Run {result['started_at']} ({result['mode']}) on {m['cpu']}, "
        f"{m['cores']} cores, {m['memory_gib']} GiB; PostgreSQL {m['postgres']} "
        f"(fsync={m['postgres_settings'].get('fsync')}, synchronous_commit="
        f"{m['postgres_settings'].get('synchronous_commit')}); load average "
        f"{result['load_before']} before, {result['load_after']} after. pgidem at "
        f"{result['code']['ref']} ({result['code']['commit'][:10]})."
    )
    lines.append("")
    head = ["figure", "pgidem", "x pgbench"]
    if pgq:
        head += [f"PgQueuer {pgq['version']}", "x pgbench"]
    if proc:
        head += [f"Procrastinate {proc['version']}", "x pgbench"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))

    def tput(label: str, get: Callable[[dict[str, Any]], float | None]) -> None:
        cells = [label]
        for sys_ in [p] + [s for s in (pgq, proc) if s is not None]:
            v = get(sys_)
            cells += [_fmt(v), _fmt(_ratio(v, tps), 2)]
        lines.append("| " + " | ".join(cells) + " |")

    def best_of(task: str) -> Callable[[dict[str, Any]], float | None]:
        def get(s: dict[str, Any]) -> float | None:
            b = _best(s.get("drains", []), task)
            return b["jobs_per_s"] if b else None

        return get

    lines.append(
        f"| pgbench commits/s (UPDATE+INSERT, 4 clients) | {_fmt(tps)} "
        f"| {'1.00' if tps else '-'} |" + (" | |" if pgq else "") + (" | |" if proc else "")
    )
    tput("drain no-op, best setting, jobs/s", best_of("noop"))
    tput("drain one-row write, best setting, jobs/s", best_of("write_row"))
    tput("bulk enqueue, jobs/s", lambda s: s["bulk_enqueue"]["jobs_per_s"])
    tput("one-at-a-time enqueue, jobs/s", lambda s: s["one_enqueue"]["jobs_per_s"])

    def cells(get: Callable[[dict[str, Any]], str]) -> str:
        out = [get(p), ""]
        for s in (pgq, proc):
            if s is not None:
                out += [get(s), ""]
        return " | ".join(out)

    def cpt(task: str) -> Callable[[dict[str, Any]], str]:
        def get(s: dict[str, Any]) -> str:
            b = _best(s.get("drains", []), task)
            return _fmt(b["commits_per_task"], 3) if b else "-"

        return get

    lines.append(f"| commits per task, best no-op drain | {cells(cpt('noop'))} |")
    lines.append(f"| commits per task, best one-row drain | {cells(cpt('write_row'))} |")

    def lat(s: dict[str, Any]) -> str:
        latency = s.get("latency")
        if not latency:
            return "-"
        return (
            f"{latency['p50_ms']:.1f} / {latency['p90_ms']:.1f} / {latency['p99_ms']:.1f}"
            f" / {latency['max_ms']:.1f}"
        )

    lines.append(f"| enqueue to start, idle worker, p50 / p90 / p99 / max ms | {cells(lat)} |")
    h = p["history"]
    lines.append(
        f"| drain no-op with {h['history_rows']:,} finished tasks, x empty table "
        f"| {h['ratio']:.2f} ({_fmt(h['with_history']['jobs_per_s'])} vs "
        f"{_fmt(h['empty']['jobs_per_s'])} jobs/s) | |"
        + (" | |" if pgq else "")
        + (" | |" if proc else "")
    )
    if "rss" in p:
        r = p["rss"]
        lines.append(
            f"| worker RSS over {r['tasks']:,} tasks, MiB: start / 10 % / peak / end "
            f"| {r['start_kib'] / 1024:.1f} / {r['at_10pct_kib'] / 1024:.1f} / "
            f"{r['peak_kib'] / 1024:.1f} / {r['end_kib'] / 1024:.1f} | |"
            + (" | |" if pgq else "")
            + (" | |" if proc else "")
        )
    lines.append(
        f"| one-at-a-time enqueue, round trips per call "
        f"| {p['one_enqueue']['round_trips_per_call']:.2f} | |"
        + (" | |" if pgq else "")
        + (" | |" if proc else "")
    )

    lines.append("")
    lines.append(
        "Every drain (wall time from starting the worker processes until none is left; CPU of "
        "the worker processes and of the backends serving them):"
    )
    lines.append("")
    lines.append(
        "| system | task | setting | tasks | s | jobs/s | x pgbench | commits/task "
        "| worker CPU ms/task | server CPU ms/task |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for name, s in (("pgidem", p), ("PgQueuer", pgq), ("Procrastinate", proc)):
        if s is None:
            continue
        for d in s["drains"]:
            lines.append(
                f"| {name} | {d['task']} | {d['setting']} | {d['tasks']:,} | {d['seconds']:.2f} "
                f"| {_fmt(d['jobs_per_s'])} | {_fmt(_ratio(d['jobs_per_s'], tps), 2)} "
                f"| {d['commits_per_task']:.3f} | {d['client_cpu_ms_per_task']:.3f} "
                f"| {d['server_cpu_ms_per_task']:.3f} |"
            )

    lines.append("")
    lines.append("Targets (issue 6):")
    lines.append("")
    lines.append("| target | measured | wanted | met |")
    lines.append("|---|---|---|---|")
    for t in result["targets"]:
        met = {True: "yes", False: "NO", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {_fmt(t['measured'], 3)} | {t['wanted']} | {met} |")
    for script, text in result.get("extras", {}).items():
        lines += ["", f"bench/{script}:", "", "```", text, "```"]
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dsn",
        default=os.environ.get("PGIDEM_BENCH_DSN", DEFAULT_DSN),
        help="a DSN for the server's maintenance database; scratch databases are created "
        "and dropped there (default: $PGIDEM_BENCH_DSN, else %(default)s)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny counts, for development")
    parser.add_argument(
        "--smoke", action="store_true", help="the least that runs every section (for tests)"
    )
    parser.add_argument(
        "--compare", action="store_true", help="also run PgQueuer and Procrastinate"
    )
    parser.add_argument("--no-pgbench", action="store_true", help="skip pgbench")
    parser.add_argument(
        "--extras",
        action="store_true",
        help="also run bench/prune.py and bench/claim_limits.py (their output verbatim)",
    )
    parser.add_argument(
        "--ref",
        help="benchmark pgidem as committed at this git ref (a snapshot), not the working tree",
    )
    parser.add_argument(
        "--json",
        dest="json_file",
        help="write the JSON result here (default: bench/results/<UTC timestamp>.json)",
    )
    parser.add_argument("--markdown", dest="md_file", help="also write the table (Markdown) here")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    code = use_ref(args.ref) if args.ref else working_tree()
    compile_bytecode(Path(code.get("snapshot", BENCH.parent)))
    # pgidem's own log lines (database_selected...) go to stderr, at WARNING, so that stdout
    # holds the tables only. Imported here: --ref has just put its snapshot first on the path.
    from pgidem import _log

    _log.configure("WARNING")

    started = datetime.now(UTC)
    t0 = time.monotonic()
    result: dict[str, Any] = {
        "started_at": started.strftime("%Y-%m-%d %H:%M UTC"),
        "quick": args.quick or args.smoke,
        "mode": "smoke" if args.smoke else "quick" if args.quick else "full",
        "machine": machine(args.dsn),
        "load_before": load_average(),
        "sizes": sizes.__dict__,
        "code": code,
    }
    log(f"load average {result['load_before']}")
    if not args.no_pgbench:
        log(f"pgbench, {sizes.pgbench_s} s")
        result["pgbench"] = run_pgbench(args.dsn, sizes.pgbench_s)
        log(f"pgbench: {result['pgbench']['tps']} tps")
    result["pgidem"] = bench_pgidem(args.dsn, sizes, args.quick)
    if args.compare:
        result["compare"] = bench_competitors(args.dsn, sizes)
    drain_rounds(args.dsn, sizes, result, args.compare)
    if args.extras:
        result["extras"] = run_extras(args.dsn, sizes)
    if not args.no_pgbench and sizes is FULL:
        log(f"pgbench again, {sizes.pgbench_s} s")
        result["pgbench_after"] = run_pgbench(args.dsn, sizes.pgbench_s)
    result["load_after"] = load_average()
    result["duration_s"] = round(time.monotonic() - t0, 1)
    result["targets"] = targets(result)
    import benchlib

    result["scratch_databases"] = list(benchlib.CREATED)
    text = table(result)
    print(text)
    print(f"\n(took {result['duration_s']} s)")

    if args.json_file:
        path = Path(args.json_file)
    else:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.md_file:
        Path(args.md_file).write_text(text + "\n")
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
