"""Handlers for the scheduling and control tests (limits, rate limits, periodic tasks,
cancellation, timeouts), run by real `pgidem worker --app tests.apps.control_app:app`.

Handlers that write do so through ``ctx.conn`` into the ``ledger`` table the tests create
(LEDGER_DDL): such a row exists only if its attempt's completion committed. ``CONTROL_APP_CRON``
in the environment makes ``tick`` periodic with that cron expression.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pgidem
from pgidem import RetryPolicy

LEDGER_DDL = """
CREATE TABLE ledger (
    task_id  bigint      NOT NULL,
    token    bigint      NOT NULL,
    attempt  integer     NOT NULL,
    queue    text        NOT NULL,
    started  timestamptz NOT NULL,
    finished timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""

app = pgidem.App()


def _write(ctx: pgidem.Context, started: float) -> None:
    ctx.conn.execute(
        "INSERT INTO ledger (task_id, token, attempt, queue, started)"
        " VALUES (%s, %s, %s, %s, to_timestamp(%s))",
        (ctx.task_id, ctx.fencing_token, ctx.attempt, ctx.queue, started),
    )


@app.task(queue="limited")
def hold(ctx: pgidem.Context, seconds: float = 0.2) -> dict[str, Any]:
    """Sleeps, then writes its ledger row (with when it started): slow enough to overlap."""
    started = time.time()
    time.sleep(seconds)
    _write(ctx, started)
    return {"worker": ctx.worker_id}


@app.task(queue="limited")
def quick(ctx: pgidem.Context) -> None:
    """Writes its ledger row at once (for the rate limit: starts, not durations, matter)."""
    _write(ctx, time.time())


@app.task(queue="control")
def write_then_wait(ctx: pgidem.Context, seconds: float = 30.0) -> dict[str, Any]:
    """Writes its ledger row, then waits up to ``seconds`` or until it sees it was cancelled
    (a running task is told through ctx.cancelled); returns what it saw."""
    _write(ctx, time.time())
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not ctx.cancelled:
        time.sleep(0.05)
    return {"saw_cancel": ctx.cancelled}


@app.task(
    queue="control",
    timeout=1.0,
    max_attempts=2,
    retry=RetryPolicy(base=0.1, cap=0.2, jitter=0.0),
)
def stuck(ctx: pgidem.Context, stuck_attempts: int = 2, seconds: float = 4.0) -> dict[str, Any]:
    """Writes its ledger row, then (on its first ``stuck_attempts`` attempts) sleeps past its
    1 s timeout without looking at the lease: the worker must abandon it."""
    _write(ctx, time.time())
    if ctx.attempt <= stuck_attempts:
        time.sleep(seconds)
    return {"attempt": ctx.attempt}


@app.task(queue="ticks")
def tick(ctx: pgidem.Context) -> dict[str, Any]:
    """A periodic task: writes its ledger row."""
    _write(ctx, time.time())
    return {"key": ctx.idempotency_key}


@app.task(queue="emails")
def email(ctx: pgidem.Context, seconds: float = 0.3) -> None:
    """For per-queue concurrency: sleeps, then writes its row (with its start)."""
    started = time.time()
    time.sleep(seconds)
    _write(ctx, started)


@app.task(queue="payments")
def payment(ctx: pgidem.Context, seconds: float = 0.3) -> None:
    """For per-queue concurrency: sleeps, then writes its row (with its start)."""
    started = time.time()
    time.sleep(seconds)
    _write(ctx, started)


if os.environ.get("CONTROL_APP_CRON"):
    app.periodic("tick", os.environ["CONTROL_APP_CRON"])
