"""The one module that talks to psycopg: named queries run on a given connection.

Every function takes the connection to run on (the caller decides the transaction) and maps
psycopg's errors to pgidem's. Row results come back as dicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pgidem import _sql
from pgidem.errors import InvalidInput, mapped_errors

Conn = psycopg.Connection[Any]


def _one(conn: Conn, name: str, params: dict[str, Any] | None = None) -> dict[str, Any] | None:
    with mapped_errors(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_sql.query(name), params)
        return cur.fetchone()


def _all(conn: Conn, name: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    with mapped_errors(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_sql.query(name), params)
        return cur.fetchall()


def execute(conn: Conn, name: str, params: dict[str, Any] | None = None) -> int:
    """Run a named statement; return its row count."""
    with mapped_errors(), conn.cursor() as cur:
        cur.execute(_sql.query(name), params)
        return cur.rowcount


def task_enqueue(
    conn: Conn,
    *,
    task_name: str,
    args_json: str,
    queue: str,
    idempotency_key: str | None,
    run_at: datetime | None,
    priority: int,
    max_attempts: int | None,
) -> int:
    """Enqueue one task through ``pgidem.enqueue``; return its id."""
    row = _one(
        conn,
        "task_enqueue",
        {
            "task_name": task_name,
            "args": args_json,
            "queue": queue,
            "idempotency_key": idempotency_key,
            "run_at": run_at,
            "priority": priority,
            "max_attempts": max_attempts,
        },
    )
    assert row is not None
    return int(row["id"])


def task_enqueue_many(
    conn: Conn,
    *,
    task_name: str,
    args_json: Sequence[str],
    queue: str,
    idempotency_keys: Sequence[str | None] | None,
    run_at: datetime | None,
    priority: int,
    max_attempts: int | None,
) -> list[int]:
    """Enqueue a batch through ``pgidem.enqueue_many`` in one round trip; return ids in order."""
    rows = _all(
        conn,
        "task_enqueue_many",
        {
            "task_name": task_name,
            "args": list(args_json),
            "queue": queue,
            "idempotency_keys": None if idempotency_keys is None else list(idempotency_keys),
            "run_at": run_at,
            "priority": priority,
            "max_attempts": max_attempts,
        },
    )
    return [int(r["id"]) for r in rows]


def _as_is(text: str) -> str:
    # Jsonb's dumps for args that dump_args already made JSON text: one function for every row.
    return text


#: The column types of the ``task_enqueue_copy`` statement, in its order.
_COPY_TYPES = ("bigint", "text", "jsonb", "text", "timestamptz", "integer", "integer")


def task_enqueue_copy(
    conn: Conn,
    *,
    task_name: str,
    args_json: Sequence[str],
    queue: str,
    run_at: datetime | None,
    priority: int,
    max_attempts: int | None,
) -> list[int]:
    """Enqueue tasks without idempotency keys by binary COPY; return their ids in order.

    What ``pgidem.enqueue_many`` does without keys (the same checks, errors, rows and NOTIFY;
    see ``task_enqueue_copy_start`` and the queries after it), in three round trips whatever
    the number of rows. Run it inside a transaction: the args rule is checked on the rows once
    they are written, and a bad row raises an error in the server (as the function does), which
    aborts that transaction.

    Raises:
        InvalidInput: a bad option, or ``row N: invalid args: ...`` for the first bad row.
    """
    start = _one(
        conn,
        "task_enqueue_copy_start",
        {
            "task_name": task_name,
            "queue": queue,
            "run_at": run_at,
            "priority": priority,
            "max_attempts": max_attempts,
            "n": len(args_json),
        },
    )
    assert start is not None
    ids: list[int] = start["ids"]
    if not ids:
        return ids
    when, attempts = start["run_at"], start["max_attempts"]
    with (
        mapped_errors(),
        conn.cursor() as cur,
        cur.copy(_sql.query("task_enqueue_copy")) as copy,
    ):
        copy.set_types(_COPY_TYPES)
        for task_id, args in zip(ids, args_json, strict=True):
            copy.write_row(
                (task_id, task_name, Jsonb(args, dumps=_as_is), queue, when, priority, attempts)
            )
    bounds = {"first_id": min(ids), "last_id": max(ids)}
    while True:
        bad = {int(r["id"]) for r in _all(conn, "task_enqueue_copy_bad_ids", bounds)}
        # The first of this call's rows among them (the range may hold other callers' rows).
        row = next((i for i, task_id in enumerate(ids, start=1) if task_id in bad), None)
        if row is None:
            return ids
        try:
            execute(conn, "task_args_check", {"task_id": ids[row - 1]})
        except InvalidInput as exc:
            raise InvalidInput(f"row {row}: {exc}", exc.field) from exc.__cause__
        # Not raised: pgidem._args_problem was replaced between the two statements and now
        # accepts that row. Look again, under the rule as it is now.


def task_get(conn: Conn, task_id: int) -> dict[str, Any] | None:
    """The task with its outcome, or None."""
    return _one(conn, "task_get", {"task_id": task_id})


def task_attempts(conn: Conn, task_id: int) -> list[dict[str, Any]]:
    """Every attempt of a task, oldest first."""
    return _all(conn, "task_attempts", {"task_id": task_id})


def task_cancel(conn: Conn, task_id: int) -> str:
    """Cancel a task; return the state it was in."""
    row = _one(conn, "task_cancel", {"task_id": task_id})
    assert row is not None
    return str(row["previous"])


def task_retry(conn: Conn, task_id: int) -> str:
    """Put a dead or cancelled task back in its queue; return the state it was in."""
    row = _one(conn, "task_retry", {"task_id": task_id})
    assert row is not None
    return str(row["previous"])


def task_claim(
    conn: Conn,
    *,
    worker_id: str,
    queues: Sequence[str],
    task_names: Sequence[str],
    limit: int,
    lease_s: float,
    locked: Sequence[str] = (),
    rescue: bool = True,
) -> list[dict[str, Any]]:
    """Claim up to ``limit`` tasks (see ``task_claim`` in queries.sql). ``locked``: the
    limited queues whose limit rows this transaction locked (``queue_limits_lock``); a queue
    with limits that is not among them is not claimed from. ``rescue``: also take over tasks
    whose lease expired (False: only queued ones)."""
    # Without locked queues the limits' part of the statement does nothing: the statement
    # without it plans in a third of the time (sql/queries.sql, task_claim); so for the rescue.
    omitted = [part for part, left in (("limits", not locked), ("rescue", not rescue)) if left]
    return _all(
        conn,
        f"task_claim_without_{'_'.join(omitted)}" if omitted else "task_claim",
        {
            "worker_id": worker_id,
            "queues": list(queues),
            "task_names": list(task_names),
            "limit": limit,
            "lease_s": lease_s,
            "locked": list(locked),
        },
    )


def task_lock_claims(
    conn: Conn, *, task_ids: Sequence[int], tokens: Sequence[int]
) -> tuple[dict[int, tuple[bool, bool]], int | None]:
    """Lock the rows of claimed tasks FOR SHARE in the open transaction; return token ->
    (current, cancelled) for each task found, and the transaction's id."""
    rows = _all(conn, "task_lock_claims", {"task_ids": list(task_ids), "tokens": list(tokens)})
    states = {int(r["token"]): (bool(r["current"]), bool(r["cancelled"])) for r in rows}
    return states, (int(rows[0]["xid"]) if rows else None)


def transaction_status(conn: Conn, xid: int) -> str | None:
    """``committed``, ``aborted`` or ``in progress`` for a transaction id from
    ``task_lock_claims`` (None when too old to tell)."""
    row = _one(conn, "transaction_status", {"xid": xid})
    return None if row is None else row["status"]


def task_mark_succeeded(conn: Conn, *, task_id: int, token: int) -> bool:
    """Mark a running task succeeded if ``token`` is still its claim's (its outcome follows
    with ``task_record_outcomes``); False when fenced (the caller must roll back the task's
    writes)."""
    return _one(conn, "task_mark_succeeded", {"task_id": task_id, "token": token}) is not None


def task_record_outcomes(
    conn: Conn, *, task_ids: Sequence[int], tokens: Sequence[int], results_json: Sequence[str]
) -> set[int]:
    """Record the outcomes and attempts of tasks ``task_mark_succeeded`` marked in this
    transaction; return the ids recorded."""
    return _completed_ids(conn, "task_record_outcomes", task_ids, tokens, results_json)


def task_complete_many(
    conn: Conn, *, task_ids: Sequence[int], tokens: Sequence[int], results_json: Sequence[str]
) -> set[int]:
    """The fenced completions of tasks that wrote nothing, in one statement; return the ids
    completed (a task not among them was fenced)."""
    return _completed_ids(conn, "task_complete_many", task_ids, tokens, results_json)


def _completed_ids(
    conn: Conn,
    name: str,
    task_ids: Sequence[int],
    tokens: Sequence[int],
    results_json: Sequence[str],
) -> set[int]:
    """Run a completion statement over (task, token, result) arrays; the task ids it returned."""
    rows = _all(
        conn,
        name,
        {"task_ids": list(task_ids), "tokens": list(tokens), "results": list(results_json)},
    )
    return {int(r["task_id"]) for r in rows}


def task_retry_later(
    conn: Conn, *, task_id: int, token: int, delay_s: float, error: dict[str, Any]
) -> bool:
    """Requeue a failed attempt's task; False when the token is no longer current."""
    row = _one(
        conn,
        "task_retry_later",
        {"task_id": task_id, "token": token, "delay_s": delay_s, **_error_params(error)},
    )
    return row is not None


def task_kill(
    conn: Conn, *, task_id: int, token: int, error: dict[str, Any], error_json: str
) -> bool:
    """Move a failed attempt's task to dead with its final error; False when fenced."""
    row = _one(
        conn,
        "task_kill",
        {"task_id": task_id, "token": token, "error": error_json, **_error_params(error)},
    )
    return row is not None


def _error_params(error: dict[str, Any]) -> dict[str, Any]:
    return {
        "error_class": error.get("class"),
        "error_message": error.get("message"),
        "error_traceback": error.get("traceback"),
        "last_error": f"{error.get('class')}: {error.get('message')}",
        "attempt_status": error.get("attempt_status", "failed"),
    }


def attempt_finish_unfenced(
    conn: Conn, *, tokens: Sequence[int], status: str, error: dict[str, Any] | None = None
) -> int:
    """Record how attempts whose token was no longer current ended (``fenced``...)."""
    err = error or {}
    return execute(
        conn,
        "attempt_finish_unfenced",
        {
            "tokens": list(tokens),
            "status": status,
            "error_class": err.get("class"),
            "error_message": err.get("message"),
            "error_traceback": err.get("traceback"),
        },
    )


def lease_extend(
    conn: Conn, *, task_ids: Sequence[int], tokens: Sequence[int], lease_s: float
) -> dict[int, tuple[bool, bool, bool]]:
    """Extend leases; return token -> (still current, cancelled, extended)."""
    rows = _all(
        conn,
        "lease_extend",
        {"task_ids": list(task_ids), "tokens": list(tokens), "lease_s": lease_s},
    )
    return {
        int(r["token"]): (bool(r["current"]), bool(r["cancelled"]), bool(r["extended"]))
        for r in rows
    }


def lease_release(conn: Conn, *, task_ids: Sequence[int], tokens: Sequence[int]) -> int:
    """Give back leases of claimed tasks that never started; return how many."""
    row = _one(conn, "lease_release", {"task_ids": list(task_ids), "tokens": list(tokens)})
    return int(row["released"]) if row else 0


def worker_upsert(
    conn: Conn,
    *,
    worker_id: str,
    hostname: str,
    pid: int,
    queues: Sequence[str],
    concurrency: int,
) -> None:
    """Register a worker, or record its heartbeat."""
    execute(
        conn,
        "worker_heartbeat",
        {
            "worker_id": worker_id,
            "hostname": hostname,
            "pid": pid,
            "queues": list(queues),
            "concurrency": concurrency,
        },
    )


def worker_deregister(conn: Conn, worker_id: str) -> None:
    """Remove a worker's registry row (on a clean exit)."""
    execute(conn, "worker_deregister", {"worker_id": worker_id})


def worker_prune_stale(conn: Conn, age_s: float) -> int:
    """Remove registry rows of workers silent for longer than ``age_s``."""
    return execute(conn, "worker_prune_stale", {"age_s": age_s})


def next_run_at(conn: Conn, queues: Sequence[str]) -> datetime | None:
    """When the earliest scheduled task in these queues becomes runnable."""
    row = _one(conn, "next_run_at", {"queues": list(queues)})
    return None if row is None else row["run_at"]


def queue_status(conn: Conn) -> list[dict[str, Any]]:
    """Per-queue counts (the ``pgidem.queue_stats`` view)."""
    return _all(conn, "queue_status")


def workers_live(conn: Conn) -> list[dict[str, Any]]:
    """Registered workers."""
    return _all(conn, "workers_live")


def task_prune(conn: Conn, *, older_than_s: float | None, batch_size: int) -> int:
    """Delete one batch of finished tasks older than the retention; return how many."""
    row = _one(
        conn,
        "task_prune",
        {
            "older_than": None if older_than_s is None else f"{older_than_s} seconds",
            "batch_size": batch_size,
        },
    )
    return int(row["deleted"]) if row else 0


# -- effects: steps, once keys, fences, outcome lookup, pruning ---------------------------------


def step_begin(
    conn: Conn, *, task_id: int, token: int, attempt: int, name: str, step_key: str
) -> dict[str, Any]:
    """Look up a step's record and write this attempt's call marker (see ``step_begin``).

    Returns:
        ``call_id`` (None when no marker was written), ``current`` (the claim is still ours),
        ``recorded`` and, when it is, ``recorded_result``, ``recorded_token``,
        ``recorded_attempt``.
    """
    row = _one(
        conn,
        "step_begin",
        {
            "task_id": task_id,
            "token": token,
            "attempt": attempt,
            "name": name,
            "step_key": step_key,
        },
    )
    assert row is not None
    return row


def step_record(
    conn: Conn,
    *,
    task_id: int,
    token: int,
    attempt: int,
    name: str,
    step_key: str,
    call_id: int | None,
    result_json: str,
) -> dict[str, Any]:
    """Record a step's result, fenced by the token (see ``step_record``).

    Returns:
        ``current`` (False: refused, the claim is stale), ``inserted``, ``had_record`` and
        ``existing_result`` (the record already there, which wins).
    """
    row = _one(
        conn,
        "step_record",
        {
            "task_id": task_id,
            "token": token,
            "attempt": attempt,
            "name": name,
            "step_key": step_key,
            "call_id": call_id,
            "result": result_json,
        },
    )
    assert row is not None
    return row


def step_fail(conn: Conn, *, call_id: int, error_class: str, error_message: str) -> None:
    """Keep the error of a step's fn on its call marker."""
    execute(
        conn,
        "step_fail",
        {"call_id": call_id, "error_class": error_class, "error_message": error_message},
    )


def task_steps(conn: Conn, task_id: int) -> list[dict[str, Any]]:
    """The recorded steps of a task."""
    return _all(conn, "task_steps", {"task_id": task_id})


def task_step_history(conn: Conn, task_id: int) -> list[dict[str, Any]]:
    """Every step call of every attempt of a task, oldest first (``pgidem.step_history``)."""
    return _all(conn, "task_step_history", {"task_id": task_id})


def once_claim(conn: Conn, *, key: str, task_id: int | None, token: int | None) -> bool:
    """Insert a once key (``pgidem.once``) on ``conn``; True the first time."""
    row = _one(conn, "once_claim", {"key": key, "task_id": task_id, "token": token})
    assert row is not None
    return bool(row["first"])


def fence_advance(conn: Conn, *, resource: str, token: int) -> bool:
    """Advance a resource's fence (``pgidem.fence_advance``) on ``conn``; True if accepted."""
    row = _one(conn, "fence_advance", {"resource": resource, "token": token})
    assert row is not None
    return bool(row["accepted"])


def task_outcome_by_key(
    conn: Conn, *, task_name: str, idempotency_key: str
) -> dict[str, Any] | None:
    """A task's state and outcome by (task name, key) (``pgidem.outcome_of``), or None."""
    return _one(
        conn, "task_outcome_by_key", {"task_name": task_name, "idempotency_key": idempotency_key}
    )


def _interval(seconds: float | None) -> str | None:
    return None if seconds is None else f"{seconds} seconds"


def prune_batch(conn: Conn, *, older_than_s: float | None, batch_size: int) -> tuple[int, int]:
    """Delete one batch of old finished tasks and once keys; return (tasks, once keys)."""
    row = _one(
        conn,
        "prune_batch",
        {"older_than": _interval(older_than_s), "batch_size": batch_size},
    )
    assert row is not None
    return int(row["tasks_deleted"]), int(row["once_keys_deleted"])


def prune_pending(conn: Conn, *, older_than_s: float | None) -> tuple[int, int]:
    """How many finished tasks and once keys are older than the retention."""
    row = _one(conn, "prune_pending", {"older_than": _interval(older_than_s)})
    assert row is not None
    return int(row["tasks"]), int(row["once_keys"])


# -- control: queue limits, concurrency keys ---------------------------------------------------


def claim_begin(conn: Conn) -> None:
    """Open the READ COMMITTED transaction a claim of a limited queue runs in."""
    execute(conn, "claim_begin")


def queue_limits_lock(conn: Conn, queues: Sequence[str]) -> list[str]:
    """Lock the limit rows of these queues (inside the claim transaction); return those locked."""
    return [str(r["queue"]) for r in _all(conn, "queue_limits_lock", {"queues": list(queues)})]


def queue_limits_of(conn: Conn, queues: Sequence[str]) -> set[str]:
    """Which of these queues have a limits row."""
    return {str(r["queue"]) for r in _all(conn, "queue_limits_of", {"queues": list(queues)})}


def queue_limit_set(
    conn: Conn,
    *,
    queue: str,
    max_running: int | None,
    rate_limit: int | None,
    rate_period_s: float,
    max_per_key: int,
) -> None:
    """Set a queue's limits through ``pgidem.set_queue_limit``."""
    execute(
        conn,
        "queue_limit_set",
        {
            "queue": queue,
            "max_running": max_running,
            "rate_limit": rate_limit,
            "rate_period": timedelta(seconds=rate_period_s),
            "max_per_key": max_per_key,
        },
    )


def queue_limits_list(conn: Conn) -> list[dict[str, Any]]:
    """Every queue with limits, with its running tasks and starts in the current period."""
    return _all(conn, "queue_limits_list")


def task_enqueue_keyed(
    conn: Conn,
    *,
    task_name: str,
    args_json: str,
    queue: str,
    idempotency_key: str | None,
    run_at: datetime | None,
    priority: int,
    max_attempts: int | None,
    concurrency_key: str,
) -> int:
    """Enqueue one task with a concurrency key; return its id."""
    row = _one(
        conn,
        "task_enqueue_keyed",
        {
            "task_name": task_name,
            "args": args_json,
            "queue": queue,
            "idempotency_key": idempotency_key,
            "run_at": run_at,
            "priority": priority,
            "max_attempts": max_attempts,
            "concurrency_key": concurrency_key,
        },
    )
    assert row is not None
    return int(row["id"])


def task_control(conn: Conn, task_id: int) -> dict[str, Any] | None:
    """A task's concurrency key and its queue's limits."""
    return _one(conn, "task_control", {"task_id": task_id})


def key_retention(conn: Conn) -> float:
    """The database's key retention (``pgidem.key_retention``), in seconds."""
    row = _one(conn, "key_retention")
    assert row is not None
    return float(row["seconds"])


def schedule_upsert(
    conn: Conn,
    *,
    name: str,
    task_name: str,
    cron: str,
    timezone: str,
    queue: str,
    last_tick: datetime | None,
    last_task_id: int | None,
    next_tick: datetime | None,
) -> None:
    """Record a periodic schedule in ``pgidem.schedules`` (last_tick only moves forward)."""
    execute(
        conn,
        "schedule_upsert",
        {
            "name": name,
            "task_name": task_name,
            "cron": cron,
            "timezone": timezone,
            "queue": queue,
            "last_tick": last_tick,
            "last_task_id": last_task_id,
            "next_tick": next_tick,
        },
    )


def schedule_list(conn: Conn) -> list[dict[str, Any]]:
    """The periodic schedules recorded by schedulers (``pgidem.schedules``)."""
    return _all(conn, "schedule_list")
