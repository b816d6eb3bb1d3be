"""Recorded steps: ``ctx.step(name, fn)`` calls an outside system at most once per task as far
as pgidem can know, and makes a repeat harmless where it cannot.

The protocol of one step, each part in its own short transaction on a pooled connection that is
*not* the task's (the handler's transaction must hold nothing but the handler's writes):

1. ``step_begin``: if the task has a record for this step, return its result (and note a
   ``replayed`` call); else, if the claim is still current, write a ``calling`` marker. A stale
   claim gets LeaseLost before anything is called.
2. ``fn(key)``: the external call, with the step's key (see :func:`step_key`).
3. ``step_record``: record the JSON result only while the claim is current (token ours, task
   running) and mark the call ``recorded``; a stale claim's record is refused (``refused``) and
   the handler gets LeaseLost, so nothing of its attempt commits.

A worker that dies between 2 and 3 leaves the ``calling`` marker: the attempt history shows the
step as called and not recorded, and the next attempt calls ``fn`` again with the same key, so a
downstream that honours idempotency keys applies it once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import psycopg

from pgidem import _store
from pgidem.app import dump_json
from pgidem.errors import (
    MAX_ERROR_MESSAGE,
    InvalidInput,
    LeaseLost,
    PgidemError,
    Retry,
    StepFailed,
    mapped_errors,
)

if TYPE_CHECKING:
    from pgidem.context import Context

#: The longest step name, in characters (the CHECK on pgidem.steps.name).
MAX_STEP_NAME = 200
#: The longest step key: longer derived keys are replaced by a hash (Stripe's limit is 255).
MAX_STEP_KEY = 255


def _quote(part: str) -> str:
    # ":" separates the parts of a key; quoting it (and "%", the quote character) keeps two
    # different (task name, key, step) triples from ever giving the same string.
    return part.replace("%", "%25").replace(":", "%3A")


def step_key(task_name: str, idempotency_key: str | None, task_id: int, step_name: str) -> str:
    """The idempotency key of a step: stable across every attempt and worker of a task,
    different for each step, and different between tasks.

    The key is ``pgidem:<task name>:key:<idempotency key>:<step name>`` for a task enqueued with
    an idempotency key, and ``pgidem:<task name>:id:<task id>:<step name>`` for one without. In
    each part, ``%`` is written ``%25`` and ``:`` is written ``%3A``. A key longer than 255
    characters is replaced by ``pgidem:sha256:`` and the SHA-256 of that string in hex (78
    characters in all).

    Args:
        task_name: the task's registered name.
        idempotency_key: the key the task was enqueued with, or None.
        task_id: the task's id (used only when there is no idempotency key).
        step_name: the name given to ``ctx.step``.

    Returns:
        The key, at most 255 characters.
    """
    ident = f"id:{task_id}" if idempotency_key is None else f"key:{_quote(idempotency_key)}"
    key = f"pgidem:{_quote(task_name)}:{ident}:{_quote(step_name)}"
    if len(key) <= MAX_STEP_KEY:
        return key
    return "pgidem:sha256:" + hashlib.sha256(key.encode()).hexdigest()


def check_step_name(name: Any) -> str:
    """Return ``name`` if it is a valid step name.

    Raises:
        InvalidInput: not a string, empty, longer than 200 characters, or holding a NUL.
    """
    if not isinstance(name, str):
        raise InvalidInput(f"invalid step name: expected a string, got {name!r}", "step")
    if not 1 <= len(name) <= MAX_STEP_NAME:
        raise InvalidInput(
            f"invalid step name: it must be 1 to {MAX_STEP_NAME} characters (got {len(name)})",
            "step",
        )
    if "\x00" in name:
        raise InvalidInput("invalid step name: it contains a NUL byte", "step")
    return name


@contextlib.contextmanager
def _side_connection(ctx: Context) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection that is not the task's: the worker's pool when the context
    comes from a worker, else a new connection to the task connection's database."""
    services = ctx._services
    if services is not None and hasattr(services, "side_connection"):
        with services.side_connection() as conn:
            yield conn
        return
    info = ctx.conn.raw.info
    with (
        mapped_errors(),
        psycopg.connect(info.dsn, password=info.password or None, autocommit=True) as conn,
    ):
        yield conn


def _describe(exc: BaseException) -> tuple[str, str]:
    cls = type(exc)
    name = (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )
    return name, str(exc)[:MAX_ERROR_MESSAGE]


def _step_error(name: str, key: str, exc: Exception) -> Exception:
    """What the handler sees when ``fn`` failed: the error names the step, except for the
    exceptions that steer pgidem itself, which pass unchanged."""
    if isinstance(exc, Retry | LeaseLost | StepFailed | InvalidInput):
        return exc
    # The caller raises it "from" the original: the worker treats a NonRetryable cause as final.
    return StepFailed(name, key, exc)


def run_step(ctx: Context, name: str, fn: Callable[[str], Any]) -> Any:
    """Run ``fn(key)`` once per task, recording its JSON result; see :meth:`Context.step`."""
    check_step_name(name)
    if not callable(fn):
        raise InvalidInput(f"ctx.step({name!r}, fn): fn must be callable, got {fn!r}", "step")
    key = step_key(ctx.task_name, ctx.idempotency_key, ctx.task_id, name)
    params: dict[str, Any] = {
        "task_id": ctx.task_id,
        "token": ctx.fencing_token,
        "attempt": ctx.attempt,
        "name": name,
        "step_key": key,
    }
    with _side_connection(ctx) as conn:
        begin = _store.step_begin(conn, **params)
    if begin["recorded"]:
        ctx.log.info(
            "step_replayed",
            step=name,
            step_key=key,
            recorded_attempt=begin["recorded_attempt"],
            recorded_token=begin["recorded_token"],
        )
        return begin["recorded_result"]
    if not begin["current"]:
        raise LeaseLost(
            f"step {name!r} of task {ctx.task_id} was not called: the claim with fencing token "
            f"{ctx.fencing_token} is no longer current (another worker holds the task)"
        )
    call_id = int(begin["call_id"])
    ctx.log.debug("step_called", step=name, step_key=key)
    try:
        value = fn(key)
        try:
            result_json = dump_json(value, "step result")
        except InvalidInput as exc:
            raise InvalidInput(
                f"step {name!r} returned a value that cannot be recorded as JSON ({exc}); "
                "return a dict, list, str, number, bool or None",
                "step",
            ) from exc
    except Exception as exc:
        error_class, message = _describe(exc)
        with contextlib.suppress(PgidemError, psycopg.Error), _side_connection(ctx) as conn:
            _store.step_fail(conn, call_id=call_id, error_class=error_class, error_message=message)
        ctx.log.info("step_failed", step=name, step_key=key, error_class=error_class)
        err = _step_error(name, key, exc)
        if err is exc:
            raise
        raise err from exc
    with _side_connection(ctx) as conn:
        rec = _store.step_record(conn, **params, call_id=call_id, result_json=result_json)
    if not rec["current"]:
        ctx.log.warning("step_refused", step=name, step_key=key)
        raise LeaseLost(
            f"the record of step {name!r} of task {ctx.task_id} was refused: the claim with "
            f"fencing token {ctx.fencing_token} is no longer current (another worker holds the "
            "task); nothing of this attempt will commit"
        )
    ctx.log.info("step_recorded", step=name, step_key=key)
    if not rec["inserted"] and rec["had_record"]:
        return rec["existing_result"]
    # The JSON round trip, so that this attempt sees what a replay would return.
    return json.loads(result_json)
