"""The exceptions pgidem raises, and the one place where psycopg's errors become ours.

The tree::

    PgidemError
    ├── ConfigurationError       bad DSN, app path, option or setting
    ├── SchemaError              the database's schema does not match this code
    │   ├── SchemaOutdated       older than the code: run `pgidem migrate`
    │   └── SchemaTooNew         newer than the code: upgrade pgidem
    ├── InvalidInput             bad task name, queue, key, args, priority, time... (SQLSTATE PI002)
    │   └── IdempotencyKeyMismatch   a key reused with different args (SQLSTATE PI001)
    ├── TaskNotFound             no task with that id or key
    ├── InvalidState             the task is not in a state that allows the operation
    │   └── TransactionEnded     a handler committed, rolled back or closed its task's transaction
    ├── TaskFailed               handle.result(): the task ended `dead`; carries the final error
    ├── TaskCancelled            handle.result(): the task was cancelled
    ├── ResultTimeout            handle.result(timeout=...) ran out of time
    ├── StepFailed               ctx.step(name, fn): fn raised; the original is ``__cause__``
    └── DatabaseError            any other error from PostgreSQL or the connection

Raised by handlers to steer their own retry (not errors of pgidem's)::

    Retry(delay)                 retry after `delay` seconds, counting an attempt
    NonRetryable                 fail now: the task goes to `dead` whatever attempts are left
    LeaseLost                    raised by ctx.check_lease() when the lease is gone, and by
                                 ctx.step() when the claim is stale (its record is refused)

Every error that came from psycopg keeps it as ``__cause__``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg.errors

#: SQLSTATE raised by pgidem.enqueue when an idempotency key is reused with different args.
SQLSTATE_KEY_MISMATCH = "PI001"
#: SQLSTATE raised by pgidem's SQL functions on invalid input.
SQLSTATE_INVALID_INPUT = "PI002"
#: SQLSTATE raised by pgidem's SQL functions for a missing task.
SQLSTATE_NOT_FOUND = "PI003"
#: SQLSTATE raised by pgidem's SQL functions for an operation not allowed in the task's state.
SQLSTATE_INVALID_STATE = "PI004"

#: The longest error message kept (on an attempt row, a dead task's outcome, a step call), in
#: characters: a longer message keeps its first MAX_ERROR_MESSAGE characters.
MAX_ERROR_MESSAGE = 2000
#: The longest traceback kept on an attempt row, in characters: a longer one keeps its last
#: MAX_TRACEBACK characters (the end, where the error was raised).
MAX_TRACEBACK = 16000


class PgidemError(Exception):
    """Root of every error pgidem raises."""


class ConfigurationError(PgidemError):
    """A DSN, app path, option or setting is wrong."""


class SchemaError(PgidemError):
    """The database's pgidem schema does not match this version of the code."""


class SchemaOutdated(SchemaError):
    """The schema is older than the code: run `pgidem migrate`."""


class SchemaTooNew(SchemaError):
    """The schema is newer than the code: upgrade pgidem before running it."""


class InvalidInput(PgidemError):
    """Input was rejected; nothing was written.

    Attributes:
        field: the name of the offending field (``task_name``, ``args``...), when known.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class IdempotencyKeyMismatch(InvalidInput):
    """An idempotency key was reused with different args: a client bug, never a silent dedupe."""


class TaskNotFound(PgidemError):
    """No task has that id (or task name and idempotency key)."""


class InvalidState(PgidemError):
    """The task's state does not allow the operation (retrying a running task, say)."""


class TransactionEnded(InvalidState):
    """A handler ended (or tried to end) the task's transaction, which only pgidem may end: the
    attempt fails without retry and no completion is recorded for it."""


class TaskFailed(PgidemError):
    """The task ended `dead`.

    Attributes:
        task_id: the task.
        error: the final error as stored in ``pgidem.outcomes.error`` (class, message...).
    """

    def __init__(self, task_id: int, error: dict[str, Any]) -> None:
        cls = error.get("class", "Error")
        msg = error.get("message", "")
        super().__init__(f"task {task_id} is dead: {cls}: {msg}")
        self.task_id = task_id
        self.error = error


class TaskCancelled(PgidemError):
    """The task was cancelled before it succeeded."""


class ResultTimeout(PgidemError):
    """The task had no outcome within the time given to ``result()``."""


class DatabaseError(PgidemError):
    """An error from PostgreSQL or the connection that pgidem has no more specific class for."""


class StepFailed(PgidemError):
    """A step's ``fn`` raised: the task's attempt fails and retries by its policy, and the next
    attempt calls ``fn`` again with the same key (nothing was recorded). The original error is
    ``__cause__``; raise NonRetryable from ``fn`` to fail the task for good.

    Attributes:
        step: the step's name.
        key: the step's idempotency key.
    """

    def __init__(self, step: str, key: str, error: BaseException) -> None:
        super().__init__(f"step {step!r} failed: {type(error).__name__}: {error}")
        self.step = step
        self.key = key


class Retry(Exception):
    """Raise from a handler to retry the task after ``delay`` seconds (an attempt is counted).

    Args:
        delay: seconds to wait before the next attempt; None means the task's backoff policy.
        reason: a message kept on the attempt row.
    """

    def __init__(self, delay: float | None = None, reason: str = "retry requested") -> None:
        super().__init__(reason)
        self.delay = delay


class NonRetryable(Exception):
    """Raise from a handler (or raise one chained from it) to fail the task now, without retry."""


class LeaseLost(Exception):
    """The task's lease is gone: another worker may run it, and this completion will be refused."""


def _from_diag(exc: psycopg.Error) -> PgidemError | None:
    state = exc.sqlstate
    message = exc.diag.message_primary or str(exc)
    if exc.diag.message_detail:
        message = f"{message} ({exc.diag.message_detail})"
    if state == SQLSTATE_KEY_MISMATCH:
        return IdempotencyKeyMismatch(message, "idempotency_key")
    if state == SQLSTATE_INVALID_INPUT:
        return InvalidInput(message, exc.diag.column_name)
    if state == SQLSTATE_NOT_FOUND:
        return TaskNotFound(message)
    if state == SQLSTATE_INVALID_STATE:
        return InvalidState(message)
    if isinstance(exc, psycopg.errors.CheckViolation | psycopg.errors.NotNullViolation):
        return InvalidInput(f"rejected by the database: {message}")
    if isinstance(exc, psycopg.errors.UndefinedFunction | psycopg.errors.UndefinedTable) and (
        "pgidem" in message
    ):
        return SchemaOutdated(
            f"the pgidem schema is missing or incomplete ({message}): run `pgidem migrate`"
        )
    return None


def translate(exc: psycopg.Error) -> PgidemError:
    """Return the most specific pgidem error for a psycopg error (the caller chains it)."""
    mapped = _from_diag(exc)
    if mapped is not None:
        return mapped
    if isinstance(exc, psycopg.DataError) and "NUL" in str(exc):
        return InvalidInput(f"invalid input: {exc}")
    return DatabaseError(f"{type(exc).__name__}: {exc}".strip())


@contextlib.contextmanager
def mapped_errors() -> Iterator[None]:
    """Turn psycopg errors raised inside the block into pgidem errors, keeping ``__cause__``."""
    try:
        yield
    except psycopg.Error as exc:
        raise translate(exc) from exc
