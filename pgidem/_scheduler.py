"""The scheduler: enqueues periodic tasks at the ticks of their cron expressions, exactly one task
per tick however many schedulers run.

A maintenance service in the manner of River's: a config, a loop (``run``), and ``run_once``
that returns what it did. Every worker whose app has periodic tasks runs the loop on a thread of
its own (``pgidem worker --no-scheduler`` turns it off). No leader is elected and no lock is
taken: the enqueue of a tick carries the idempotency key ``cron:<schedule name>:<tick>`` (the
tick in UTC, ISO 8601, to the second), so the unique index on (task name, key) lets the first
scheduler's enqueue create the task and makes every other one return that same task. Schedulers
on hosts whose clocks disagree compute the same ticks (a tick is a wall-clock time, not "now"),
so they still agree on the keys; they only differ in when they notice a tick.

Missed ticks (the policy, also in docs/scheduling.md):

* While a scheduler runs, it enqueues every tick that came due since its previous pass (a pass
  late by a few seconds on a busy machine still enqueues each tick once), up to
  ``max_catch_up`` ticks.
* After downtime (the scheduler's first pass, or a gap of more than ``max_catch_up`` ticks), it
  enqueues only the latest tick that came due, and only if that tick is no older than
  ``catch_up_window``. A worker that starts at 10:00 enqueues a daily 03:00 task once, if no
  scheduler did at 03:00 (the key dedupes it if one did).

Retention: a tick older than the key retention may have had its task pruned, and enqueueing
it again would make a second task for that tick. So a scheduler never enqueues a tick older
than the retention: the smaller of the database's ``pgidem.key_retention`` (read at start and
every ``RETENTION_REFRESH_S``) and the worker's pruner retention (``prune_older_than``, when
set). A ``catch_up_window`` above it is clamped to it, with a warning
(``scheduler_catch_up_clamped``); ticks older than it are skipped on the running path too.

Each pass records the schedules it ran in ``pgidem.schedules`` (for ``pgidem status`` and
psql; no scheduler reads it back).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import psycopg

from pgidem import _cron, _log, _store
from pgidem.errors import IdempotencyKeyMismatch, InvalidInput, PgidemError

if TYPE_CHECKING:
    from pgidem.app import App

ConnectionFactory = Callable[[], AbstractContextManager[psycopg.Connection[Any]]]

#: The longest a scheduler sleeps between passes, in seconds (it wakes for each tick sooner).
MAX_SLEEP = 60.0
#: Seconds between reads of the database's key retention.
RETENTION_REFRESH_S = 300.0


def tick_key(schedule: str, tick: datetime) -> str:
    """The idempotency key of one tick of a schedule: ``cron:<schedule>:<UTC ISO time>``."""
    return f"cron:{schedule}:{tick.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}"


@dataclass(frozen=True)
class Periodic:
    """A task enqueued at every tick of a cron expression (register with ``App.periodic``).

    Attributes:
        name: the schedule's name, in its ticks' idempotency keys (default: the task name).
        task_name: the task enqueued.
        cron: the parsed expression.
        args: the args of every enqueued task.
        queue, priority: override the task's defaults (None: the task's).
    """

    name: str
    task_name: str
    cron: _cron.Cron
    args: Mapping[str, Any] = field(default_factory=dict)
    queue: str | None = None
    priority: int | None = None


@dataclass
class SchedulerConfig:
    """How the scheduler runs.

    Attributes:
        catch_up_window: seconds; after downtime the latest missed tick is enqueued only if it
            is no older than this (default one day).
        max_catch_up: most ticks of one schedule enqueued by one pass; a longer gap counts as
            downtime.
        prune_older_than: seconds; the retention of a pruner that may delete this database's
            finished tasks sooner than ``pgidem.key_retention`` (the worker passes its own).
            No tick older than this, or than the key retention, is enqueued.
    """

    catch_up_window: float = 86400.0
    max_catch_up: int = 1000
    prune_older_than: float | None = None

    def validate(self) -> None:
        """Raise InvalidInput on a setting out of range."""
        window = self.catch_up_window
        if isinstance(window, bool) or not isinstance(window, int | float):
            raise InvalidInput(
                f"invalid scheduler setting: catch_up_window must be a number of seconds, "
                f"got {window!r}"
            )
        if not 0 <= window <= 366 * 86400:
            raise InvalidInput(
                f"invalid scheduler setting: catch_up_window must be 0 to 366 days "
                f"(31622400 s), got {window!r}"
            )
        count = self.max_catch_up
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 100000:
            raise InvalidInput(
                f"invalid scheduler setting: max_catch_up must be a whole number from 1 to "
                f"100000, got {count!r}"
            )


@dataclass(frozen=True)
class ScheduleResult:
    """What one pass did.

    Attributes:
        enqueued: (schedule name, tick, task id) for each tick enqueued (or found enqueued by
            another scheduler: the id is the same).
        skipped: ticks left out by the missed-ticks policy.
        failed: ticks whose enqueue failed (they are tried again at the next pass).
    """

    enqueued: list[tuple[str, datetime, int]]
    skipped: int = 0
    failed: int = 0


class Scheduler:
    """Enqueues the app's periodic tasks.

    Args:
        app: the application whose ``periodic_tasks`` to schedule.
        connection: returns a context manager giving an autocommit connection.
        config: settings.
        log: a structlog logger (pgidem's by default).
    """

    def __init__(
        self,
        app: App,
        connection: ConnectionFactory,
        config: SchedulerConfig | None = None,
        log: Any = None,
    ) -> None:
        self.app = app
        self.config = config or SchedulerConfig()
        self.config.validate()
        self._connection = connection
        self.log = log if log is not None else _log.get()
        #: The latest tick handled per schedule (in memory: a restart is downtime).
        self._last: dict[str, datetime] = {}
        #: Ticks older than this many seconds are never enqueued (see the module docstring);
        #: None until the database's key retention was read.
        self.retention: float | None = self.config.prune_older_than
        self._retention_read_at: float | None = None
        self._clamp_logged: float | None = None
        #: Schedules recorded in pgidem.schedules by this scheduler.
        self._recorded: set[str] = set()

    def catch_up_window(self) -> float:
        """The window in effect: ``catch_up_window``, clamped to the retention."""
        if self.retention is None:
            return self.config.catch_up_window
        return min(self.config.catch_up_window, self.retention)

    def refresh_retention(self) -> None:
        """Read the database's key retention (at most every ``RETENTION_REFRESH_S``) and log
        once when it clamps ``catch_up_window``."""
        clock = time.monotonic()
        if self._retention_read_at is not None and (
            clock - self._retention_read_at < RETENTION_REFRESH_S
        ):
            return
        try:
            with self._connection() as conn:
                database = _store.key_retention(conn)
        except (psycopg.Error, PgidemError, OSError) as exc:
            self.log.warning("key_retention_unread", error=f"{type(exc).__name__}: {exc}")
            return
        self._retention_read_at = clock
        bounds = [database]
        if self.config.prune_older_than is not None:
            bounds.append(self.config.prune_older_than)
        self.retention = min(bounds)
        if self.retention < self.config.catch_up_window and self._clamp_logged != self.retention:
            self._clamp_logged = self.retention
            self.log.warning(
                "scheduler_catch_up_clamped",
                catch_up_window_s=self.config.catch_up_window,
                key_retention_s=database,
                prune_older_than_s=self.config.prune_older_than,
                effective_window_s=self.retention,
                detail="no tick older than the retention is enqueued: its task may be pruned",
            )

    def due(self, periodic: Periodic, now: datetime) -> tuple[list[datetime], int]:
        """The ticks of one schedule to enqueue at ``now`` by the missed-ticks policy, and how
        many were skipped."""
        try:
            latest = periodic.cron.latest_at_or_before(now)
        except InvalidInput:
            return [], 0
        last = self._last.get(periodic.name)
        if last is not None and last >= latest:
            return [], 0
        if last is not None:
            ticks: list[datetime] = []
            for tick in periodic.cron.ticks(last, now):
                ticks.append(tick)
                if len(ticks) > self.config.max_catch_up:
                    break
            if len(ticks) <= self.config.max_catch_up:
                # Even while running (after a long pause of the process, say), never a tick
                # older than the retention: its task may have been pruned.
                fresh = [t for t in ticks if self._within_retention(t, now)]
                return fresh, len(ticks) - len(fresh)
        # Downtime: only the latest tick, if recent enough.
        if (now - latest).total_seconds() <= self.catch_up_window():
            return [latest], 0
        return [], 1

    def _within_retention(self, tick: datetime, now: datetime) -> bool:
        return self.retention is None or (now - tick).total_seconds() <= self.retention

    def run_once(self, now: datetime | None = None) -> ScheduleResult:
        """Enqueue every tick that is due (see the module's missed-ticks policy).

        Args:
            now: the time to schedule for (default the current time).

        Returns:
            What was enqueued, skipped and failed.
        """
        now = now or datetime.now(UTC)
        self.refresh_retention()
        enqueued: list[tuple[str, datetime, int]] = []
        skipped = failed = 0
        for periodic in list(self.app.periodic_tasks.values()):
            ticks, left_out = self.due(periodic, now)
            skipped += left_out
            if not ticks:
                if left_out:
                    self._last[periodic.name] = periodic.cron.latest_at_or_before(now)
                if periodic.name not in self._recorded:
                    self._record(periodic, now, None)
                continue
            mine = len(enqueued)
            for tick in ticks:
                try:
                    task_id = self._enqueue(periodic, tick)
                except IdempotencyKeyMismatch as exc:
                    # Another scheduler (another version of the app?) enqueued this tick with
                    # other args: the tick has its task, and it is not ours to change.
                    self.log.error(
                        "periodic_tick_conflict",
                        schedule=periodic.name,
                        tick=tick.isoformat(),
                        error=str(exc),
                    )
                    self._last[periodic.name] = tick
                    continue
                except (psycopg.Error, PgidemError, OSError) as exc:
                    failed += len(ticks) - ticks.index(tick)
                    self.log.warning(
                        "periodic_enqueue_failed",
                        schedule=periodic.name,
                        tick=tick.isoformat(),
                        error=f"{type(exc).__name__}: {exc}",
                    )
                    break
                self._last[periodic.name] = tick
                enqueued.append((periodic.name, tick, task_id))
                self.log.info(
                    "periodic_tick_enqueued",
                    schedule=periodic.name,
                    task_name=periodic.task_name,
                    tick=tick.isoformat(),
                    task_id=task_id,
                )
            if len(enqueued) > mine or periodic.name not in self._recorded:
                self._record(periodic, now, enqueued[-1] if len(enqueued) > mine else None)
        return ScheduleResult(enqueued, skipped, failed)

    def _record(
        self, periodic: Periodic, now: datetime, last: tuple[str, datetime, int] | None
    ) -> None:
        """Upsert the schedule's row in pgidem.schedules (for people; a failure is logged and
        changes nothing else)."""
        registered = self.app.tasks.get(periodic.task_name)
        try:
            next_tick: datetime | None = periodic.cron.next_after(now)
        except InvalidInput:
            next_tick = None
        try:
            with self._connection() as conn:
                _store.schedule_upsert(
                    conn,
                    name=periodic.name,
                    task_name=periodic.task_name,
                    cron=periodic.cron.expression,
                    timezone=str(periodic.cron.timezone),
                    queue=periodic.queue or (registered.queue if registered else "default"),
                    last_tick=None if last is None else last[1],
                    last_task_id=None if last is None else last[2],
                    next_tick=next_tick,
                )
        except (psycopg.Error, PgidemError, OSError) as exc:
            self.log.warning(
                "schedule_record_failed",
                schedule=periodic.name,
                error=f"{type(exc).__name__}: {exc}",
            )
            return
        self._recorded.add(periodic.name)

    def _enqueue(self, periodic: Periodic, tick: datetime) -> int:
        registered = self.app.tasks.get(periodic.task_name)
        from pgidem.app import dump_args

        with self._connection() as conn:
            return _store.task_enqueue(
                conn,
                task_name=periodic.task_name,
                args_json=dump_args(periodic.args),
                queue=periodic.queue or (registered.queue if registered else "default"),
                idempotency_key=tick_key(periodic.name, tick),
                run_at=tick,
                priority=periodic.priority
                if periodic.priority is not None
                else (registered.priority if registered else 0),
                max_attempts=registered.max_attempts if registered else None,
            )

    def next_wakeup(self, now: datetime) -> float:
        """Seconds from ``now`` until the next tick of any schedule (at most ``MAX_SLEEP``)."""
        wait = MAX_SLEEP
        for periodic in self.app.periodic_tasks.values():
            try:
                nxt = periodic.cron.next_after(now)
            except InvalidInput:
                continue
            wait = min(wait, (nxt - now).total_seconds())
        return max(0.0, wait)

    def run(self, stop: threading.Event) -> None:
        """Run passes until ``stop`` is set: one at start, then one just after each tick.
        Errors are logged and the loop goes on."""
        failures = 0
        while not stop.is_set():
            try:
                result = self.run_once()
                failures = 0 if not result.failed else failures + 1
            except Exception as exc:  # a bug in pgidem: keep the loop alive, say so loudly
                self.log.exception("scheduler_crashed", error=repr(exc))
                failures += 1
            if failures:
                wait = min(5.0, 0.1 * 2**failures)
            else:
                # Just after the tick (a few ms, with jitter so that schedulers do not all
                # arrive in the same millisecond; they race safely if they do).
                wait = self.next_wakeup(datetime.now(UTC)) + random.uniform(0.005, 0.05)
            if stop.wait(wait):
                return
