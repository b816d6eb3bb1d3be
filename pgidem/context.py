"""What a handler receives: the task, its claim, and a connection inside the task's transaction."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg

from pgidem.errors import InvalidInput, InvalidState, LeaseLost

# Statements that would end the task's transaction behind pgidem's back. SAVEPOINT and
# ROLLBACK TO SAVEPOINT are fine: they stay inside it.
_TX_END = re.compile(
    rb"^\s*(commit|end|abort|prepare\s+transaction|rollback(?!\s+to\b)(?!\s+prepared\b)"
    rb"|commit\s+prepared|rollback\s+prepared)\b",
    re.IGNORECASE,
)


def _query_bytes(query: Any) -> bytes | None:
    if isinstance(query, bytes):
        return query
    if isinstance(query, str):
        return query.encode()
    return None


def _ends_transaction(query: Any) -> bool:
    """Whether ``query`` is a statement that would end the task's transaction (the same cheap
    prefix match for the connection and its cursors: one regex on the statement's start)."""
    text = _query_bytes(query)
    return text is not None and _TX_END.match(text) is not None


# The cursor ``TaskConnection.execute`` may use again, kept on the psycopg connection (a slot's
# connection outlives its tasks).
_SPARE = "_pgidem_spare_cursor"

#: Attributes of a cursor that only read its current result: a handler reading them through a
#: TaskCursor leaves the cursor fit to be used again. Any other attribute it reaches through
#: the TaskCursor (``adapters``, ``row_factory``, ``raw``...) may change the cursor for good.
_READ_ONLY = frozenset(
    ("rowcount", "description", "statusmessage", "rownumber", "closed", "query", "params")
)


def _take_spare(conn: psycopg.Connection[Any]) -> psycopg.Cursor[Any] | None:
    """Take the connection's spare cursor if nothing outside pgidem can reach it (the caller
    keeps it again after using it); None: make a new one.

    ``Connection.execute`` makes a new cursor each time, and psycopg's first statement on a new
    cursor costs about 15 us of CPU more than on a used one (its dumpers and loaders are looked
    up afresh). A one-row handler's INSERT through ``ctx.conn.execute`` cost a worker 0.086 ms
    of CPU per task, 0.077 with its cursor used again, and a drain of such tasks went 7 %
    faster (bench, eight alternating drains each). The cursor is used again only when nothing
    else refers to it: its reference count is the least possible (a handler keeping the cursor,
    one of its bound methods, an iterator over it or an exception raised through it all hold a
    reference), it is open, it has the connection's row and cursor factories, and no handler
    reached anything of it that could change it (``_drop_spare``). Taking it off the connection
    first (one atomic ``dict.pop``) keeps two threads of one handler from both taking it. A
    pipeline holds each cursor until its results come: while it does, the count is not the
    least either."""
    cursor: psycopg.Cursor[Any] | None = conn.__dict__.pop(_SPARE, None)
    if (
        cursor is None
        or sys.getrefcount(cursor) != _FREE_REFERENCES
        or cursor.closed
        or cursor.row_factory is not conn.row_factory
        or type(cursor) is not conn.cursor_factory
    ):
        return None
    return cursor


def _local_references() -> int:
    probe = object()
    return sys.getrefcount(probe)


#: The reference count of an object named only by one local variable (the variable and
#: getrefcount's argument), as _take_spare reads the spare's.
_FREE_REFERENCES = _local_references()


def let_go_of_rows(conn: psycopg.Connection[Any]) -> None:
    """At the end of a task: if the spare cursor still holds rows (its last statement returned
    some), drop it, so that a handler's large result is not kept until the next task's
    statement (without the spare, psycopg lets go of it with the cursor). A cursor whose last
    statement returned no rows (an INSERT) stays the spare."""
    spare = conn.__dict__.get(_SPARE)
    if spare is not None:
        result = spare.pgresult
        if result is not None and result.ntuples:
            conn.__dict__.pop(_SPARE, None)


def _drop_spare(conn: psycopg.Connection[Any], cursor: psycopg.Cursor[Any] | None = None) -> None:
    """Never use the spare again (only if it is ``cursor``, when given): a handler reached
    something of it, or of the connection's adapters, that could change it."""
    spare = conn.__dict__.get(_SPARE)
    if spare is not None and (cursor is None or spare is cursor):
        conn.__dict__.pop(_SPARE, None)


class TaskConnection:
    """The task's connection, inside the task's open transaction.

    Everything psycopg's Connection offers works, except what would end the transaction that
    must also hold the completion record: ``commit()``, ``rollback()``, ``close()``, changing
    ``autocommit``, and COMMIT/ROLLBACK/END statements raise InvalidState. The cursors it hands
    out (``execute()``'s result, ``cursor()``) are :class:`TaskCursor` objects that refuse those
    statements the same way. ``raw`` is the one deliberate way around the guard; a handler that
    ends the transaction through it (or some other way) is detected after it returns and its
    attempt fails, but what it committed stays committed. Use ``conn.transaction()`` for a
    savepoint of your own.
    """

    def __init__(
        self, conn: psycopg.Connection[Any], on_first_use: Callable[[], None] | None = None
    ) -> None:
        object.__setattr__(self, "_conn", conn)
        object.__setattr__(self, "_misused", "")
        # Called once, before the handler first reaches the connection: the worker opens the
        # task's savepoint there, so a handler that never touches the database costs none.
        object.__setattr__(self, "_on_first_use", on_first_use)
        object.__setattr__(self, "_used", False)

    @property
    def misused(self) -> str:
        """What the handler tried that would have ended the transaction ("" if nothing): the
        worker fails such an attempt even when the handler caught the error and went on."""
        misused: str = object.__getattribute__(self, "_misused")
        return misused

    def _refuse(self, what: str, message: str) -> InvalidState:
        object.__setattr__(self, "_misused", what)
        return InvalidState(message)

    @property
    def used(self) -> bool:
        """Whether the handler reached the connection (through any method or attribute)."""
        used: bool = object.__getattribute__(self, "_used")
        return used

    def _use(self) -> psycopg.Connection[Any]:
        """The underlying connection, for this guard's own use (the first use runs the hook)."""
        if not object.__getattribute__(self, "_used"):
            object.__setattr__(self, "_used", True)
            hook = object.__getattribute__(self, "_on_first_use")
            if hook is not None:
                hook()
        conn: psycopg.Connection[Any] = object.__getattribute__(self, "_conn")
        return conn

    @property
    def raw(self) -> psycopg.Connection[Any]:
        """The underlying psycopg connection (for APIs that need the real type)."""
        conn = self._use()
        _drop_spare(conn)  # whatever is done with it, execute() starts from a new cursor
        return conn

    def _refuse_end(self) -> InvalidState:
        return self._refuse(
            "end",
            "a task's transaction is committed by pgidem with its completion record; "
            "the handler may not end it (use conn.transaction() for a savepoint)",
        )

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> TaskCursor:
        """Execute a statement in the task's transaction (like ``Connection.execute``); return
        its cursor, guarded like this connection.

        Raises:
            InvalidState: the statement would end the task's transaction (COMMIT, ROLLBACK...).
        """
        if _ends_transaction(query):
            raise self._refuse_end()
        conn = self._use()
        if kwargs:  # prepare=, binary=: psycopg's own way, on a new cursor
            return TaskCursor(conn.execute(query, params, **kwargs), self)
        cursor = _take_spare(conn)
        if cursor is None:
            cursor = conn.cursor()
        cursor.execute(query, params)
        # The spare from now on (not one that failed: the exception may be kept), taken again
        # only when nothing else holds it.
        conn.__dict__[_SPARE] = cursor
        return TaskCursor(cursor, self)

    def cursor(self, *args: Any, **kwargs: Any) -> TaskCursor:
        """A cursor in the task's transaction (``Connection.cursor``'s arguments), guarded like
        this connection."""
        return TaskCursor(self._use().cursor(*args, **kwargs), self)

    def commit(self) -> None:
        raise self._refuse("commit", "the handler may not commit the task's transaction")

    def rollback(self) -> None:
        raise self._refuse(
            "roll back",
            "the handler may not roll back the task's transaction: raise an exception instead",
        )

    def close(self) -> None:
        raise self._refuse("close", "the handler may not close the task's connection")

    def __getattr__(self, name: str) -> Any:
        conn = self._use()
        if name == "adapters":  # the spare cursor copied them: execute() takes a new one
            _drop_spare(conn)
        return getattr(conn, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "autocommit":
            raise self._refuse(
                "change autocommit on",
                "the handler may not change autocommit on the task's connection",
            )
        conn = self._use()
        _drop_spare(conn)  # cursor_factory, row_factory...: execute() takes a new cursor
        setattr(conn, name, value)


class TaskCursor:
    """A psycopg cursor on the task's connection whose ``execute()``, ``executemany()`` and
    ``stream()`` refuse COMMIT/ROLLBACK/END statements like :class:`TaskConnection` does, and
    whose ``connection`` is the guarded connection. Everything else is the psycopg cursor's
    (``raw``); a cursor made from ``ctx.conn.raw`` has no guard."""

    __slots__ = ("_cur", "_owner")

    def __init__(self, cur: psycopg.Cursor[Any], owner: TaskConnection) -> None:
        self._cur = cur
        self._owner = owner

    def _drop_spare(self) -> None:
        """The handler reached something of the psycopg cursor that could change it: the task
        connection's execute() must not use it again."""
        _drop_spare(object.__getattribute__(self._owner, "_conn"), self._cur)

    @property
    def raw(self) -> psycopg.Cursor[Any]:
        """The underlying psycopg cursor."""
        self._drop_spare()
        return self._cur

    @property
    def connection(self) -> TaskConnection:
        """The task's (guarded) connection."""
        return self._owner

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> TaskCursor:
        """Like ``Cursor.execute``; returns this cursor.

        Raises:
            InvalidState: the statement would end the task's transaction.
        """
        if _ends_transaction(query):
            raise self._owner._refuse_end()
        self._cur.execute(query, params, **kwargs)
        return self

    def executemany(self, query: Any, params_seq: Any, **kwargs: Any) -> None:
        """Like ``Cursor.executemany``.

        Raises:
            InvalidState: the statement would end the task's transaction.
        """
        if _ends_transaction(query):
            raise self._owner._refuse_end()
        self._cur.executemany(query, params_seq, **kwargs)

    def stream(self, query: Any, params: Any = None, **kwargs: Any) -> Iterator[Any]:
        """Like ``Cursor.stream``.

        Raises:
            InvalidState: the statement would end the task's transaction.
        """
        if _ends_transaction(query):
            raise self._owner._refuse_end()
        return self._cur.stream(query, params, **kwargs)

    def results(self) -> Iterator[TaskCursor]:
        """Like ``Cursor.results`` (after ``executemany(..., returning=True)``): this cursor,
        positioned on each result in turn."""
        for _ in self._cur.results():
            yield self

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchmany(self, size: int = 0) -> list[Any]:
        return self._cur.fetchmany(size)

    def fetchall(self) -> list[Any]:
        return self._cur.fetchall()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._cur)

    def __enter__(self) -> TaskCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        self._cur.close()

    def __getattr__(self, name: str) -> Any:
        if name not in _READ_ONLY:
            self._drop_spare()
        return getattr(self._cur, name)

    def __repr__(self) -> str:
        return f"<TaskCursor {self._cur!r}>"


class Flag:
    """A flag that one thread sets and others read (``set``/``is_set``, as threading.Event).
    Nothing waits on a lease's flags, so no lock and condition: three Events cost about as much
    as the rest of a no-op task's bookkeeping. Storing a bool attribute is atomic."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


@dataclass
class LeaseState:
    """Shared between the worker's heartbeat and a running handler."""

    lost: Flag = field(default_factory=Flag)
    cancelled: Flag = field(default_factory=Flag)
    abandoned: Flag = field(default_factory=Flag)


class Context:
    """What a handler gets as its first argument.

    Attributes:
        task_id: the task's id in ``pgidem.tasks``.
        task_name: its registered name.
        queue: its queue.
        attempt: this attempt's number, from 1.
        max_attempts: attempts allowed before the task goes dead.
        fencing_token: this claim's token: pass it to downstream systems, which should refuse
            any token lower than the highest they have seen.
        idempotency_key: the key the task was enqueued with, or None.
        args: the task's args.
        conn: the task's connection (a :class:`TaskConnection`), inside the transaction that
            commits with the completion; it and its cursors refuse to end that transaction.
        log: a structlog logger bound with the task's keys.
        worker_id: the worker running it.
    """

    def __init__(
        self,
        *,
        task_id: int,
        task_name: str,
        queue: str,
        attempt: int,
        max_attempts: int,
        fencing_token: int,
        idempotency_key: str | None,
        args: dict[str, Any],
        conn: psycopg.Connection[Any],
        log: Any,
        worker_id: str,
        lease: LeaseState,
        services: Any = None,
        on_first_use: Callable[[], None] | None = None,
    ) -> None:
        self.task_id = task_id
        self.task_name = task_name
        self.queue = queue
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.fencing_token = fencing_token
        self.idempotency_key = idempotency_key
        self.args = args
        self.conn = TaskConnection(conn, on_first_use)
        self.log = log
        self.worker_id = worker_id
        self._lease = lease
        self._services = services

    def cursor(self, *args: Any, **kwargs: Any) -> TaskCursor:
        """A cursor on the task's connection, inside the task's transaction: ``ctx.conn.cursor``
        (a :class:`TaskCursor`, which refuses statements that would end the transaction)."""
        return self.conn.cursor(*args, **kwargs)

    @property
    def lease_lost(self) -> bool:
        """True once the worker knows this claim's lease is gone (expired and taken, cancelled,
        or abandoned after its timeout): the completion will be refused, so stop early."""
        return (
            self._lease.lost.is_set()
            or self._lease.cancelled.is_set()
            or self._lease.abandoned.is_set()
        )

    @property
    def cancelled(self) -> bool:
        """True once the task was cancelled while running."""
        return self._lease.cancelled.is_set()

    def check_lease(self) -> None:
        """Raise LeaseLost if the lease is gone; long handlers should call it between steps.

        Raises:
            LeaseLost: the lease is gone; nothing this attempt does will commit.
        """
        if self._lease.cancelled.is_set():
            raise LeaseLost(f"task {self.task_id} was cancelled")
        if self._lease.abandoned.is_set():
            raise LeaseLost(f"task {self.task_id} ran past its timeout and was abandoned")
        if self._lease.lost.is_set():
            raise LeaseLost(
                f"the lease of task {self.task_id} (token {self.fencing_token}) is lost"
            )

    # -- effects outside the task's transaction (see pgidem/_steps.py and docs/effects.md) -----

    def step_key(self, name: str) -> str:
        """The idempotency key ``step(name, fn)`` passes to ``fn`` (without calling anything).

        It is ``pgidem:<task name>:key:<idempotency key>:<step name>``, or
        ``pgidem:<task name>:id:<task id>:<step name>`` for a task enqueued without a key, with
        ``%`` and ``:`` inside each part written ``%25`` and ``%3A``; a key longer than 255
        characters becomes ``pgidem:sha256:<hex digest of that string>``.

        Raises:
            InvalidInput: a bad step name.
        """
        from pgidem import _steps

        _steps.check_step_name(name)
        return _steps.step_key(self.task_name, self.idempotency_key, self.task_id, name)

    def step(self, name: str, fn: Callable[[str], Any]) -> Any:
        """Run an external call at most once per task as far as pgidem can know.

        If an earlier attempt recorded this step, return its recorded result without calling
        ``fn``. Otherwise call ``fn(key)`` with the step's idempotency key (``step_key(name)``:
        the same on every attempt and worker; pass it on, as an ``Idempotency-Key`` header for
        instance) and record its result in ``pgidem.steps`` in a short transaction of its own,
        fenced by this claim's token. A worker that dies between the call and the record
        leaves a ``calling`` marker (``pgidem show``, ``pgidem.step_history``), and the next
        attempt calls again with the same key.

        Args:
            name: the step's name, unique within the task (1 to 200 characters).
            fn: called with the key; must return something JSON can hold.

        Returns:
            ``fn``'s result after a JSON round trip (what a later replay returns too).

        Raises:
            StepFailed: ``fn`` raised (the original is ``__cause__``); the attempt fails and
                the task retries by its policy. Retry, LeaseLost and InvalidInput from ``fn``
                pass unchanged; NonRetryable raised by ``fn`` fails the task for good.
            InvalidInput: a bad name, or a result that is not JSON (the task goes dead).
            LeaseLost: this claim is stale: ``fn`` was not called, or its record was refused.
        """
        from pgidem import _steps

        return _steps.run_step(self, name, fn)

    def once(self, key: str) -> bool:
        """Insert ``key`` into the dedupe ledger ``pgidem.once_keys``, inside the task's
        transaction; True the first time any task does so (and it committed).

        For effects shared between different tasks (two tasks that both credit order 42):
        do the effect through ``ctx.conn`` only when this returns True. The key commits or
        rolls back with the task; a task that holds it uncommitted makes another task's
        ``once`` of the same key wait for its outcome. From SQL: ``pgidem.once(key)``.

        Args:
            key: 1 to 255 characters, shared by every task that must not repeat the effect.

        Returns:
            True if this task is the first; False if the key was committed before.

        Raises:
            InvalidInput: a bad key.
        """
        from pgidem import _store

        _check_ledger_text(key, "once key")
        return _store.once_claim(
            self.conn.raw, key=key, task_id=self.task_id, token=self.fencing_token
        )

    def fence(self, resource: str) -> bool:
        """Advance the fence of a downstream ``resource`` to this claim's fencing token, inside
        the task's transaction (``pgidem.fence_advance``); say whether it was accepted.

        False means a claim with a newer token has passed this fence: this attempt is stale
        for that resource and must not touch it (raise LeaseLost, say). True holds the fence's
        row until the task's transaction ends; the advance commits or rolls back with it.

        Args:
            resource: a name for the downstream resource (1 to 255 characters).

        Returns:
            True if this token is not older than the highest seen for the resource.

        Raises:
            InvalidInput: a bad resource name.
        """
        from pgidem import _store

        _check_ledger_text(resource, "fence resource")
        return _store.fence_advance(self.conn.raw, resource=resource, token=self.fencing_token)


def _check_ledger_text(value: Any, what: str) -> None:
    if not isinstance(value, str):
        raise InvalidInput(f"invalid {what}: expected a string, got {value!r}")
    if not 1 <= len(value) <= 255:
        raise InvalidInput(f"invalid {what}: it must be 1 to 255 characters (got {len(value)})")
    if "\x00" in value:
        raise InvalidInput(f"invalid {what}: it contains a NUL byte")
