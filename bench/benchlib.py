"""What every benchmark shares: scratch databases, commit counters, worker processes, the drain.

The orchestrator (``bench/run.py``) runs in pgidem's virtual environment and measures every
system the same way: it creates a scratch database per system, enqueues with the system's own
client, starts the system's own worker processes, and times the drain itself by polling, from
one connection inside one open READ COMMITTED transaction (each statement sees fresh data, and the
poll adds no commit to the database's counter).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LOG_DIR = Path(tempfile.gettempdir()) / "pgidem-bench-logs"


class BenchError(RuntimeError):
    """A benchmark could not run or its result is not trustworthy (the message says why)."""


def dsn_for(admin_dsn: str, dbname: str) -> str:
    """The admin DSN with another database name."""
    params = conninfo_to_dict(admin_dsn)
    params["dbname"] = dbname
    return make_conninfo(**params)


def url_dsn(dsn: str) -> str:
    """The DSN as a postgresql:// URL (what asyncpg accepts)."""
    from urllib.parse import quote

    p = conninfo_to_dict(dsn)
    auth = quote(str(p.get("user", "postgres")))
    if p.get("password"):
        auth += ":" + quote(str(p["password"]))
    host = p.get("host", "127.0.0.1")
    return f"postgresql://{auth}@{host}:{p.get('port', 5432)}/{quote(str(p['dbname']))}"


def admin_connect(admin_dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(admin_dsn, autocommit=True)


#: Every scratch database this process created (the report lists them; all are dropped).
CREATED: list[str] = []


@contextlib.contextmanager
def scratch_db(admin_dsn: str, label: str, keep: bool = False) -> Iterator[str]:
    """Create a database of our own (``pgidem_bench_<label>_<random>``), yield its DSN, and drop
    it afterwards (unless ``keep``). Never touches a database it did not create."""
    name = f"pgidem_bench_{label}_{uuid.uuid4().hex[:8]}"
    CREATED.append(name)
    with admin_connect(admin_dsn) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield dsn_for(admin_dsn, name)
    finally:
        if not keep:
            with admin_connect(admin_dsn) as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )


def dbname_of(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])


def xact_commit(admin_dsn: str, dbname: str) -> int:
    """The scratch database's own commit counter (other databases' traffic on the shared server
    is in other rows of pg_stat_database)."""
    with admin_connect(admin_dsn) as conn:
        conn.execute("SET stats_fetch_consistency = none")
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (dbname,)
        ).fetchone()
    if row is None:
        raise BenchError(f"no pg_stat_database row for {dbname}")
    return int(row[0])


def wait_idle(admin_dsn: str, dbname: str, timeout: float = 30.0) -> None:
    """Wait until no backend is connected to the database (exiting backends flush their
    statistics, so the commit counter is complete once they are gone)."""
    deadline = time.monotonic() + timeout
    with admin_connect(admin_dsn) as conn:
        while True:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> "
                "pg_backend_pid()",
                (dbname,),
            ).fetchone()
            if row is not None and row[0] == 0:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"backends still connected to {dbname} after {timeout} s")
            time.sleep(0.05)
    time.sleep(0.2)  # the statistics of the last exiting backend reach shared memory


class Poller:
    """Counts rows from one connection inside one open READ COMMITTED transaction: every
    statement sees the latest commits, and polling adds nothing to xact_commit."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn)  # not autocommit: the first statement opens a tx

    def count(self, query: str) -> int:
        row = self.conn.execute(query).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.rollback()
            self.conn.close()


@dataclass
class Proc:
    """A worker process in its own process group, its output in a log file."""

    cmd: Sequence[str]
    env: dict[str, str]
    cwd: Path
    label: str
    log_path: Path = field(init=False)
    popen: subprocess.Popen[bytes] | None = field(init=False, default=None)

    def start(self) -> Proc:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{self.label}-{uuid.uuid4().hex[:6]}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            list(self.cmd),
            env={**os.environ, **self.env},
            cwd=self.cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait ``timeout``, then SIGKILL; return the exit code."""
        assert self.popen is not None
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        self._log.close()
        return self.popen.returncode


def rss_kib(pid: int) -> int | None:
    """A process's resident set size (VmRSS) in KiB, or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (all its threads), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # After the command name: state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def backend_pids(admin_dsn: str, dbname: str) -> list[int]:
    with admin_connect(admin_dsn) as conn:
        return [
            int(r[0])
            for r in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (dbname,),
            )
        ]


@dataclass
class DrainResult:
    """One drain: how long it took and what it cost in commits."""

    tasks: int
    seconds: float
    commits: int
    verified: int
    rss_samples: list[tuple[float, int, int]] = field(default_factory=list)
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0

    @property
    def jobs_per_s(self) -> float:
        return self.tasks / self.seconds if self.seconds > 0 else 0.0

    @property
    def commits_per_task(self) -> float:
        return self.commits / self.tasks if self.tasks else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "seconds": round(self.seconds, 3),
            "jobs_per_s": round(self.jobs_per_s, 1),
            "commits": self.commits,
            "commits_per_task": round(self.commits_per_task, 4),
            "verified": self.verified,
            "client_cpu_ms_per_task": round(self.client_cpu_s * 1000 / self.tasks, 3),
            "server_cpu_ms_per_task": round(self.server_cpu_s * 1000 / self.tasks, 3),
        }


def best_drain(runs: int, one: Callable[[], DrainResult]) -> dict[str, Any]:
    """The fastest of ``runs`` drains (``one`` resets, enqueues and drains once), as a dict,
    with every run's jobs/s under ``runs_jobs_per_s``. A slow drain on a shared machine only
    ever reads low (another tenant, a checkpoint, autovacuum): the best run is the steadier
    estimate, and every system gets the same number of runs."""
    results = [one() for _ in range(max(1, runs))]
    best = max(results, key=lambda r: r.jobs_per_s)
    return {**best.as_dict(), "runs_jobs_per_s": [round(r.jobs_per_s, 1) for r in results]}


def drain(
    *,
    admin_dsn: str,
    dsn: str,
    procs: list[Proc],
    tasks: int,
    remaining_sql: str,
    verify_sql: str | None = None,
    timeout: float = 600.0,
    rss_every: float | None = None,
    done_sql: str | None = None,
) -> DrainResult:
    """Start the worker processes, time from their start until ``remaining_sql`` counts 0,
    stop them, and read the scratch database's commit delta (after every backend has left).

    Args:
        remaining_sql: 0 once every task has finished (a count, or EXISTS cast to int).
        verify_sql: counts what must equal ``tasks`` afterwards (finished tasks, rows written).
        rss_every: sample the first process's VmRSS this often (seconds), with ``done_sql``
            counting finished tasks at each sample.

    Raises:
        BenchError: a worker died, the drain timed out, or the verification failed.
    """
    dbname = dbname_of(dsn)
    wait_idle(admin_dsn, dbname)
    before = xact_commit(admin_dsn, dbname)
    poller = Poller(dsn)
    samples: list[tuple[float, int, int]] = []
    try:
        if poller.count(remaining_sql) == 0:
            raise BenchError(f"nothing waiting before a drain of {tasks} tasks")
        started = time.perf_counter()
        for p in procs:
            p.start()
        next_sample = started
        while True:
            now = time.perf_counter()
            if rss_every is not None and now >= next_sample:
                kib = rss_kib(procs[0].pid)
                done = poller.count(done_sql) if done_sql else 0
                if kib is not None:
                    samples.append((now - started, done, kib))
                next_sample = now + rss_every
            if poller.count(remaining_sql) == 0:
                break
            dead = [p for p in procs if not p.alive()]
            if dead:
                raise BenchError(f"worker {dead[0].label} exited early:\n{dead[0].tail()}")
            if now - started > timeout:
                raise BenchError(f"drain of {tasks} tasks not done after {timeout} s")
            time.sleep(0.02)
        seconds = time.perf_counter() - started
        if rss_every is not None:
            kib = rss_kib(procs[0].pid)
            if kib is not None:
                samples.append((seconds, tasks, kib))
        # CPU used by the workers (all threads) and by the backends serving them (the
        # poller's own backend excluded), read before anything stops.
        client_cpu = sum(cpu_seconds(p.pid) for p in procs)
        server_cpu = sum(
            cpu_seconds(pid)
            for pid in backend_pids(admin_dsn, dbname)
            if pid != poller.conn.info.backend_pid
        )
        verified = poller.count(verify_sql) if verify_sql else tasks
    finally:
        poller.close()
        for p in procs:
            if p.popen is not None:
                p.stop()
    wait_idle(admin_dsn, dbname)
    after = xact_commit(admin_dsn, dbname)
    if verified != tasks:
        raise BenchError(f"verification counted {verified}, expected {tasks}")
    return DrainResult(tasks, seconds, after - before, verified, samples, client_cpu, server_cpu)


def run_json(cmd: Sequence[str], env: dict[str, str] | None = None, timeout: float = 900) -> Any:
    """Run a driver command that prints one JSON object on its last stdout line."""
    proc = subprocess.run(
        list(cmd),
        env={**os.environ, **(env or {})},
        cwd=BENCH,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise BenchError(
            f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if not lines:
        raise BenchError(f"{' '.join(cmd[:4])} ... printed nothing")
    return json.loads(lines[-1])


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def latency_summary(ms: Sequence[float]) -> dict[str, float]:
    return {
        "samples": len(ms),
        "p50_ms": round(percentile(ms, 0.50), 2),
        "p90_ms": round(percentile(ms, 0.90), 2),
        "p99_ms": round(percentile(ms, 0.99), 2),
        "max_ms": round(max(ms), 2) if ms else float("nan"),
    }


def setup_bench_tables(dsn: str) -> None:
    """The tables the handlers of every system write: one row per task, one latency each."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_rows (task_id bigint, at timestamptz)")
        conn.execute("ALTER TABLE bench_rows ALTER COLUMN at SET DEFAULT now()")
        conn.execute("CREATE TABLE IF NOT EXISTS bench_latency (ms float8 NOT NULL)")


def exec_sql(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]


def fetch_floats(dsn: str, query: str) -> list[float]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [float(r[0]) for r in conn.execute(query)]  # type: ignore[arg-type]
