"""Handlers for the effects tests (steps, once keys, fences, replay), run by real workers:
`pgidem worker --app tests.apps.effects_app:app`.

The fake payment service's URL comes from ``PAYMENTS_URL``. Handlers write through ``ctx.conn``
into tables the tests create (``EFFECTS_DDL``); none has a unique constraint, so a write that
committed twice shows up as two rows. Behaviour is steered by the task's args.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pgidem
from pgidem import LeaseLost, NonRetryable, RetryPolicy, fakepay
from tests.apps import LONG_MESSAGE

EFFECTS_DDL = """
CREATE TABLE effects_ledger (
    task_id   bigint      NOT NULL,
    token     bigint      NOT NULL,
    attempt   integer     NOT NULL,
    charge_id text,
    at        timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE credits (
    task_id  bigint  NOT NULL,
    order_id integer NOT NULL,
    attempt  integer NOT NULL
);
CREATE SEQUENCE fence_log_seq;
CREATE TABLE fence_log (
    seq      bigint  NOT NULL,
    task_id  bigint  NOT NULL,
    token    bigint  NOT NULL,
    accepted boolean NOT NULL,
    seen     bigint  NOT NULL
);
"""

FAST = RetryPolicy(base=0.05, cap=0.2, jitter=0.0)

app = pgidem.App()


def _url() -> str:
    return os.environ["PAYMENTS_URL"]


def _charge(ctx: pgidem.Context, amount: int) -> dict[str, Any]:
    def call(key: str) -> dict[str, Any]:
        try:
            return fakepay.charge(
                _url(),
                key=key,
                amount=amount,
                fencing_token=ctx.fencing_token,
                headers={"X-Pgidem-Worker": ctx.worker_id},
            )
        except fakepay.PaymentError as exc:
            if exc.status == 409:  # the service saw a newer claim: this one is stale
                raise LeaseLost(str(exc)) from exc
            raise

    result: dict[str, Any] = ctx.step("charge", call)
    return result


@app.task(max_attempts=5, retry=FAST)
def pay(ctx: pgidem.Context, amount: int, fail_on_attempt: int = 0) -> dict[str, Any]:
    """Charge through a step, write a ledger row; raise after both on ``fail_on_attempt``."""
    charge = _charge(ctx, amount)
    ctx.conn.execute(
        "INSERT INTO effects_ledger (task_id, token, attempt, charge_id) VALUES (%s, %s, %s, %s)",
        (ctx.task_id, ctx.fencing_token, ctx.attempt, charge["id"]),
    )
    if ctx.attempt == fail_on_attempt:
        raise RuntimeError(f"failing attempt {ctx.attempt} after the step, on purpose")
    return {"charge_id": charge["id"], "attempt": ctx.attempt}


@app.task(max_attempts=5, retry=FAST)
def flaky_step(ctx: pgidem.Context, fail_attempts: int = 1) -> dict[str, Any]:
    """A step whose fn raises on the first ``fail_attempts`` attempts."""

    def call(key: str) -> dict[str, Any]:
        if ctx.attempt <= fail_attempts:
            raise ConnectionError(f"downstream unreachable on attempt {ctx.attempt}")
        return {"key": key, "attempt": ctx.attempt}

    result: dict[str, Any] = ctx.step("reserve", call)
    return result


@app.task(max_attempts=3, retry=FAST)
def hopeless_step(ctx: pgidem.Context) -> None:
    """A step whose fn fails for good."""

    def call(key: str) -> None:
        raise NonRetryable("the card was declined")

    ctx.step("charge", call)


@app.task(max_attempts=1)
def long_step_error(ctx: pgidem.Context) -> None:
    """A step whose fn raises a 10,000-character message."""

    def call(key: str) -> None:
        raise RuntimeError(LONG_MESSAGE)

    ctx.step("boom", call)


@app.task(max_attempts=3, retry=FAST)
def non_json_step(ctx: pgidem.Context) -> None:
    """A step whose fn returns something JSON cannot hold."""
    ctx.step("odd", lambda key: {"when": object()})


@app.task(max_attempts=3, retry=FAST)
def two_steps(ctx: pgidem.Context) -> dict[str, Any]:
    """Two steps: their keys differ, each is recorded once."""
    a = ctx.step("first", lambda key: {"key": key})
    b = ctx.step("second", lambda key: {"key": key})
    again = ctx.step("first", lambda key: {"key": "not called: recorded already"})
    return {"first": a["key"], "second": b["key"], "again": again["key"]}


@app.task(max_attempts=10, retry=FAST)
def once_credit(
    ctx: pgidem.Context, order: int, fail_first_win: bool = False, hold: float = 0.0
) -> dict[str, Any]:
    """Credit ``order`` once across every task that tries: only the task whose ``ctx.once``
    returns True writes. With ``fail_first_win`` a task that wins on its first attempt raises
    afterwards, so its key must roll back and another task get it."""
    first = ctx.once(f"credit:order-{order}")
    if first:
        ctx.conn.execute(
            "INSERT INTO credits (task_id, order_id, attempt) VALUES (%s, %s, %s)",
            (ctx.task_id, order, ctx.attempt),
        )
    if hold:
        time.sleep(hold)  # keep the key's row locked, so that others race on it
    if first and fail_first_win and ctx.attempt == 1:
        raise RuntimeError("won the once key on attempt 1; failing on purpose")
    return {"first": first, "attempt": ctx.attempt}


@app.task(max_attempts=3, retry=FAST)
def fenced_write(ctx: pgidem.Context, resource: str, sleep: float = 0.0) -> dict[str, Any]:
    """Pass ``resource``'s fence with this claim's token, logging what happened; ``sleep``
    before, so claims made earlier reach the fence later."""
    if sleep:
        time.sleep(sleep)
    accepted = ctx.fence(resource)
    # Taken while the fence row is held (when accepted): accepted calls are logged in the
    # order they passed the fence.
    ctx.conn.execute(
        "INSERT INTO fence_log (seq, task_id, token, accepted, seen) "
        "SELECT nextval('fence_log_seq'), %s, %s, %s, f.token "
        "FROM pgidem.fences f WHERE f.resource = %s",
        (ctx.task_id, ctx.fencing_token, accepted, resource),
    )
    return {"accepted": accepted, "token": ctx.fencing_token}


@app.task(max_attempts=3, retry=FAST)
def echo(ctx: pgidem.Context, value: Any = None) -> dict[str, Any]:
    """Returns its value (and writes a ledger row)."""
    ctx.conn.execute(
        "INSERT INTO effects_ledger (task_id, token, attempt) VALUES (%s, %s, %s)",
        (ctx.task_id, ctx.fencing_token, ctx.attempt),
    )
    return {"value": value}


@app.task(max_attempts=2, retry=FAST)
def doomed(ctx: pgidem.Context, reason: str = "no") -> None:
    """Always fails; goes dead after two attempts."""
    raise ValueError(f"doomed: {reason}")
