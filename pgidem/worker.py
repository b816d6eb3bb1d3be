"""The worker: claims tasks, runs handlers, completes them fenced and in one transaction.

Threads, and what each one does:

* N **slots**: each claims a batch of tasks (one short transaction), then runs them one after
  another in a *completion transaction*: per task the handler (its writes go through
  ``ctx.conn``, behind a ``SAVEPOINT`` opened when it first reaches the connection) and, for a
  task that wrote, its fenced completion; a failing or fenced task rolls back to its savepoint
  and the others commit together. Tasks that never reached the connection wrote nothing: their
  fenced completions go in one statement just before COMMIT. The transaction commits at the
  end of the batch, or earlier once it has been open ``commit_interval`` seconds, so a batch
  costs one commit however many tasks it holds. Each slot has its own pooled connection.
* one **heartbeat**: extends every lease this worker holds in one statement, marks lost leases
  (and cancelled tasks) for their handlers, abandons handlers past their timeout (a new slot
  takes the place of each; when as many handlers are stuck at once as there are slots, the
  worker stops to be replaced: ``EXIT_STUCK``), and keeps the worker's row in
  ``pgidem.workers`` fresh.
* one **listener**: LISTEN on a dedicated connection. On a NOTIFY from ``pgidem.enqueue`` it
  claims a batch there for an idle slot and hands it over (``_on_notice``), or, with no slot
  idle, wakes one. Slots also poll every ``poll_interval`` seconds, and sleep until the next
  scheduled task when that is sooner.

Crash safety needs nothing from this module: a dead worker's leases expire and the claim path of
any other worker rescues its tasks with new tokens, which the dead worker's completion can never
match.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import itertools
import os
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import FrameType
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg_pool import ConnectionPool

from pgidem import _log, _migrate, _store
from pgidem import errors as _errors
from pgidem.app import App, Task, dump_json
from pgidem.context import Context, LeaseState, let_go_of_rows
from pgidem.errors import (
    MAX_ERROR_MESSAGE,
    MAX_TRACEBACK,
    InvalidInput,
    LeaseLost,
    NonRetryable,
    PgidemError,
    Retry,
    TransactionEnded,
)

if TYPE_CHECKING:
    from pgidem._scheduler import SchedulerConfig

#: A worker whose heartbeat is older than this, in seconds, is gone: its row in
#: pgidem.workers is removed by the heartbeat of any live worker (heartbeats come every 2 s
#: at most, and a worker cut off that long re-registers with its next heartbeat).
STALE_WORKER_S = 60.0

#: What ``Worker.run()`` returns when every slot is stuck in a handler past its timeout and the
#: worker stopped to be replaced (EX_TEMPFAIL): the stuck threads can only go with the process,
#: so exit with it and let a supervisor start a new one. ``pgidem worker`` re-executes itself
#: instead (the same command line, the same pid).
EXIT_STUCK = 75

_SAVEPOINT = "pgidem_task"
# A task's savepoint is opened when its handler first reaches the connection; the previous
# task's, if any, is released in the same round trip (COMMIT would release it anyway).
_SAVEPOINT_OPEN = f"SAVEPOINT {_SAVEPOINT}"
_SAVEPOINT_RENEW = f"RELEASE SAVEPOINT {_SAVEPOINT}; SAVEPOINT {_SAVEPOINT}"
# A task's writes undone, and the transaction back at its own level, where the failure's record
# goes (a row locked by the transaction and updated in a savepoint would become a MultiXact).
_SAVEPOINT_UNDO = f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}; RELEASE SAVEPOINT {_SAVEPOINT}"
#: A transaction that opened this many task savepoints commits before the next task starts.
#: Each task that writes gets a subtransaction id; past 64 in one transaction every other
#: backend's snapshot overflows and looks them up in pg_subtrans (PGPROC_MAX_CACHED_SUBXIDS).
#: A handler's own savepoints count too, hence the margin.
_MAX_SAVEPOINTS = 32
#: Successive clean returns of a task's handler (in this worker) before its writes may go
#: straight into the shared transaction, without a savepoint (``Worker._unguarded``): a task
#: that failed lately gets its savepoint back, so one that fails often does not make its
#: batch-mates run again each time.
_CLEAN_RUNS_UNGUARDED = 50


_COMMAND_DONE = (psycopg.pq.ExecStatus.COMMAND_OK, psycopg.pq.ExecStatus.TUPLES_OK)


def _command(conn: psycopg.Connection[Any], sql: str) -> None:
    """Run pgidem's own parameterless commands of the task transaction (BEGIN, SAVEPOINT,
    RELEASE, COMMIT...) straight through libpq, in one round trip: about 20 us of CPU less than
    a cursor's ``execute`` (no cursor, no query conversion, no prepare bookkeeping), and a task
    that writes sends one of them. Raises the psycopg error of a failed command."""
    with conn.lock:
        result = conn.pgconn.exec_(sql.encode())
    if result.status not in _COMMAND_DONE:
        raise psycopg.errors.error_from_result(result, encoding=conn.info.encoding)


@dataclass
class _Txn:
    """What one completion transaction carries from task to task."""

    #: A savepoint of an earlier task is open (to release when the next one opens).
    savepoint_open: bool = False
    #: Tasks whose handlers succeeded, token -> result JSON, whose completion records wait
    #: for the statements before COMMIT: those that never reached the connection (they wrote
    #: nothing) and those in ``marked``.
    deferred: dict[int, str] = field(default_factory=dict)
    #: Tasks that wrote, marked succeeded inside their savepoints when their handlers returned
    #: (task_mark_succeeded: their fences checked there); their outcomes wait for
    #: task_record_outcomes.
    marked: set[int] = field(default_factory=set)
    #: Savepoints this transaction opened: each task that wrote has a subtransaction id, and
    #: past 64 of them in one transaction PostgreSQL's snapshots overflow (every backend then
    #: looks subtransactions up in pg_subtrans).
    savepoints: int = 0
    #: BEGIN has been sent. It goes with the transaction's first statement (a task's first use
    #: of the connection, or a failure's record): tasks that never reach the connection need
    #: no transaction block, their one completion statement being a transaction of its own.
    begun: bool = False
    #: The batch's tasks not yet run (the list ``_run_transaction`` takes them from).
    pending: list[Claimed] = field(default_factory=list)
    #: Tasks whose rows this transaction locked ahead (task_lock_claims) and found still this
    #: claim's: their completions are certain, nothing of theirs needs checking per task.
    locked: set[int] = field(default_factory=set)
    #: Locked-ahead tasks that wrote: task_complete_many must complete every one of them (or
    #: the transaction rolls back).
    locked_writers: set[int] = field(default_factory=set)
    #: The transaction's id, known once it locked ahead (to tell, if a handler ends the
    #: transaction itself, whether what came before committed).
    xid: int | None = None
    #: Tasks that wrote without a savepoint of their own (``Worker._unguarded``): a failure
    #: from here on cannot be undone alone and rolls the whole transaction back.
    unguarded: set[int] = field(default_factory=set)


@dataclass
class Claimed:
    """A task this worker holds a lease on."""

    task_id: int
    task_name: str
    queue: str
    args: dict[str, Any]
    idempotency_key: str | None
    attempt: int
    max_attempts: int
    token: int
    lease: LeaseState = field(default_factory=LeaseState)
    started_at: float | None = None
    #: monotonic time by which the lease surely ends unless the heartbeat extends it
    lease_until: float = 0.0
    timeout: float | None = None
    thread: threading.Thread | None = None
    #: The slot thread that claimed it (its batch runs on that thread).
    claimer: threading.Thread | None = None
    #: Its handler returned (set under the worker's stuck lock, see ``Worker._stuck``).
    returned: bool = False
    #: The error of a failed attempt whose failure was fenced: kept for its attempt row.
    fenced_error: dict[str, Any] | None = None
    #: The error its handler raised (or the reason its attempt failed), while the transaction
    #: that records the failure is open: a batch-mate's failure may roll that record back, and
    #: it is then recorded again (``Worker._recover_spoiled``).
    failure: BaseException | None = None


@dataclass
class WorkerConfig:
    """How a worker runs. Every field has a default; see ``pgidem worker --help``."""

    queues: Sequence[str] = ("default",)
    concurrency: int = 4
    #: Queues with slots of their own: queue -> slots (``--queue payments=4``). The queues in
    #: ``queues`` that are not here share ``concurrency`` slots.
    queue_concurrency: Mapping[str, int] = field(default_factory=dict)
    #: Run the scheduler of the app's periodic tasks on a thread (see pgidem/_scheduler.py).
    scheduler: bool = True
    lease: float = 30.0
    poll_interval: float = 1.0
    batch_size: int = 16
    commit_interval: float = 0.05
    #: Give every task that writes a savepoint of its own. Off: a quick task with a clean
    #: record writes straight into the transaction it shares with its batch-mates, and when
    #: it then fails, the whole transaction rolls back and the batch-mates that had written
    #: run again (see ``Worker._unguarded``).
    task_savepoints: bool = False
    grace_period: float = 30.0
    reconnect_max: float = 5.0
    worker_id: str | None = None
    #: Seconds between runs of this worker's pruner (see pgidem/_pruner.py); 0: no pruner.
    prune_interval: float = 0.0
    #: Tasks (and once keys) the pruner deletes per batch (one short transaction).
    prune_batch_size: int = 1000
    #: The pruner's retention in seconds; None: the setting pgidem.key_retention (7 days).
    prune_older_than: float | None = None
    #: The scheduler's missed-ticks policy (see pgidem/_scheduler.py): after downtime, the
    #: latest missed tick is enqueued if no older than this many seconds (clamped to the key
    #: retention and ``prune_older_than``).
    catch_up_window: float = 86400.0
    #: Most ticks of one schedule one scheduler pass enqueues; a longer gap is downtime.
    max_catch_up: int = 1000

    def validate(self) -> None:
        """Raise InvalidInput on a setting out of range."""
        if not self.queues and not self.queue_concurrency:
            raise InvalidInput("a worker needs at least one queue")
        for queue, slots in self.queue_concurrency.items():
            if isinstance(slots, bool) or not isinstance(slots, int) or not 1 <= slots <= 1000:
                raise InvalidInput(
                    f"invalid worker setting: the concurrency of queue {queue!r} must be 1 to "
                    f"1000, got {slots!r}"
                )
        checks = [
            (self.concurrency >= 1, f"concurrency must be at least 1, got {self.concurrency}"),
            (1.0 <= self.lease <= 86400, f"lease must be 1 to 86400 seconds, got {self.lease}"),
            (0.01 <= self.poll_interval <= 3600, "poll_interval must be 0.01 to 3600 seconds"),
            (1 <= self.batch_size <= 1000, "batch_size must be 1 to 1000"),
            (0 <= self.commit_interval <= 60, "commit_interval must be 0 to 60 seconds"),
            (self.grace_period >= 0, "grace_period must not be negative"),
            (
                self.prune_interval == 0 or 0.1 <= self.prune_interval <= 7 * 86400,
                "prune_interval must be 0 (off) or 0.1 s to 7 days",
            ),
            (1 <= self.prune_batch_size <= 100000, "prune_batch_size must be 1 to 100000"),
            (
                self.prune_older_than is None or self.prune_older_than >= 0,
                "prune_older_than must not be negative",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidInput(f"invalid worker setting: {message}")
        self.scheduler_config().validate()

    def scheduler_config(self) -> SchedulerConfig:
        """The settings of this worker's scheduler."""
        from pgidem._scheduler import SchedulerConfig

        return SchedulerConfig(
            catch_up_window=self.catch_up_window,
            max_catch_up=self.max_catch_up,
            prune_older_than=self.prune_older_than,
        )


def error_record(exc: BaseException, attempt_status: str = "failed") -> dict[str, Any]:
    """The error of a failed attempt as stored on the attempt row and in a dead outcome."""
    cls = type(exc)
    name = (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )
    tb = "".join(traceback.format_exception(exc))
    return {
        "class": name,
        "message": str(exc)[:MAX_ERROR_MESSAGE],
        "traceback": tb[-MAX_TRACEBACK:],
        "attempt_status": attempt_status,
    }


class Worker:
    """Runs the app's handlers for the tasks of some queues.

    Args:
        app: the application whose registered tasks this worker runs.
        config: settings; keyword arguments override its fields.
    """

    def __init__(self, app: App, config: WorkerConfig | None = None, **overrides: Any) -> None:
        cfg = config or WorkerConfig()
        for key, value in overrides.items():
            if not hasattr(cfg, key):
                raise InvalidInput(f"unknown worker setting {key!r}")
            setattr(cfg, key, value)
        cfg.validate()
        if not app.tasks:
            raise InvalidInput("the app has no registered tasks: nothing for a worker to run")
        self.app = app
        self.config = cfg
        self.queues = list(dict.fromkeys([*cfg.queues, *cfg.queue_concurrency]))
        # Slot groups: the queues a slot claims from, and how many slots do. Queues given a
        # concurrency of their own get their own slots; the rest share `concurrency` slots.
        shared = [q for q in dict.fromkeys(cfg.queues) if q not in cfg.queue_concurrency]
        self._groups: list[tuple[list[str], int]] = [(shared, cfg.concurrency)] if shared else []
        self._groups += [([q], n) for q, n in cfg.queue_concurrency.items()]
        #: Every slot of every group.
        self.slots = sum(n for _, n in self._groups)
        # Which of our queues have limits (their claims lock the limit rows first); refreshed
        # at every heartbeat. A stale entry costs a lock that finds no row; a missing one makes
        # the claim skip that queue until the next heartbeat (never exceed its limits).
        self._limited: set[str] = set()
        self.worker_id = cfg.worker_id or (
            f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        )
        self.log = _log.get(worker_id=self.worker_id)
        #: What its connections show in pg_stat_activity.application_name (at most 63 bytes).
        self.application_name = f"pgidem:{self.worker_id}"[:63]
        self._stopping = threading.Event()
        self._wake = threading.Condition()
        self._wake_seq = 0
        #: Slots waiting for work now (under ``_wake``).
        self._idle = 0
        #: Batches the listener claimed for idle slots (under ``_wake``; see _on_notice).
        self._handoff: collections.deque[list[Claimed]] = collections.deque()
        self._held: dict[int, Claimed] = {}
        self._held_lock = threading.Lock()
        self._pool: ConnectionPool[psycopg.Connection[Any]] | None = None
        self._threads: list[threading.Thread] = []
        self._durations: dict[str, float] = {}
        #: Task name -> its handler's successive clean returns in this worker (see _unguarded).
        self._clean_runs: dict[str, int] = {}
        self._signatures: dict[str, inspect.Signature] = {}
        self._args_fit: set[tuple[str, frozenset[str]]] = set()
        #: What opens a task transaction: BEGIN, then the settings the worker changed for its
        #: own statements (_configure_session) set back, for this transaction, to the session's
        #: own values, so that handlers run with the settings their database and role give.
        self._begin = "BEGIN"
        self._slot_ids = itertools.count()
        self._signals = 0
        self._first_signal_at = 0.0
        #: Tokens of abandoned tasks whose handler has not returned yet: the threads stuck now.
        self._stuck: set[int] = set()
        self._stuck_lock = threading.Lock()
        #: Set when every slot is stuck: the worker stops, to be replaced (see ``run``).
        self._replacing = False
        self._pruned_workers_at = 0.0
        self.counts: dict[str, int] = {}

    # -- lifecycle -----------------------------------------------------------------------------

    def run(self, install_signals: bool = True, *, reexec: bool = False) -> int:
        """Run until stopped (``stop()``, SIGTERM or SIGINT); return the exit code.

        Args:
            install_signals: handle SIGTERM and SIGINT (a graceful stop, then at once).
            reexec: when every slot is stuck in a handler past its timeout, re-execute the
                process (``os.execv`` of the same command line) after stopping gracefully,
                instead of returning ``EXIT_STUCK``. ``pgidem worker`` sets it; a program that
                embeds a worker should not (its command line may not start a worker).

        Returns:
            0 after a stop; ``EXIT_STUCK`` (75) when every slot got stuck and the worker
            stopped to be replaced: exit the process with it (the stuck threads cannot be
            ended otherwise) and let a supervisor start a new one.

        Raises:
            SchemaOutdated, SchemaTooNew: the schema does not match the code.
        """
        previous = {}
        if install_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, self._on_signal)
        try:
            code = self._run()
        finally:
            # An embedding program gets its own handlers back.
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if code == EXIT_STUCK and reexec:
            self._reexec()
        return code

    def _run(self) -> int:
        dsn = self.app.dsn
        if not self._check_schema():
            return 0
        self._pool = ConnectionPool(
            dsn,
            min_size=1,
            # Each slot holds one connection for its batch and may take a second, briefly,
            # for a ctx.step record (which must not use the task's transaction); plus the
            # pruner's, and one for releases and settling.
            max_size=2 * self.slots + 3,
            kwargs={"autocommit": True, "application_name": self.application_name},
            configure=self._configure_session,
            open=False,
            name=f"pgidem-worker-{self.worker_id}",
        )
        self._pool.open(wait=False)
        self.log.info(
            "worker_started",
            queues=self.queues,
            concurrency=self.slots,
            slot_groups={",".join(q): n for q, n in self._groups},
            lease_s=self.config.lease,
            tasks=sorted(self.app.tasks),
            database=self.app.resolved.describe(),
        )
        self._register()
        self._start(self._listen, "pgidem-listener")
        self._start(self._heartbeat_loop, "pgidem-heartbeat")
        if self.config.prune_interval > 0:
            self._start(self._prune_loop, "pgidem-pruner")
        if self.config.scheduler and self.app.periodic_tasks:
            self._start(self._schedule_loop, "pgidem-scheduler")
        for queues, slots in self._groups:
            for _ in range(slots):
                self._start_slot(queues)
        self._stopping.wait()
        self._shutdown()
        return EXIT_STUCK if self._replacing else 0

    def _check_schema(self) -> bool:
        """Check the schema, waiting (with backoff) while the database cannot be reached: a
        worker started before its database, or during a restart, waits for it. Return False
        when asked to stop while waiting.

        Raises:
            SchemaOutdated, SchemaTooNew: the schema does not match the code.
        """
        failures = 0
        while not self._stopping.is_set():
            try:
                with self.app.connect(connect_timeout=5) as conn:
                    _migrate.check(conn)
                return True
            except _errors.DatabaseError as exc:
                if not isinstance(exc.__cause__, psycopg.OperationalError):
                    raise
                failures += 1
                delay = self._backoff(failures)
                self.log.warning("database_unreachable", error=str(exc), retry_in_s=delay)
                self._stopping.wait(delay)
        return False

    def stop(self) -> None:
        """Ask the worker to stop gracefully (what SIGTERM does)."""
        self._stopping.set()
        self._notify()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        # The same kill often reaches us twice at once (sent to the process and to its group,
        # as `timeout` and some supervisors do): only a signal sent later counts as a second.
        if self._signals and now - self._first_signal_at < 0.5:
            return
        self._signals += 1
        self._first_signal_at = self._first_signal_at or now
        if self._signals > 1:
            self.log.warning("worker_killed", signal=signal.Signals(signum).name)
            sys.stderr.flush()
            os._exit(1)
        self.log.info("worker_stopping", signal=signal.Signals(signum).name)
        self.stop()

    def _start(self, target: Any, name: str) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def _start_slot(self, queues: list[str]) -> None:
        thread = threading.Thread(
            target=self._slot_loop, args=(queues,), name=f"pgidem-slot-{next(self._slot_ids)}"
        )
        thread.daemon = True
        thread.pgidem_queues = queues  # type: ignore[attr-defined]
        thread.start()
        self._threads.append(thread)

    def _schedule_loop(self) -> None:
        from pgidem._scheduler import Scheduler

        config = self.config.scheduler_config()
        Scheduler(self.app, self._connection, config, log=self.log).run(self._stopping)

    def _shutdown(self) -> None:
        deadline = time.monotonic() + self.config.grace_period
        # Not the threads stuck in an abandoned handler: their attempts are over (failed by the
        # heartbeat), and they may never return.
        slots = [
            t
            for t in self._threads
            if t.name.startswith("pgidem-slot") and not getattr(t, "pgidem_abandoned", False)
        ]
        for thread in slots:
            thread.join(max(0.0, deadline - time.monotonic()))
        unfinished = [t.name for t in slots if t.is_alive()]
        if unfinished:
            self.log.warning("grace_period_over", unfinished_slots=unfinished)
        # Leases of claimed tasks that never started go back (slots release their own; this
        # catches any left by a slot that did not get to it).
        self._release_unstarted()
        # The heartbeat ends its loop on the stop, but one beat may be under way (it is the
        # heartbeat that stops a worker whose slots are all stuck): let it finish, or its upsert
        # of the worker's row could come after the deregistration and leave the row behind.
        for thread in self._threads:
            if thread.name == "pgidem-heartbeat" and thread is not threading.current_thread():
                thread.join(min(self.config.lease, 10.0))
        with contextlib.suppress(Exception), self._connection() as conn:
            _store.worker_deregister(conn, self.worker_id)
        if self._pool is not None:
            self._pool.close(timeout=1.0)
        self.log.info("worker_stopped", **self.counts)

    # -- connections ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        assert self._pool is not None
        # Short, so that during an outage a slot goes back to its loop (and notices a shutdown)
        # instead of waiting on the pool for a whole lease.
        with self._pool.connection(timeout=min(self.config.lease, 5.0)) as conn:
            yield conn

    @contextlib.contextmanager
    def side_connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled autocommit connection beside a task's own, for a short transaction that
        must not be the task's (``ctx.step`` markers and records)."""
        with self._connection() as conn:
            yield conn

    def _prune_loop(self) -> None:
        from pgidem._pruner import Pruner, PrunerConfig

        config = PrunerConfig(
            interval=self.config.prune_interval,
            older_than=self.config.prune_older_than,
            batch_size=self.config.prune_batch_size,
        )
        Pruner(self._connection, config, log=self.log).run(self._stopping)

    def _backoff(self, attempt: int) -> float:
        return float(min(self.config.reconnect_max, 0.1 * 2**attempt))

    def _notify(self) -> None:
        """Wake every idle slot (shutdown, room freed in a limited queue, the listener back)."""
        with self._wake:
            self._wake_seq += 1
            self._wake.notify_all()

    def _wake_one(self) -> None:
        """Wake one idle slot: a full claim says there may be more work, not how much. (Waking
        every slot on a NOTIFY sent them all to claim the one task an idle worker usually gets,
        and on 2 cores the losers' claims slowed the winner's: enqueue-to-start p50 4.3-4.6 ms
        with 4 slots, 3.6-3.7 with 1; see also ``_on_notice``.) A slot busy meanwhile sees the
        new sequence number and claims again before it waits."""
        with self._wake:
            self._wake_seq += 1
            self._wake.notify()

    # -- claiming ------------------------------------------------------------------------------

    def _claim_limit(self) -> int:
        """How many tasks a slot claims at once: a full batch for short handlers, fewer when
        handlers are slow, so that one slot does not sit on work another slot could start."""
        if not self._durations:
            return self.config.batch_size
        slowest = max(self._durations.values())
        if slowest <= 0:
            return self.config.batch_size
        fit = int(max(self.config.commit_interval, 0.01) / slowest)
        return max(1, min(self.config.batch_size, fit))

    def _claim(
        self, conn: psycopg.Connection[Any], queues: list[str], *, for_slot: bool = True
    ) -> list[Claimed]:
        """Claim a batch for the calling slot (``for_slot``), or for the slot that will take
        it from the hand-off: the listener's claims, for new work, which leave the rescue of
        expired leases to the slots' own claims."""
        # Taken before the claim is sent, so the lease surely ends after it on the server.
        lease_until = time.monotonic() + self.config.lease
        limit = self._claim_limit()
        claim = functools.partial(
            _store.task_claim,
            conn,
            worker_id=self.worker_id,
            queues=queues,
            task_names=list(self.app.tasks),
            limit=limit,
            lease_s=self.config.lease,
            rescue=for_slot,
        )
        limited = [q for q in queues if q in self._limited]
        if not limited:
            rows = claim()
        else:
            # Limits are counted by the claim statement itself, under the limit rows' locks:
            # one transaction, the lock first, so that the claim's snapshot is taken after the
            # previous holder committed (docs/scheduling.md).
            _store.claim_begin(conn)
            try:
                rows = claim(locked=_store.queue_limits_lock(conn, limited))
                conn.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    conn.rollback()
                raise
        claimed = [
            Claimed(
                task_id=r["id"],
                task_name=r["task_name"],
                queue=r["queue"],
                args=r["args"],
                idempotency_key=r["idempotency_key"],
                attempt=r["attempts"],
                max_attempts=r["max_attempts"],
                token=r["fencing_token"],
                timeout=self.app.tasks[r["task_name"]].timeout,
                lease_until=lease_until,
                claimer=threading.current_thread() if for_slot else None,
            )
            for r in rows
        ]
        with self._held_lock:
            for c in claimed:
                self._held[c.token] = c
        if len(claimed) >= limit:
            self._wake_one()  # there may be more: another idle slot can claim it meanwhile
        for c in claimed:
            self.log.debug(
                "task_claimed",
                task_id=c.task_id,
                task_name=c.task_name,
                queue=c.queue,
                attempt=c.attempt,
                fencing_token=c.token,
            )
        return claimed

    def _wait_for_work(
        self, seq: int, conn: psycopg.Connection[Any] | None, queues: list[str]
    ) -> None:
        timeout = self.config.poll_interval
        if conn is not None:
            with contextlib.suppress(PgidemError):
                nxt = _store.next_run_at(conn, queues)
                if nxt is not None:
                    timeout = min(timeout, max(0.0, (nxt - datetime.now(UTC)).total_seconds()))
        with self._wake:
            if self._wake_seq == seq and not self._stopping.is_set() and not self._handoff:
                self._idle += 1
                try:
                    self._wake.wait(timeout)
                finally:
                    self._idle -= 1

    def _take_handoff(self) -> list[Claimed]:
        """A batch the listener claimed for an idle slot, now the calling slot's ([] if none)."""
        if not self._handoff:  # the common case, without the lock
            return []
        with self._wake:
            batch = self._handoff.popleft() if self._handoff else []
        for task in batch:
            task.claimer = threading.current_thread()
        return batch

    # -- the slot ------------------------------------------------------------------------------

    def _slot_loop(self, queues: list[str]) -> None:
        failures = 0
        while not self._stopping.is_set():
            seq = self._wake_seq
            try:
                with self._connection() as conn:
                    batch = self._take_handoff() or self._claim(conn, queues)
                    if batch:
                        self._run_batch(conn, batch)
                        if any(t.queue in self._limited for t in batch):
                            # Room was freed in a limited queue: slots that found it full
                            # should look again now rather than at their next poll.
                            self._notify()
                    failures = 0
                    if not batch:
                        self._wait_for_work(seq, conn, queues)
                if self._abandoned_in_this_thread():
                    return
            except (psycopg.Error, PgidemError, OSError) as exc:
                if self._abandoned_in_this_thread():
                    return
                failures += 1
                delay = self._backoff(failures)
                self.log.warning(
                    "slot_error", error=f"{type(exc).__name__}: {exc}", retry_in_s=delay
                )
                self._stopping.wait(delay)
            except Exception as exc:  # a bug in pgidem: keep the worker alive, say so loudly
                self.log.exception("slot_crashed", error=repr(exc))
                self._stopping.wait(1.0)

    def _abandoned_in_this_thread(self) -> bool:
        return getattr(threading.current_thread(), "pgidem_abandoned", False) is True

    def _run_batch(self, conn: psycopg.Connection[Any], batch: list[Claimed]) -> None:
        """Run a claimed batch in completion transactions; release what was never started."""
        pending = list(batch)
        try:
            while (
                pending
                and not self._stopping.is_set()
                and not self._abandoned_in_this_thread()
                and self._run_transaction(conn, pending)
            ):
                pass
        finally:
            if pending:
                self._release(pending)

    def _run_transaction(self, conn: psycopg.Connection[Any], pending: list[Claimed]) -> bool:
        """One completion transaction: run tasks from ``pending`` (removing them) until the
        batch is done or the transaction has been open ``commit_interval``; then commit.
        Return False when the connection can no longer be used for the rest of the batch."""
        done: list[tuple[Claimed, str, float]] = []
        fenced: list[Claimed] = []
        current: Claimed | None = None
        committing = False
        opened = time.monotonic()
        txn = _Txn(pending=pending)
        try:
            while pending and not self._stopping.is_set():
                task = pending[0]
                if done and (
                    txn.savepoints >= _MAX_SAVEPOINTS
                    or task.timeout is not None
                    or time.monotonic() - opened >= self.config.commit_interval
                    or self._durations.get(task.task_name, float("inf"))
                    > self.config.commit_interval
                ):
                    # Commit what is done before a task with a time limit, or one not known to
                    # be quick, starts: a handler that runs long (or gets stuck) must hold
                    # back nothing but its own work (the rows of completed tasks stay locked,
                    # and their writes invisible, until this transaction commits).
                    break
                current = pending.pop(0)
                if (
                    current.lease.lost.is_set()
                    or current.lease.cancelled.is_set()
                    or current.lease_until < time.monotonic()
                ):
                    # Its lease went while it waited its turn in the batch: another worker may
                    # be running it (or it was cancelled). Running it here could only repeat
                    # its effects; its completion would be refused anyway. Give it back in
                    # case it is still ours after all (the heartbeat was only late): the
                    # release is fenced on the token, so it does nothing otherwise.
                    self._finished(current, "skipped", 0.0)
                    self._release([current])
                    current = None
                    continue
                outcome, duration = self._run_one(conn, current, txn)
                if outcome == "spoiled":
                    self._recover_spoiled(conn, done, current, duration, txn)
                    return True
                if outcome == "ended_transaction":
                    # The handler ended the transaction: what came before it in this
                    # transaction is in an unknown state (committed or rolled back).
                    self._recover_after_ended_transaction(done, current, duration, txn)
                    return not conn.closed
                done.append((current, outcome, duration))
                # Its row is now locked by this transaction (or its claim is over): the
                # heartbeat has nothing left to do for it, and must not take the moment after
                # COMMIT, when the task is no longer running, for a lost lease.
                self._forget(current)
                current = None
                if outcome == "fenced":
                    fenced.append(done[-1][0])
                if outcome == "abandoned":
                    break
            # Not begun: only tasks that wrote nothing, and their completion statement commits
            # by itself (from here on, a failure leaves the outcome unknown).
            committing = not txn.begun
            if txn.deferred:
                fenced += self._complete_deferred(conn, done, txn)
            committing = True
            if txn.begun:
                _command(conn, "COMMIT")
        except BaseException as exc:
            with contextlib.suppress(Exception):
                if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    conn.execute("ROLLBACK")
            # Nothing of this transaction is known to have committed: stop heartbeating these
            # tasks so their leases expire and the claim path rescues them with new tokens. If
            # COMMIT itself failed (the connection dropped), it may have committed or not: the
            # next claim tells, as the task is then either finished or rescued; it is never
            # committed twice, as nothing here runs it again.
            error = f"{type(exc).__name__}: {exc}"
            for task, outcome, duration in done:
                if outcome != "abandoned":  # the heartbeat already recorded and logged it
                    verdict = "unknown" if committing else "rolled_back"
                    self._finished(task, verdict, duration, error)
            if current is not None:
                self._finished(current, "rolled_back", time.monotonic() - opened, error)
            raise
        for task, outcome, duration in done:
            if outcome != "abandoned":  # the heartbeat already recorded and logged it
                self._finished(task, outcome, duration)
        if fenced:
            # The fenced attempts are recorded in their own transaction, after the others.
            with contextlib.suppress(PgidemError, psycopg.Error):
                self._record_fenced(conn, fenced)
        return True

    def _begin_txn(self, conn: psycopg.Connection[Any], txn: _Txn, then: str = "") -> None:
        """Open the task transaction (``self._begin``), with ``then`` in the same round trip."""
        _command(conn, f"{self._begin}; {then}" if then else self._begin)
        txn.begun = True

    def _complete_deferred(
        self, conn: psycopg.Connection[Any], done: list[tuple[Claimed, str, float]], txn: _Txn
    ) -> list[Claimed]:
        """Write the completion records of the transaction's deferred tasks: one fenced
        statement for those that wrote nothing, one for the outcomes of those marked succeeded;
        settle their outcomes in ``done``; return those that were fenced."""
        deferred = [(i, t) for i, (t, outcome, _) in enumerate(done) if outcome == "deferred"]
        plain = [t for _, t in deferred if t.token not in txn.marked]
        marked = [t for _, t in deferred if t.token in txn.marked]
        completed: set[int] = set()
        if plain:
            completed |= _store.task_complete_many(
                conn,
                task_ids=[t.task_id for t in plain],
                tokens=[t.token for t in plain],
                results_json=[txn.deferred[t.token] for t in plain],
            )
            unsure = [
                t.task_id
                for t in plain
                if t.token in txn.locked_writers and t.task_id not in completed
            ]
            if unsure:
                # Their rows were locked ahead as this claim's, so this cannot happen; were it
                # to, their writes must not commit without their completions.
                raise RuntimeError(
                    f"tasks {unsure} wrote and could not be completed although their rows were "
                    "locked; rolling the transaction back"
                )
        if marked:
            recorded = _store.task_record_outcomes(
                conn,
                task_ids=[t.task_id for t in marked],
                tokens=[t.token for t in marked],
                results_json=[txn.deferred[t.token] for t in marked],
            )
            missing = [t.task_id for t in marked if t.task_id not in recorded]
            if missing:
                # An outcome was already there for a task this transaction found running with
                # its token. Were it to happen, the task must not commit succeeded without this
                # attempt's outcome: roll everything back (the leases expire; they run again).
                raise RuntimeError(
                    f"tasks {missing} already had an outcome when this attempt recorded its "
                    "own; rolling the transaction back"
                )
            completed |= recorded
        fenced = []
        for i, task in deferred:
            if task.task_id in completed:
                outcome = "succeeded"
            elif task.lease.cancelled.is_set():
                outcome = "cancelled"
            else:
                outcome = "fenced"
                fenced.append(task)
            done[i] = (task, outcome, done[i][2])
        return fenced

    def _run_one(
        self, conn: psycopg.Connection[Any], task: Claimed, txn: _Txn
    ) -> tuple[str, float]:
        """Run one task inside the open transaction; return (outcome, seconds). A handler
        that never reached the connection gets no savepoint, and its completion is deferred
        (outcome ``deferred``) to one statement for the whole transaction."""
        registered: Task = self.app.tasks[task.task_name]
        savepoint = False

        def open_savepoint() -> None:
            nonlocal savepoint
            refused = ""
            if task.token not in txn.locked and self._lockable(task):
                refused = self._lock_ahead(conn, txn, task)
            if task.token in txn.locked and self._unguarded(task):
                # Its writes go straight into the transaction: were it to fail now, the whole
                # transaction rolls back (_recover_spoiled). Not inside an earlier task's
                # savepoint (a ROLLBACK TO it by this handler would undo that task's writes).
                if txn.savepoint_open:
                    _command(conn, f"RELEASE SAVEPOINT {_SAVEPOINT}")
                    txn.savepoint_open = False
                txn.unguarded.add(task.token)
                return
            if not txn.begun:
                # One round trip: the transaction and the task's savepoint.
                self._begin_txn(conn, txn, _SAVEPOINT_OPEN)
            else:
                _command(conn, _SAVEPOINT_RENEW if txn.savepoint_open else _SAVEPOINT_OPEN)
            txn.savepoint_open = savepoint = True
            txn.savepoints += 1
            if refused:
                # Its savepoint is open all the same: whatever the handler writes after catching
                # this goes back with it (its completion is refused like any stale one).
                raise LeaseLost(refused)

        task_log = self.log.bind(
            task_id=task.task_id,
            task_name=task.task_name,
            queue=task.queue,
            attempt=task.attempt,
            fencing_token=task.token,
        )
        ctx = Context(
            task_id=task.task_id,
            task_name=task.task_name,
            queue=task.queue,
            attempt=task.attempt,
            max_attempts=task.max_attempts,
            fencing_token=task.token,
            idempotency_key=task.idempotency_key,
            args=task.args,
            conn=conn,
            log=task_log,
            worker_id=self.worker_id,
            lease=task.lease,
            services=self,
            on_first_use=open_savepoint,
        )
        task.thread = threading.current_thread()
        task.started_at = time.monotonic()
        error: BaseException | None = None
        result_json = "null"
        try:
            self._check_args_fit(registered, ctx, task.args)
            result = registered.fn(ctx, **task.args)
            result_json = "null" if result is None else dump_json(result, "result")
        except BaseException as exc:  # SystemExit too: a handler must not end its slot
            error = exc
        duration = time.monotonic() - task.started_at
        self._handler_returned(task, duration)
        let_go_of_rows(conn)
        self._durations[task.task_name] = 0.8 * self._durations.get(task.task_name, duration) + (
            0.2 * duration
        )

        if conn.broken:
            raise psycopg.OperationalError("the connection broke while the handler ran")
        status = conn.info.transaction_status
        if conn.closed or (txn.begun and status == psycopg.pq.TransactionStatus.IDLE):
            self._clean_runs[task.task_name] = 0
            return "ended_transaction", duration
        # The task's writes, if it made any, go back to its savepoint. (Without a savepoint the
        # transaction cannot be in error through this task; if it is anyway, the statement
        # fails and the whole transaction rolls back, which is safe.)
        rollback = savepoint or status == psycopg.pq.TransactionStatus.INERROR
        if task.lease.abandoned.is_set():
            # Past its timeout the heartbeat already failed the attempt; nothing of it commits.
            if task.token in txn.unguarded:  # (a task with a timeout is never unguarded)
                return "spoiled", duration
            if rollback:
                self._undo_savepoint(conn, txn)
            return "abandoned", duration
        if ctx.conn.misused:
            # It tried to end the transaction and pgidem refused; even if it carried on, its
            # attempt fails for good (a handler that does this would do it on every retry).
            error = TransactionEnded(
                f"the handler tried to {ctx.conn.misused} the task's transaction, which only "
                "pgidem may end (with the completion record); its writes were rolled back"
            )
        if error is None and status == psycopg.pq.TransactionStatus.INERROR:
            error = InvalidInput(
                "the handler returned with its transaction in an error state (it caught a "
                "database error and went on); its writes were rolled back"
            )
        if error is not None:
            self._clean_runs[task.task_name] = 0
        elif (runs := self._clean_runs.get(task.task_name, 0)) < _CLEAN_RUNS_UNGUARDED:
            self._clean_runs[task.task_name] = runs + 1
        if error is not None and task.token in txn.unguarded:
            # It wrote without a savepoint: its writes cannot go back alone.
            task.failure = error
            return "spoiled", duration
        if error is None:
            if not savepoint and task.token not in txn.unguarded:
                txn.deferred[task.token] = result_json
                return "deferred", duration
            if task.token in txn.locked:
                # Its row was locked ahead, still this claim's: its completion goes with the
                # others' before COMMIT, and nothing can refuse it in between.
                txn.deferred[task.token] = result_json
                txn.locked_writers.add(task.token)
                return "deferred", duration
            # Its fence, checked inside its savepoint: the task becomes succeeded only if the
            # token is still the claim's. One short statement here; the rest of the completion
            # record (outcome and attempt) goes with the other tasks' before COMMIT, in the
            # same transaction as its writes.
            if _store.task_mark_succeeded(conn, task_id=task.task_id, token=task.token):
                # Its savepoint is released when the next task opens one, or by COMMIT.
                txn.deferred[task.token] = result_json
                txn.marked.add(task.token)
                return "deferred", duration
            self._undo_savepoint(conn, txn)
            return ("cancelled" if task.lease.cancelled.is_set() else "fenced"), duration
        if rollback:
            self._undo_savepoint(conn, txn)
        if not txn.begun:
            self._begin_txn(conn, txn)
        task.failure = error
        return self._fail(conn, task, registered, error, task_log), duration

    def _undo_savepoint(self, conn: psycopg.Connection[Any], txn: _Txn) -> None:
        """Roll the current task's writes back and leave its savepoint."""
        if txn.savepoint_open:
            _command(conn, _SAVEPOINT_UNDO)
            txn.savepoint_open = False
        else:  # the transaction is in error without a savepoint: the statement fails
            _command(conn, f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")

    def _lockable(self, task: Claimed) -> bool:
        """Whether a task's row may be locked ahead, before its handler runs: only a task
        without a time limit whose handler is known to be quick (the lock holds until COMMIT,
        and the heartbeat must be able to fail a task past its timeout)."""
        return (
            task.timeout is None
            and self._durations.get(task.task_name, float("inf")) <= self.config.commit_interval
        )

    def _unguarded(self, task: Claimed) -> bool:
        """Whether a task whose row this transaction locked ahead may write without a
        savepoint of its own. Saving the savepoint saves a round trip and a subtransaction per
        task (one-row writing tasks, 2 x 2 slots, batch 500: 7,940 and 6,290 -> 10,046 and
        8,444 tasks/s). The price is paid only when such a task fails after writing: the
        transaction rolls back whole, and the batch-mates that had written run again (their
        writes were rolled back with it, as after a crash). So only a task whose handler
        returned cleanly its last ``_CLEAN_RUNS_UNGUARDED`` times here, and not with
        ``task_savepoints``."""
        return (
            not self.config.task_savepoints
            and self._clean_runs.get(task.task_name, 0) >= _CLEAN_RUNS_UNGUARDED
        )

    def _lock_ahead(self, conn: psycopg.Connection[Any], txn: _Txn, task: Claimed) -> str:
        """Lock ahead, in the transaction itself, the rows of ``task`` (about to write) and of
        the batch-mates likely to share its transaction (task_lock_claims); return why ``task``
        may not go on ("" when it may).

        While the transaction holds these locks nothing can take the tasks from this worker,
        so a paused or hung worker would keep them: the transaction's idle time is limited to
        the lease (PostgreSQL ends the session past it, its locks go and the tasks are
        rescued as after a crash)."""
        room = max(1, _MAX_SAVEPOINTS - txn.savepoints)
        targets = [task]
        for mate in txn.pending:  # a batch can be long: stop once the room is taken
            if len(targets) >= room:
                break
            if mate.token not in txn.locked and self._lockable(mate):
                targets.append(mate)
        # Back to the transaction's own level for the lock (the previous task's savepoint, if
        # any, is released: its task is done), and the idle limit once per transaction.
        head = [f"RELEASE SAVEPOINT {_SAVEPOINT}"] if txn.savepoint_open else []
        if txn.xid is None:
            idle_ms = int(self.config.lease * 1000)
            head.append(f"SET LOCAL idle_in_transaction_session_timeout = {idle_ms}")
        if not txn.begun:
            self._begin_txn(conn, txn, "; ".join(head))
        elif head:
            _command(conn, "; ".join(head))
        txn.savepoint_open = False
        states, xid = _store.task_lock_claims(
            conn, task_ids=[t.task_id for t in targets], tokens=[t.token for t in targets]
        )
        if txn.xid is None:
            txn.xid = xid
        for other in targets:
            current, cancelled = states.get(other.token, (False, False))
            if current:
                txn.locked.add(other.token)
            elif cancelled:
                if not other.lease.cancelled.is_set():
                    other.lease.cancelled.set()
                    self.log.warning(
                        "task_cancel_seen", task_id=other.task_id, fencing_token=other.token
                    )
            elif not other.lease.lost.is_set():
                self._mark_lost(other, "superseded")
        if task.token in txn.locked:
            return ""
        if task.lease.cancelled.is_set():
            return f"task {task.task_id} was cancelled"
        return f"the lease of task {task.task_id} (token {task.token}) is lost"

    def _check_args_fit(self, registered: Task, ctx: Context, args: dict[str, Any]) -> None:
        """Raise InvalidInput (no retry: it would fail the same way) when the task's args do
        not fit the handler's signature."""
        sig = self._signatures.get(registered.name)
        if sig is None:
            try:
                sig = inspect.signature(registered.fn)
            except (TypeError, ValueError):  # a callable without one: let the call decide
                return
            self._signatures[registered.name] = sig
        # Whether they fit depends only on the handler and the names passed (all by keyword):
        # remember the sets of names that fit (binding cost about 10 us a task).
        fitting = (registered.name, frozenset(args))
        if fitting in self._args_fit:
            return
        try:
            sig.bind(ctx, **args)
        except TypeError as exc:
            raise InvalidInput(
                f"the args {sorted(args)} do not fit the handler of {registered.name!r}: {exc}",
                "args",
            ) from exc
        if len(self._args_fit) < 10_000:
            self._args_fit.add(fitting)

    def _fail(
        self,
        conn: psycopg.Connection[Any],
        task: Claimed,
        registered: Task,
        error: BaseException,
        task_log: Any,
    ) -> str:
        """Record a failed attempt (inside the completion transaction); return the outcome."""
        record = error_record(error)
        final = (
            isinstance(error, NonRetryable | InvalidInput | TransactionEnded)
            or isinstance(error.__cause__, NonRetryable)
            or task.attempt >= task.max_attempts
        )
        if final:
            ok = _store.task_kill(
                conn,
                task_id=task.task_id,
                token=task.token,
                error=record,
                error_json=dump_json(
                    {k: record[k] for k in ("class", "message")} | {"attempt": task.attempt},
                    "error",
                ),
            )
            outcome = "dead"
        else:
            delay = (
                error.delay
                if isinstance(error, Retry) and error.delay is not None
                else registered.retry.delay(task.attempt)
            )
            ok = _store.task_retry_later(
                conn, task_id=task.task_id, token=task.token, delay_s=delay, error=record
            )
            outcome = "retried"
        if not ok:
            # Kept for the attempt row, which a fenced claim gets later (_record_fenced).
            task.fenced_error = record
            return "cancelled" if task.lease.cancelled.is_set() else "fenced"
        task_log.debug("task_error", error_class=record["class"], error=record["message"])
        return outcome

    def _recover_after_ended_transaction(
        self, done: list[tuple[Claimed, str, float]], task: Claimed, duration: float, txn: _Txn
    ) -> None:
        """A handler committed, rolled back or closed the task's connection. Fail its attempt
        without retrying (its own commit may have made its writes stick: retrying could repeat
        them) and settle the tasks that shared its transaction, by what the database says."""
        self.log.error(
            "handler_ended_transaction",
            task_id=task.task_id,
            fencing_token=task.token,
            detail="the handler ended the task's transaction itself; the attempt fails",
        )
        err = TransactionEnded(
            "the handler committed, rolled back or closed the task's transaction; "
            "pgidem did not record a completion for it"
        )
        lost = RuntimeError(
            f"its completion was rolled back when the handler of task {task.task_id} ended "
            "the transaction they shared"
        )

        with self._connection() as fresh:
            outcome = self._fail(fresh, task, self.app.tasks[task.task_name], err, self.log)
            self._finished(task, outcome, duration)
            fenced = [task] if outcome == "fenced" else []

            def run_again(other: Claimed, took: float) -> None:
                # Nothing of it stuck: it runs again by its policy (the claim counted).
                retried = self._fail(fresh, other, self.app.tasks[other.task_name], lost, self.log)
                self._finished(other, retried, took)
                if retried == "fenced":
                    fenced.append(other)

            def complete_now(other: Claimed) -> bool:
                return other.task_id in _store.task_complete_many(
                    fresh,
                    task_ids=[other.task_id],
                    tokens=[other.token],
                    results_json=[txn.deferred[other.token]],
                )

            # Tasks locked ahead leave no trace of their own in their rows before COMMIT: the
            # transaction's fate says whether their writes stuck.
            ended = None if txn.xid is None else _store.transaction_status(fresh, txn.xid)
            for other, other_outcome, other_duration in done:
                row = _store.task_get(fresh, other.task_id)
                if row is None or row["fencing_token"] != other.token:
                    self._finished(other, "fenced", other_duration)
                elif other_outcome == "deferred" and other.token in txn.locked_writers:
                    if ended == "committed" and row["state"] == "running":
                        # Its writes were committed by the handler's COMMIT: complete it now.
                        verdict = "succeeded" if complete_now(other) else "unknown"
                        self._finished(other, verdict, other_duration)
                    elif ended == "aborted" and row["state"] == "running":
                        run_again(other, other_duration)  # rolled back with the rest
                    else:
                        self._finished(other, "unknown", other_duration)
                elif other_outcome == "deferred" and other.token in txn.marked:
                    # It wrote and was marked succeeded in the transaction; its outcome was to
                    # follow before COMMIT. Its row says how the handler ended the transaction.
                    if row["state"] == "succeeded" and row["outcome_state"] is None:
                        # Committed, its writes with its mark: record the outcome now.
                        recorded = other.task_id in _store.task_record_outcomes(
                            fresh,
                            task_ids=[other.task_id],
                            tokens=[other.token],
                            results_json=[txn.deferred[other.token]],
                        )
                        verdict = "succeeded" if recorded else "unknown"
                        self._finished(other, verdict, other_duration)
                    elif row["state"] == "running":
                        run_again(other, other_duration)  # rolled back with its mark
                    else:
                        self._finished(other, "unknown", other_duration)
                elif row["state"] != "running" or other_outcome == "fenced":
                    # The handler's COMMIT committed what this task recorded before it.
                    self._finished(other, other_outcome, other_duration)
                elif other_outcome == "deferred":
                    # It wrote nothing and its completion had not been sent: send it now.
                    completed = complete_now(other)
                    self._finished(other, "succeeded" if completed else "fenced", other_duration)
                    if not completed:
                        fenced.append(other)
                else:
                    # Its completion was rolled back with the handler's ROLLBACK (or close).
                    run_again(other, other_duration)
            fenced += [other for other, other_outcome, _ in done if other_outcome == "fenced"]
            self._record_fenced(fresh, fenced)

    def _recover_spoiled(
        self,
        conn: psycopg.Connection[Any],
        done: list[tuple[Claimed, str, float]],
        spoiler: Claimed,
        duration: float,
        txn: _Txn,
    ) -> None:
        """A task that wrote without a savepoint failed (``_unguarded``): roll the whole
        transaction back, record the failures it held again and the spoiler's, complete the
        tasks that wrote nothing, and put those that wrote back at the head of the batch, to
        run again in the next transaction (their writes went back with the rest, as after a
        crash, and their claims are still current: their rows were locked until now)."""
        _command(conn, "ROLLBACK")
        # From here on each statement commits by itself (the connection is in autocommit).
        settled: list[tuple[Claimed, str, float]] = []
        again: list[Claimed] = []
        fenced: list[Claimed] = []
        plain = []
        for task, outcome, took in done:
            if outcome == "deferred" and (
                task.token in txn.locked_writers or task.token in txn.marked
            ):
                again.append(task)
            elif outcome == "deferred":
                plain.append((task, took))
            elif outcome in ("retried", "dead") and task.failure is not None:
                registered = self.app.tasks[task.task_name]
                redo = self._fail(conn, task, registered, task.failure, self.log)
                settled.append((task, redo, took))
            else:  # fenced or cancelled: nothing of theirs was in the transaction
                settled.append((task, outcome, took))
        if plain:
            completed = _store.task_complete_many(
                conn,
                task_ids=[t.task_id for t, _ in plain],
                tokens=[t.token for t, _ in plain],
                results_json=[txn.deferred[t.token] for t, _ in plain],
            )
            for task, took in plain:
                if task.task_id in completed:
                    settled.append((task, "succeeded", took))
                else:
                    settled.append(
                        (task, "cancelled" if task.lease.cancelled.is_set() else "fenced", took)
                    )
        if spoiler.lease.abandoned.is_set() or spoiler.failure is None:
            outcome = "abandoned"  # the heartbeat recorded its failure
        else:
            registered = self.app.tasks[spoiler.task_name]
            outcome = self._fail(conn, spoiler, registered, spoiler.failure, self.log)
        settled.append((spoiler, outcome, duration))
        for task, outcome, took in settled:
            if outcome == "fenced":
                fenced.append(task)
            if outcome != "abandoned":
                self._finished(task, outcome, took)
        if fenced:
            with contextlib.suppress(PgidemError, psycopg.Error):
                self._record_fenced(conn, fenced)
        if again:
            self.log.warning(
                "tasks_run_again",
                task_ids=[t.task_id for t in again],
                failed_task_id=spoiler.task_id,
                detail="a task that shared their transaction failed after writing without a "
                "savepoint; the transaction rolled back, their writes with it",
            )
            with self._held_lock:  # the heartbeat extends their leases again
                for task in again:
                    self._held[task.token] = task
            txn.pending[:0] = again

    def _record_fenced(self, conn: psycopg.Connection[Any], tasks: list[Claimed]) -> None:
        """Finish the attempt rows of fenced claims as ``fenced``: one statement for those
        without an error, one per failed attempt whose failure was fenced (keeping its error
        class, message and traceback)."""
        plain = [t.token for t in tasks if t.fenced_error is None]
        if plain:
            _store.attempt_finish_unfenced(conn, tokens=plain, status="fenced")
        for task in tasks:
            if task.fenced_error is not None:
                _store.attempt_finish_unfenced(
                    conn, tokens=[task.token], status="fenced", error=task.fenced_error
                )

    def _finished(
        self, task: Claimed, outcome: str, duration: float, error: str | None = None
    ) -> None:
        """Forget the claim and log the attempt's one line (``task_<outcome>``)."""
        self._forget(task)
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        level = "info" if outcome in ("succeeded", "retried") else "warning"
        extra = {} if error is None else {"error": error}
        getattr(self.log, level)(
            "task_outcome_unknown" if outcome == "unknown" else f"task_{outcome}",
            task_id=task.task_id,
            task_name=task.task_name,
            queue=task.queue,
            attempt=task.attempt,
            fencing_token=task.token,
            outcome=outcome,
            duration_ms=round(duration * 1000, 2),
            **extra,
        )

    def _forget(self, task: Claimed) -> None:
        if task.token not in self._held:  # already forgotten (the common second call)
            return
        with self._held_lock:
            self._held.pop(task.token, None)

    def _release(self, tasks: list[Claimed]) -> None:
        """Give back the leases of claimed tasks that never started."""
        for task in tasks:
            self._forget(task)
        with contextlib.suppress(PgidemError, psycopg.Error), self._connection() as conn:
            released = _store.lease_release(
                conn, task_ids=[t.task_id for t in tasks], tokens=[t.token for t in tasks]
            )
            self.log.info("leases_released", released=released)

    def _release_unstarted(self) -> None:
        with self._held_lock:
            unstarted = [t for t in self._held.values() if t.started_at is None]
        if unstarted:
            self._release(unstarted)

    # -- heartbeat -----------------------------------------------------------------------------

    def _register(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            try:
                with self._connection() as conn:
                    self._upsert_worker(conn)
                    self._limited = _store.queue_limits_of(conn, self.queues)
                return
            except (psycopg.Error, PgidemError, OSError) as exc:
                attempt += 1
                self.log.warning("worker_register_failed", error=str(exc))
                self._stopping.wait(self._backoff(attempt))

    def _upsert_worker(self, conn: psycopg.Connection[Any]) -> None:
        _store.worker_upsert(
            conn,
            worker_id=self.worker_id,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            queues=self.queues,
            concurrency=self.slots,
        )

    def heartbeat_interval(self) -> float:
        """Seconds between heartbeats: a third of the lease, at most 2 s (cancellation and
        timeouts are noticed at this pace)."""
        return min(self.config.lease / 3.0, 2.0)

    def _heartbeat_loop(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        try:
            while not self._stopping.wait(self.heartbeat_interval()):
                try:
                    if conn is None or conn.closed or conn.broken:
                        conn = self._heartbeat_connect()
                    self._heartbeat_once(conn)
                except (psycopg.Error, PgidemError, OSError) as exc:
                    self.log.warning("heartbeat_failed", error=f"{type(exc).__name__}: {exc}")
                    if conn is not None:
                        conn.close()
                        conn = None
                except Exception as exc:
                    self.log.exception("heartbeat_crashed", error=repr(exc))
                # Whether the database answered or not: a lease not extended in time is gone.
                self._expire_unextended()
        finally:
            if conn is not None:
                conn.close()

    def _heartbeat_connect(self) -> psycopg.Connection[Any]:
        # Its own connection, not the pool's: the heartbeat must never queue behind busy slots,
        # and a connection attempt must fail fast when the server is away.
        with _errors.mapped_errors():
            conn = psycopg.connect(self.app.dsn, **self._dedicated_conn_kwargs())
            try:
                self._configure_session(conn)
            except BaseException:
                conn.close()
                raise
            return conn

    def _dedicated_conn_kwargs(self) -> dict[str, Any]:
        """Settings for the heartbeat's and the listener's own connections: a dead server or
        a silent network must make them fail within about half a lease, not hang (a hung
        heartbeat would neither extend leases nor tell handlers theirs ran out)."""
        half = max(1, int(self.config.lease / 2))
        return {
            "autocommit": True,
            "application_name": self.application_name,
            "connect_timeout": max(2, min(half, 10)),
            "keepalives": 1,
            "keepalives_idle": half,
            "keepalives_interval": 1,
            "keepalives_count": 3,
            "tcp_user_timeout": half * 1000,
        }

    def _configure_session(self, conn: psycopg.Connection[Any]) -> None:
        """Settings for pgidem's own statements on every connection of the worker (claims,
        completions, heartbeats); ``self._begin`` sets them back in each task transaction.

        ``jit = off``: PostgreSQL compiles a statement with LLVM when its estimated cost passes
        ``jit_above_cost``, and the claim's estimate grows with the queue's depth (about
        130,000 at 200,000 queued tasks). Compiling took milliseconds, every claim, in every
        backend: a drain of 60,000 no-op tasks went from 12,127 to 3,848 tasks/s.

        (``plan_cache_mode = force_generic_plan`` was tried too, to save the claim's planning,
        about 1 ms: a generic plan made while ``pgidem.attempts`` was nearly empty kept reading
        it whole, and after 300 claims of 100 a claim took 73 ms instead of 2.3 ms.)
        """
        if self._begin == "BEGIN":
            row = conn.execute("SELECT current_setting('jit')").fetchone()
            if row and row[0] in ("on", "off"):
                self._begin = f"BEGIN; SET LOCAL jit = {row[0]}"
        conn.execute("SET jit = off")

    def _held_now(self, task: Claimed) -> bool:
        with self._held_lock:
            return self._held.get(task.token) is task

    def _heartbeat_once(self, conn: psycopg.Connection[Any]) -> None:
        self._abandon_overdue()
        with self._held_lock:
            held = [t for t in self._held.values() if not t.lease.abandoned.is_set()]
        if held:
            sent_at = time.monotonic()
            states = _store.lease_extend(
                conn,
                task_ids=[t.task_id for t in held],
                tokens=[t.token for t in held],
                lease_s=self.config.lease,
            )
            for task in held:
                current, cancelled, extended = states.get(task.token, (False, False, False))
                if extended:
                    task.lease_until = sent_at + self.config.lease
                # A task whose attempt ended while the statement ran is not lost: only one
                # this worker still holds can be.
                if not self._held_now(task):
                    continue
                if cancelled and not task.lease.cancelled.is_set():
                    task.lease.cancelled.set()
                    self.log.warning(
                        "task_cancel_seen", task_id=task.task_id, fencing_token=task.token
                    )
                elif not current and not task.lease.lost.is_set() and not cancelled:
                    self._mark_lost(task, "superseded")
        if self._stopping.is_set():
            return  # the worker's row is being removed: do not register it again
        self._upsert_worker(conn)
        if time.monotonic() - self._pruned_workers_at > STALE_WORKER_S / 2:
            # Workers that died without deregistering (SIGKILL, lost host) leave their row;
            # any live worker removes such rows (their tasks are rescued by the claim path).
            _store.worker_prune_stale(conn, STALE_WORKER_S)
            self._pruned_workers_at = time.monotonic()
        self._limited = _store.queue_limits_of(conn, self.queues)

    def _expire_unextended(self) -> None:
        """Mark lost the leases the heartbeat could not extend before they ran out (the
        database was unreachable): another worker may hold the task now."""
        now = time.monotonic()
        with self._held_lock:
            late = [
                t for t in self._held.values() if t.lease_until < now and not t.lease.lost.is_set()
            ]
        for task in late:
            self._mark_lost(task, "not_extended_in_time")

    def _mark_lost(self, task: Claimed, reason: str) -> None:
        task.lease.lost.set()
        self.log.warning(
            "lease_lost",
            task_id=task.task_id,
            task_name=task.task_name,
            queue=task.queue,
            attempt=task.attempt,
            fencing_token=task.token,
            reason=reason,
        )

    def _abandon_overdue(self) -> None:
        """Abandon handlers past their timeout: fail the attempt now (fenced by its token, in
        the heartbeat's own transaction), so the task retries or dies by its policy; the stuck
        thread's completion will be refused, and a new slot takes its place."""
        now = time.monotonic()
        with self._held_lock:
            overdue = [
                t
                for t in self._held.values()
                if t.timeout is not None
                and t.started_at is not None
                and not t.lease.abandoned.is_set()
                and now - t.started_at > t.timeout
            ]
        for task in overdue:
            task.lease.abandoned.set()
            self._forget(task)
            error = TimeoutError(f"the handler ran past its timeout of {task.timeout} s")
            record = error_record(error, attempt_status="abandoned")
            registered = self.app.tasks[task.task_name]
            try:
                with self._connection() as conn, conn.transaction():
                    conn.execute("SET LOCAL lock_timeout = '2s'")
                    if task.attempt >= task.max_attempts:
                        _store.task_kill(
                            conn,
                            task_id=task.task_id,
                            token=task.token,
                            error=record,
                            error_json=dump_json(
                                {"class": record["class"], "message": record["message"]},
                                "error",
                            ),
                        )
                    else:
                        _store.task_retry_later(
                            conn,
                            task_id=task.task_id,
                            token=task.token,
                            delay_s=registered.retry.delay(task.attempt),
                            error=record,
                        )
            except (psycopg.Error, PgidemError, OSError) as exc:
                # Its lease is no longer extended: it expires and the claim path rescues the
                # task (the attempt then ends lease_expired). The slot is replaced all the same.
                self.log.warning(
                    "task_abandon_unrecorded",
                    task_id=task.task_id,
                    fencing_token=task.token,
                    error=f"{type(exc).__name__}: {exc}",
                )
            self.counts["abandoned"] = self.counts.get("abandoned", 0) + 1
            self.log.warning(
                "task_abandoned",
                task_id=task.task_id,
                task_name=task.task_name,
                fencing_token=task.token,
                timeout_s=task.timeout,
            )
            self._replace_stuck_slot(task)

    def _replace_stuck_slot(self, task: Claimed) -> None:
        with self._stuck_lock:
            if task.returned:
                # Its handler returned meanwhile: the slot sees the abandonment, rolls the task
                # back and goes on with its batch. Nothing is stuck.
                return
            self._stuck.add(task.token)
            stuck = len(self._stuck)
            # The stuck thread leaves its loop if its handler ever returns; a new slot takes
            # over. (Under the lock: the thread reads this only after its handler returned.)
            if task.thread is not None:
                task.thread.pgidem_abandoned = True  # type: ignore[attr-defined]
        # The rest of the stuck slot's batch would wait for its handler to return (and the
        # heartbeat would keep their leases alive meanwhile, for ever if it never does): give
        # them back now. If the handler returns, the slot's own release of them is a no-op.
        with self._held_lock:
            mates = [
                t
                for t in self._held.values()
                if t.started_at is None and t.claimer is not None and t.claimer is task.claimer
            ]
        if mates:
            self._release(mates)
        if stuck >= self.slots and not self._replacing:
            # As many threads stuck now as the worker has slots: each holds a connection and
            # will hold it for as long as its handler runs, so the worker stops (gracefully:
            # the slots that still work finish their batches, unstarted leases go back, the
            # row in pgidem.workers goes) to be replaced by a fresh process.
            self._replacing = True
            self.log.error(
                "worker_replacing_itself",
                stuck_threads=stuck,
                slots=self.slots,
                exit_code=EXIT_STUCK,
            )
            self.stop()
            return
        if self._replacing:
            return
        self._start_slot(getattr(task.thread, "pgidem_queues", None) or self._groups[0][0])

    def _handler_returned(self, task: Claimed, duration: float) -> None:
        """A handler returned: if it was abandoned, its thread is no longer stuck."""
        with self._stuck_lock:
            task.returned = True
            was_stuck = task.token in self._stuck
            self._stuck.discard(task.token)
            stuck = len(self._stuck)
        if was_stuck:
            self.log.info(
                "abandoned_handler_returned",
                task_id=task.task_id,
                fencing_token=task.token,
                duration_ms=round(duration * 1000, 2),
                stuck_threads=stuck,
            )

    def _reexec(self) -> None:
        """Start afresh in place: the same interpreter, options and command line (for
        ``python -m pgidem worker`` too), the same pid. Exits with ``EXIT_STUCK`` if that
        fails."""
        argv = [sys.executable, *sys.orig_argv[1:]]
        self.log.warning("worker_reexecuting", argv=argv)
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execv(sys.executable, argv)
        except OSError as exc:
            self.log.error("worker_reexec_failed", error=str(exc), exit_code=EXIT_STUCK)
            os._exit(EXIT_STUCK)

    # -- listener ------------------------------------------------------------------------------

    def _on_notice(self, conn: psycopg.Connection[Any]) -> None:
        """A NOTIFY for one of our queues came. If a slot is idle, claim for it here, on the
        listener's connection, and hand the batch over; otherwise wake one slot (a busy slot
        sees the new sequence number and claims again before it waits).

        Claiming here saves the idle slot's claim two wake-ups, its thread's and its backend's
        (the listener's backend is awake: it just sent the notification), about 0.2 ms of an
        enqueue-to-start latency of 2.5-3 ms on the 2-core machine (bench/latency.py, five
        alternating pairs of 300 samples: p50 3.08/2.75/2.89/2.35/2.32 -> 2.93/2.56/2.87/1.77/
        2.69 ms). Only a worker whose slots all claim from the same queues does it."""
        batch: list[Claimed] = []
        if (
            len(self._groups) == 1
            and self._idle > 0
            and not self._handoff
            and not self._stopping.is_set()
        ):
            batch = self._claim(conn, self._groups[0][0], for_slot=False)
        with self._wake:
            if batch:
                self._handoff.append(batch)
            self._wake_seq += 1
            self._wake.notify()

    def _listen(self) -> None:
        """LISTEN on a dedicated connection; on a NOTIFY for one of our queues, claim for an idle
        slot or wake one (_on_notice)."""
        failures = 0
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self.app.dsn, **self._dedicated_conn_kwargs()) as conn:
                    self._configure_session(conn)  # it claims too (_on_notice)
                    conn.execute("LISTEN pgidem")
                    if failures:
                        self.log.info("listener_reconnected")
                    failures = 0
                    self._notify()  # anything enqueued while we were not listening
                    while not self._stopping.is_set():
                        wanted = False
                        # One at a time: the connection is locked while notifies() yields.
                        for note in conn.notifies(timeout=1.0, stop_after=1):
                            wanted = note.payload in self.queues or not note.payload
                        if wanted:
                            self._on_notice(conn)
            except Exception as exc:  # whatever it was, listen again: polling covers the gap
                failures += 1
                delay = self._backoff(failures)
                self.log.warning(
                    "listener_reconnecting", error=f"{type(exc).__name__}: {exc}", retry_in_s=delay
                )
                self._stopping.wait(delay)


def run_worker(app: App, **settings: Any) -> int:
    """Build a worker from keyword settings and run it; return its exit code."""
    return Worker(app, **settings).run()
