"""The application object: where the database is, which tasks exist, and how to enqueue them."""

from __future__ import annotations

import json
import math
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg_pool import ConnectionPool

from pgidem import _cron, _dsn, _log, _migrate, _store
from pgidem._scheduler import Periodic
from pgidem.errors import (
    InvalidInput,
    ResultTimeout,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
    mapped_errors,
)

if TYPE_CHECKING:
    from pgidem.context import Context

#: The longest delay (or the latest run_at from now) accepted at enqueue, in seconds.
MAX_DELAY_S = 366 * 24 * 3600
#: Rows per round trip in ``enqueue_many`` with idempotency keys.
DEFAULT_BATCH_SIZE = 5000

Handler = Callable[..., Any]


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait before retrying a failed attempt: exponential backoff with jitter.

    The n-th retry waits ``min(cap, base * 2 ** (n - 1))`` seconds, multiplied by a random
    factor in [1 - jitter, 1] so that tasks failing together do not retry together.

    Args:
        base: the first delay, in seconds.
        cap: the longest delay, in seconds.
        jitter: the fraction of the delay that is random, 0 to 1.
    """

    base: float = 1.0
    cap: float = 300.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not (0 <= self.base <= MAX_DELAY_S and 0 <= self.cap <= MAX_DELAY_S):
            raise InvalidInput(f"retry base and cap must be between 0 and {MAX_DELAY_S} seconds")
        if not 0 <= self.jitter <= 1:
            raise InvalidInput(f"retry jitter must be between 0 and 1, got {self.jitter}")

    def delay(self, attempt: int) -> float:
        """The delay before the attempt after ``attempt`` (1-based)."""
        raw = min(self.cap, self.base * 2.0 ** min(attempt - 1, 62))
        return raw * (1.0 - self.jitter * random.random())


@dataclass(frozen=True)
class Task:
    """A registered task: a handler and its defaults. Calling it calls the handler."""

    app: App
    name: str
    fn: Handler
    queue: str = "default"
    max_attempts: int = 5
    priority: int = 0
    retry: RetryPolicy = RetryPolicy()
    timeout: float | None = None

    def __call__(self, ctx: Context, **kwargs: Any) -> Any:
        return self.fn(ctx, **kwargs)

    def enqueue(self, args: Mapping[str, Any] | None = None, **options: Any) -> TaskHandle:
        """Enqueue this task (see ``App.enqueue``)."""
        return self.app.enqueue(self.name, args, **options)


@dataclass(frozen=True)
class TaskInfo:
    """A snapshot of a task row and its outcome."""

    id: int
    task_name: str
    queue: str
    state: str
    args: dict[str, Any]
    idempotency_key: str | None
    attempts: int
    max_attempts: int
    fencing_token: int | None
    outcome_state: str | None
    result: Any
    error: dict[str, Any] | None
    last_error: str | None
    raw: dict[str, Any]

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TaskInfo:
        return cls(
            id=row["id"],
            task_name=row["task_name"],
            queue=row["queue"],
            state=row["state"],
            args=row["args"],
            idempotency_key=row["idempotency_key"],
            attempts=row["attempts"],
            max_attempts=row["max_attempts"],
            fencing_token=row["fencing_token"],
            outcome_state=row["outcome_state"],
            result=row["outcome_result"],
            error=row["outcome_error"],
            last_error=row["last_error"],
            raw=row,
        )


class TaskHandle:
    """A reference to an enqueued task: its id, its state, and its outcome once there is one."""

    def __init__(self, app: App, task_id: int) -> None:
        self.app = app
        self.id = task_id

    def __repr__(self) -> str:
        return f"<TaskHandle id={self.id}>"

    def refresh(self) -> TaskInfo:
        """Read the task and its outcome now.

        Raises:
            TaskNotFound: the task is gone (pruned).
        """
        return self.app.get_task(self.id)

    @property
    def state(self) -> str:
        """The task's current state (one query)."""
        return self.refresh().state

    def result(self, timeout: float | None = None, poll_interval: float = 0.05) -> Any:
        """Wait for the outcome and return the task's result.

        Args:
            timeout: seconds to wait; None waits for ever.
            poll_interval: the first pause between reads (it grows to one second).

        Returns:
            The handler's return value as stored in ``pgidem.outcomes``.

        Raises:
            TaskFailed: the task ended dead; ``.error`` holds the final error.
            TaskCancelled: the task was cancelled.
            ResultTimeout: no outcome within ``timeout``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = poll_interval
        while True:
            info = self.refresh()
            if info.outcome_state == "succeeded" and info.state == "succeeded":
                return info.result
            if info.state == "dead":
                raise TaskFailed(info.id, info.error or {"message": info.last_error or ""})
            if info.state == "cancelled":
                raise TaskCancelled(f"task {info.id} was cancelled")
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(
                    f"task {info.id} had no outcome within {timeout} s (it is {info.state})"
                )
            wait = pause if deadline is None else min(pause, max(0.0, deadline - time.monotonic()))
            time.sleep(wait)
            pause = min(1.0, pause * 1.5)


def _check_nul(value: Any, where: str) -> None:
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidInput(f"invalid {where}: it contains a NUL byte", where.split(" ")[0])
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_nul(key, where)
            _check_nul(item, where)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_nul(item, where)


def dump_args(args: Mapping[str, Any] | None) -> str:
    """Serialise task args to JSON text, rejecting what PostgreSQL's jsonb cannot hold.

    Only what SQL cannot see is checked here (Python types, NaN, NUL bytes); every other rule is
    checked once, by ``pgidem.enqueue`` in SQL.

    Raises:
        InvalidInput: args are not a mapping, not JSON-serialisable, hold NaN or infinity, or
            hold a NUL byte.
    """
    if args is None:
        return "{}"
    if not isinstance(args, Mapping):
        raise InvalidInput(
            f"invalid args: they must be a JSON object (a dict), got {type(args).__name__}",
            "args",
        )
    return dump_json(dict(args), "args")


def dump_json(value: Any, what: str) -> str:
    """Serialise a value to strict JSON (no NaN, no infinity, no NUL, valid Unicode).

    Raises:
        InvalidInput: the value cannot be stored as jsonb.
    """
    try:
        text = json.dumps(value, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    except ValueError as exc:
        hint = " (NaN and infinity are not JSON)" if "float" in str(exc) else ""
        raise InvalidInput(f"invalid {what}: {exc}{hint}", what) from exc
    except TypeError as exc:
        raise InvalidInput(f"invalid {what}: {exc}", what) from exc
    _check_unicode(text, what)
    # Every NUL in a key or string comes out escaped as \u0000: only then walk the value to
    # tell a real NUL from a backslash followed by "u0000".
    if "\\u0000" in text:
        _check_nul(value, what)
    return text


def _check_unicode(text: str, field: str) -> None:
    # A lone surrogate ("\ud800") is a Python str but not Unicode text: neither PostgreSQL's
    # text nor its jsonb can hold it.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(
            f"invalid {field}: it is not valid Unicode ({exc.reason} at position {exc.start})",
            field,
        ) from None


def _check_text(value: str | None, field: str) -> None:
    if value is not None:
        if not isinstance(value, str):
            raise InvalidInput(
                f"invalid {field}: expected a string, got {type(value).__name__}", field
            )
        if "\x00" in value:
            raise InvalidInput(f"invalid {field}: it contains a NUL byte", field)
        _check_unicode(value, field)


#: The range of PostgreSQL's integer: what the SQL functions' parameters can receive at all.
_INT4 = range(-(2**31), 2**31)


def _check_int(value: Any, field: str) -> None:
    # Only the type and what fits an SQL integer are checked here; the ranges that pgidem
    # documents are checked once, in SQL (pgidem._check_task_input).
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidInput(f"invalid {field}: expected an integer, got {value!r}", field)
    if value is not None and value not in _INT4:
        raise InvalidInput(f"invalid {field} {value}: out of range", field)


def _check_timeout(timeout: Any) -> None:
    """A task's timeout: None, or a number of seconds in (0, MAX_DELAY_S]."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise InvalidInput(
            f"invalid timeout {timeout!r}: expected a number of seconds greater than 0 and at "
            f"most {MAX_DELAY_S} (366 days), or None for no limit",
            "timeout",
        )
    if not 0 < timeout <= MAX_DELAY_S:  # NaN fails this too
        raise InvalidInput(
            f"invalid timeout {timeout!r}: it must be greater than 0 and at most {MAX_DELAY_S} "
            "seconds (366 days), or None for no limit",
            "timeout",
        )


def resolve_run_at(run_at: datetime | None, delay: float | timedelta | None) -> datetime | None:
    """Turn ``run_at`` or ``delay`` into one aware datetime (or None for now).

    Raises:
        InvalidInput: both given, a naive datetime, or a delay out of range.
    """
    if run_at is not None and delay is not None:
        raise InvalidInput("give run_at or delay, not both", "run_at")
    if delay is not None:
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else delay
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise InvalidInput(f"invalid delay: expected seconds, got {delay!r}", "run_at")
        if not math.isfinite(seconds) or not 0 <= seconds <= MAX_DELAY_S:
            raise InvalidInput(
                f"invalid delay {seconds!r}: it must be between 0 and {MAX_DELAY_S} seconds "
                "(366 days)",
                "run_at",
            )
        return datetime.now().astimezone() + timedelta(seconds=seconds)
    if run_at is not None:
        if not isinstance(run_at, datetime):
            raise InvalidInput(f"invalid run_at: expected a datetime, got {run_at!r}", "run_at")
        if run_at.tzinfo is None:
            raise InvalidInput(
                "invalid run_at: a naive datetime is ambiguous; give it a timezone", "run_at"
            )
    return run_at


def _renumbered(exc: InvalidInput, offset: int) -> InvalidInput:
    """The error of a batch with its ``row N`` (1-based, within the batch) made 1-based within
    the whole ``enqueue_many`` call."""
    if offset == 0:
        return exc
    message = re.sub(r"\brow (\d+):", lambda m: f"row {int(m[1]) + offset}:", str(exc))
    return type(exc)(message, exc.field)


class App:
    """Holds the DSN, a connection pool and the registered tasks.

    Args:
        dsn: where the database is; None follows the rules of ``pgidem._dsn`` (``PGIDEM_DSN``,
            else the embedded server, else libpq's environment).
        pool_size: the most connections the enqueue pool opens.
        check_schema: refuse to run against a schema older or newer than the code.
    """

    def __init__(self, dsn: str | None = None, *, pool_size: int = 4, check_schema: bool = True):
        self._dsn_arg = dsn
        self._resolved: _dsn.Resolved | None = None
        self.pool_size = pool_size
        self.check_schema = check_schema
        self.tasks: dict[str, Task] = {}
        #: Periodic tasks by schedule name (``periodic`` / ``task(cron=...)``).
        self.periodic_tasks: dict[str, Periodic] = {}
        self._pool: ConnectionPool[psycopg.Connection[Any]] | None = None
        self._lock = threading.Lock()
        self._schema_checked = False

    # -- configuration -------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """The resolved DSN (resolving it starts the embedded server if that is the choice)."""
        return self.resolved.dsn

    @property
    def resolved(self) -> _dsn.Resolved:
        """The DSN and where it came from."""
        if self._resolved is None:
            self._resolved = _dsn.resolve(self._dsn_arg)
            _log.get().info(
                "database_selected",
                source=self._resolved.source,
                database=self._resolved.describe(),
            )
        return self._resolved

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """Open a new autocommit connection to the app's database (the caller closes it)."""
        with mapped_errors():
            return psycopg.connect(self.dsn, autocommit=True, **kwargs)

    @property
    def pool(self) -> ConnectionPool[psycopg.Connection[Any]]:
        """The app's connection pool (autocommit connections), opened on first use."""
        with self._lock:
            if self._pool is None:
                pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
                    self.dsn,
                    min_size=1,
                    max_size=max(1, self.pool_size),
                    kwargs={"autocommit": True},
                    open=False,
                    name="pgidem",
                )
                pool.open(wait=True, timeout=30)
                self._pool = pool
            pool = self._pool
        if self.check_schema and not self._schema_checked:
            with pool.connection() as conn:
                _migrate.check(conn)
            self._schema_checked = True
        return pool

    def _check_caller_conn(self, conn: psycopg.Connection[Any]) -> None:
        # The caller's own connection may point at another database than the pool's; check the
        # schema there once per App (two cheap reads, in the caller's transaction).
        if self.check_schema and not self._schema_checked:
            _migrate.check(conn)
            self._schema_checked = True

    def close(self) -> None:
        """Close the pool (an App can be used again afterwards; it reopens)."""
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    def __enter__(self) -> App:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def migrate(self) -> list[int]:
        """Apply pending migrations (see ``pgidem migrate``); return the versions applied."""
        with self.connect() as conn:
            applied = _migrate.migrate(conn)
        self._schema_checked = False
        return applied

    # -- tasks ---------------------------------------------------------------------------------

    def task(
        self,
        name: str | None = None,
        *,
        queue: str = "default",
        max_attempts: int = 5,
        priority: int = 0,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        cron: str | None = None,
    ) -> Callable[[Handler], Task]:
        """Register a handler as a task.

        Args:
            name: the task name stored in ``pgidem.tasks.task_name``; defaults to the function's
                ``__name__``.
            queue: the default queue.
            max_attempts: attempts before the task goes to `dead` (1 to 1000).
            priority: the default priority (higher runs first, -32768 to 32767).
            retry: the backoff between attempts.
            timeout: seconds after which a running handler is abandoned: a number (int or
                float, not bool) greater than 0 and at most 31622400 (366 days); None: no limit.
            cron: make it periodic: a cron expression (see ``periodic``), enqueued with no
                args at every tick.

        Raises:
            InvalidInput: a bad default or cron expression, or a name registered twice.
        """
        _check_int(max_attempts, "max_attempts")
        _check_int(priority, "priority")
        if not 1 <= max_attempts <= 1000:
            raise InvalidInput(
                f"invalid max_attempts {max_attempts}: it must be 1 to 1000", "max_attempts"
            )
        _check_timeout(timeout)
        schedule = None if cron is None else _cron.parse(cron)

        def register(fn: Handler) -> Task:
            task_name = name if name is not None else fn.__name__
            _check_text(task_name, "task_name")
            if task_name in self.tasks:
                raise InvalidInput(f"task {task_name!r} is already registered", "task_name")
            registered = Task(
                app=self,
                name=task_name,
                fn=fn,
                queue=queue,
                max_attempts=max_attempts,
                priority=priority,
                retry=retry or RetryPolicy(),
                timeout=timeout,
            )
            if schedule is not None:
                if task_name in self.periodic_tasks:
                    raise InvalidInput(f"schedule {task_name!r} is already registered", "cron")
                self.periodic_tasks[task_name] = Periodic(task_name, task_name, schedule)
            self.tasks[task_name] = registered
            return registered

        return register

    def periodic(
        self,
        task: str | Task,
        cron: str,
        *,
        name: str | None = None,
        args: Mapping[str, Any] | None = None,
        queue: str | None = None,
        priority: int | None = None,
        timezone: str | tzinfo | None = None,
    ) -> Periodic:
        """Enqueue a task at every tick of a cron expression, from every worker's scheduler:
        the tick's idempotency key (``cron:<name>:<tick>``) makes it one task per tick however
        many workers run (see ``pgidem._scheduler`` for missed ticks after downtime).

        Args:
            task: the task (registered here or not).
            cron: five fields (minute hour day-of-month month day-of-week), six with a leading
                second, or a macro such as ``@hourly`` (see ``pgidem._cron``).
            name: the schedule's name, part of the keys; default the task name (give one to
                schedule a task twice, with other args).
            args: the args of every enqueued task (the same at every tick).
            queue, priority: override the task's defaults.
            timezone: the zone whose wall clock the expression follows (default UTC).

        Returns:
            The schedule.

        Raises:
            InvalidInput: a bad expression, time zone, name or args; a name used twice.
        """
        task_name, _ = self._defaults(task)
        schedule_name = name if name is not None else task_name
        _check_text(schedule_name, "name")
        _check_text(queue, "queue")
        _check_int(priority, "priority")
        if schedule_name in self.periodic_tasks:
            raise InvalidInput(f"schedule {schedule_name!r} is already registered", "name")
        dump_args(args)  # rejects what could not be enqueued, now rather than at the first tick
        periodic = Periodic(
            name=schedule_name,
            task_name=task_name,
            cron=_cron.parse(cron, timezone),
            args=dict(args or {}),
            queue=queue,
            priority=priority,
        )
        self.periodic_tasks[schedule_name] = periodic
        return periodic

    def _defaults(self, task: str | Task) -> tuple[str, Task | None]:
        if isinstance(task, Task):
            return task.name, task
        _check_text(task, "task_name")
        return task, self.tasks.get(task)

    # -- enqueue -------------------------------------------------------------------------------

    def enqueue(
        self,
        task: str | Task,
        args: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        queue: str | None = None,
        priority: int | None = None,
        run_at: datetime | None = None,
        delay: float | timedelta | None = None,
        max_attempts: int | None = None,
        conn: psycopg.Connection[Any] | None = None,
        concurrency_key: str | None = None,
    ) -> TaskHandle:
        """Enqueue one task in one round trip, through the SQL function ``pgidem.enqueue``.

        Args:
            task: a task name (registered here or not) or a registered Task.
            args: the handler's keyword arguments, a JSON object.
            idempotency_key: dedupes the enqueue per task name: the same key with equal args
                returns the same task; with different args raises IdempotencyKeyMismatch.
            queue, priority, max_attempts: override the task's defaults.
            run_at: when the task may start (an aware datetime); or ``delay`` in seconds.
            conn: run in the caller's connection and transaction (it commits or rolls back
                with the caller's work); without it, the app's pool in autocommit.
            concurrency_key: at most ``max_per_key`` (default 1) tasks of the queue with this
                key run at once, across all workers (``pgidem.enqueue_keyed``; see
                ``set_queue_limit``).

        Returns:
            A handle on the task (for a replayed key, the existing task).

        Raises:
            InvalidInput: bad args, names, key, priority or time; nothing is written.
            IdempotencyKeyMismatch: the key was used before with different args.
            SchemaOutdated: the database needs `pgidem migrate`.
        """
        name, registered = self._defaults(task)
        args_json = dump_args(args)
        _check_text(idempotency_key, "idempotency_key")
        _check_text(queue, "queue")
        _check_int(priority, "priority")
        _check_int(max_attempts, "max_attempts")
        _check_text(concurrency_key, "concurrency_key")
        when = resolve_run_at(run_at, delay)
        params: dict[str, Any] = {
            "task_name": name,
            "args_json": args_json,
            "queue": queue
            if queue is not None
            else (registered.queue if registered else "default"),
            "idempotency_key": idempotency_key,
            "run_at": when,
            "priority": priority
            if priority is not None
            else (registered.priority if registered else 0),
            "max_attempts": max_attempts
            if max_attempts is not None
            else (registered.max_attempts if registered else None),
        }
        if concurrency_key is not None:
            params["concurrency_key"] = concurrency_key
        enqueue_one = _store.task_enqueue if concurrency_key is None else _store.task_enqueue_keyed
        if conn is not None:
            self._check_caller_conn(conn)
            return TaskHandle(self, enqueue_one(conn, **params))
        with self.pool.connection() as pooled:
            return TaskHandle(self, enqueue_one(pooled, **params))

    def enqueue_many(
        self,
        task: str | Task,
        args: Iterable[Mapping[str, Any] | None],
        *,
        idempotency_keys: Sequence[str | None] | None = None,
        queue: str | None = None,
        priority: int | None = None,
        run_at: datetime | None = None,
        delay: float | timedelta | None = None,
        max_attempts: int | None = None,
        conn: psycopg.Connection[Any] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> list[int]:
        """Enqueue many tasks of one name, in a few round trips.

        With ``idempotency_keys``, one call of ``pgidem.enqueue_many`` (one round trip) per
        ``batch_size`` tasks. Without them, the rows go in one binary COPY, in three round trips
        whatever their number (plus BEGIN and COMMIT when the call has a transaction of its
        own; ``batch_size`` is then unused); the tasks, checks, errors and NOTIFY are those of
        ``pgidem.enqueue_many`` without keys.

        The rules of ``enqueue`` hold per row. Without ``conn``, the whole call runs in one
        transaction on a pooled connection, so a bad row enqueues nothing; with ``conn``, in the
        caller's transaction (or, on an autocommit connection, in one transaction of its own).

        Returns:
            The task ids, in the order of ``args``.

        Raises:
            InvalidInput: a bad row (the message says which); nothing is written.
            IdempotencyKeyMismatch: a key was used before with different args.
        """
        name, registered = self._defaults(task)
        payloads = [dump_args(a) for a in args]
        if idempotency_keys is not None:
            idempotency_keys = list(idempotency_keys)
            if len(idempotency_keys) != len(payloads):
                raise InvalidInput(
                    f"invalid idempotency_keys: {len(idempotency_keys)} keys for "
                    f"{len(payloads)} args; pass one key (or None) per task",
                    "idempotency_key",
                )
            for key in idempotency_keys:
                _check_text(key, "idempotency_key")
        _check_text(queue, "queue")
        _check_int(priority, "priority")
        _check_int(max_attempts, "max_attempts")
        if batch_size < 1:
            raise InvalidInput(f"invalid batch_size {batch_size}: it must be at least 1")
        when = resolve_run_at(run_at, delay)
        common: dict[str, Any] = {
            "task_name": name,
            "queue": queue
            if queue is not None
            else (registered.queue if registered else "default"),
            "run_at": when,
            "priority": priority
            if priority is not None
            else (registered.priority if registered else 0),
            "max_attempts": max_attempts
            if max_attempts is not None
            else (registered.max_attempts if registered else None),
        }

        def run(c: psycopg.Connection[Any]) -> list[int]:
            if idempotency_keys is None:
                # No key to resolve, so nothing the function does that COPY cannot: COPY takes
                # about 1.6 times the rows a second, for less server CPU.
                return _store.task_enqueue_copy(c, args_json=payloads, **common)
            ids: list[int] = []
            for start in range(0, len(payloads), batch_size):
                try:
                    ids += _store.task_enqueue_many(
                        c,
                        args_json=payloads[start : start + batch_size],
                        idempotency_keys=idempotency_keys[start : start + batch_size],
                        **common,
                    )
                except InvalidInput as exc:
                    raise _renumbered(exc, start) from exc.__cause__
            return ids

        if not payloads:
            return []
        if conn is not None:
            self._check_caller_conn(conn)
            if not conn.autocommit:
                return run(conn)  # the caller's transaction: a bad row aborts it
            # An autocommit connection would commit statement by statement: make the call one
            # transaction, so that a bad row (in a later batch, or found after the COPY) leaves
            # nothing behind.
            with mapped_errors(), conn.transaction():
                return run(conn)
        with self.pool.connection() as pooled, mapped_errors(), pooled.transaction():
            return run(pooled)

    # -- reading and control -------------------------------------------------------------------

    def handle(self, task_id: int) -> TaskHandle:
        """A handle on an existing task by id."""
        return TaskHandle(self, task_id)

    def find(self, task: str | Task, idempotency_key: str) -> TaskHandle | None:
        """The task enqueued with this idempotency key, if it exists (and was not pruned).

        The lookup enqueue dedupes by (``pgidem.outcome_of(task_name, key)`` in SQL): its
        handle's ``result()`` replays the stored outcome of a finished task without running
        anything.

        Returns:
            A handle, or None when no task has that key.

        Raises:
            InvalidInput: a bad task name or key.
        """
        name, _ = self._defaults(task)
        _check_text(idempotency_key, "idempotency_key")
        with self.pool.connection() as conn:
            row = _store.task_outcome_by_key(conn, task_name=name, idempotency_key=idempotency_key)
        return None if row is None else TaskHandle(self, int(row["task_id"]))

    def get_task(self, task_id: int) -> TaskInfo:
        """Read a task and its outcome.

        Raises:
            TaskNotFound: no task with that id.
        """
        with self.pool.connection() as conn:
            row = _store.task_get(conn, task_id)
        if row is None:
            raise TaskNotFound(f"no task with id {task_id}")
        return TaskInfo.from_row(row)

    def cancel(self, task_id: int) -> str:
        """Cancel a queued or running task (see ``pgidem.cancel``); return its previous state.

        Raises:
            TaskNotFound: no task with that id.
            InvalidState: the task already finished.
        """
        with self.pool.connection() as conn:
            return _store.task_cancel(conn, task_id)

    def retry(self, task_id: int) -> str:
        """Put a dead or cancelled task back in its queue; return its previous state.

        Raises:
            TaskNotFound: no task with that id.
            InvalidState: the task is not dead or cancelled.
        """
        with self.pool.connection() as conn:
            return _store.task_retry(conn, task_id)

    # -- limits --------------------------------------------------------------------------------

    def set_queue_limit(
        self,
        queue: str,
        *,
        max_running: int | None = None,
        rate_limit: int | None = None,
        rate_period: float | timedelta = 1.0,
        max_per_key: int = 1,
    ) -> None:
        """Set a queue's global limits (``pgidem.set_queue_limit``); None removes a limit. They
        hold across all workers, enforced by the claim; see docs/scheduling.md.

        Args:
            queue: the queue.
            max_running: at most this many of its tasks running at once (0 pauses the queue).
            rate_limit: at most this many task starts per ``rate_period``.
            rate_period: seconds (or a timedelta), 0.001 to 86400.
            max_per_key: at most this many running tasks per concurrency key.

        Raises:
            InvalidInput: a bad queue name or a value out of range; nothing is changed.
        """
        _check_text(queue, "queue")
        _check_int(max_running, "max_running")
        _check_int(rate_limit, "rate_limit")
        _check_int(max_per_key, "max_per_key")
        period = rate_period.total_seconds() if isinstance(rate_period, timedelta) else rate_period
        if (
            isinstance(period, bool)
            or not isinstance(period, int | float)
            or not math.isfinite(period)
            or not 0.001 <= period <= 86400
        ):
            raise InvalidInput(
                f"invalid rate_period {rate_period!r}: it must be between 0.001 and 86400 seconds "
                "(1 millisecond to 1 day)",
                "rate_period",
            )
        with self.pool.connection() as conn:
            _store.queue_limit_set(
                conn,
                queue=queue,
                max_running=max_running,
                rate_limit=rate_limit,
                rate_period_s=float(period),
                max_per_key=max_per_key,
            )

    def queue_limits(self) -> list[dict[str, Any]]:
        """Every queue with limits: ``queue``, ``max_running``, ``rate_limit``,
        ``rate_period_s``, ``max_per_key``, and now ``running`` and ``started_in_period``."""
        with self.pool.connection() as conn:
            return _store.queue_limits_list(conn)
