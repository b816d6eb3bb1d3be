"""What a handler receives: the task, its claim, and a connection inside the task's transaction."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any

import psycopg

from pgidem.errors import InvalidState, LeaseLost

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


class TaskConnection:
    """The task's connection, inside the task's open transaction.

    Everything psycopg's Connection offers works, except what would end the transaction that
    must also hold the completion record: ``commit()``, ``rollback()``, ``close()``, changing
    ``autocommit``, and COMMIT/ROLLBACK/END statements raise InvalidState. (A handler that ends
    the transaction some other way is detected after it returns and its attempt fails.)
    Use ``conn.transaction()`` for a savepoint of your own.
    """

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        object.__setattr__(self, "_conn", conn)
        object.__setattr__(self, "_misused", "")

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
    def raw(self) -> psycopg.Connection[Any]:
        """The underlying psycopg connection (for APIs that need the real type)."""
        conn: psycopg.Connection[Any] = object.__getattribute__(self, "_conn")
        return conn

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> psycopg.Cursor[Any]:
        """Execute a statement in the task's transaction (like ``Connection.execute``)."""
        text = _query_bytes(query)
        if text is not None and _TX_END.match(text):
            raise self._refuse(
                "end",
                "a task's transaction is committed by pgidem with its completion record; "
                "the handler may not end it (use conn.transaction() for a savepoint)",
            )
        return self.raw.execute(query, params, **kwargs)

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
        return getattr(self.raw, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "autocommit":
            raise self._refuse(
                "change autocommit on",
                "the handler may not change autocommit on the task's connection",
            )
        setattr(self.raw, name, value)


@dataclass
class LeaseState:
    """Shared between the worker's heartbeat and a running handler."""

    lost: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    abandoned: threading.Event = field(default_factory=threading.Event)


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
        conn: the task's connection, inside the transaction that commits with the completion.
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
    ) -> None:
        self.task_id = task_id
        self.task_name = task_name
        self.queue = queue
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.fencing_token = fencing_token
        self.idempotency_key = idempotency_key
        self.args = args
        self.conn = TaskConnection(conn)
        self.log = log
        self.worker_id = worker_id
        self._lease = lease
        self._services = services

    def cursor(self, *args: Any, **kwargs: Any) -> psycopg.Cursor[Any]:
        """A cursor on the task's connection (inside the task's transaction)."""
        cur: psycopg.Cursor[Any] = self.conn.raw.cursor(*args, **kwargs)
        return cur

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
