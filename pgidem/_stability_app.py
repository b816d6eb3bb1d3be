"""The workload of ``pgidem stability`` and ``pgidem demo``: one "payment" task.

The worker subprocesses of a stability run import it as ``pgidem._stability_app:app``. Its
handler charges the fake payment service through ``ctx.step`` (the step's key as
``Idempotency-Key``, ``ctx.fencing_token`` as ``Fencing-Token``), waits a little (the window in
which the run's faults land), then writes one row to a ledger table that deliberately has no
unique constraint, through ``ctx.conn``, so that it commits with the completion or not at all.

The command configures it through the environment of the worker processes:

* ``PGIDEM_STABILITY_PAY_URL``: the fake payment service's base URL;
* ``PGIDEM_STABILITY_WINDOW``: seconds to wait between the charge and the ledger write;
* ``PGIDEM_UNSAFE_LEDGER_AUTOCOMMIT=1``: **test-only, deliberately broken**: the ledger row is
  written on a separate autocommit connection, so it commits before (and whatever happens to)
  the completion. It exists to prove that the stability checker can fail; nothing outside this
  module reads it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import psycopg

from pgidem import _sql, fakepay
from pgidem.app import App, RetryPolicy
from pgidem.context import Context

#: The queue and task name of the workload.
QUEUE = "stability"
TASK = "payment"
#: The ledger table the handler writes, in the scratch database's public schema.
LEDGER = "pgidem_stability_ledger"
#: Headers the handler sends along so that the run can tell who made a charge.
HEADER_PID = "X-Pgidem-Worker-Pid"
HEADER_TASK_KEY = "X-Pgidem-Task-Key"
HEADER_TASK_ID = "X-Pgidem-Task-Id"
#: The test-only switch that breaks the ledger write on purpose (see the module docstring).
UNSAFE_ENV = "PGIDEM_UNSAFE_LEDGER_AUTOCOMMIT"
#: Faults kill a task's worker again and again: a high limit keeps "many faults" from being
#: mistaken for a lost task.
MAX_ATTEMPTS = 100

app = App()


def _step(ctx: Context, name: str, fn: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """Run ``fn`` as the recorded step ``name`` (``ctx.step``); without ``ctx.step`` (older
    pgidem), call it directly with a key derived the same way: stable across attempts."""
    step = getattr(ctx, "step", None)
    if step is not None:
        result: dict[str, Any] = step(name, fn)
        return result
    base = ctx.idempotency_key if ctx.idempotency_key is not None else f"task-{ctx.task_id}"
    return fn(f"{base}:{name}")


@app.task(
    name=TASK,
    queue=QUEUE,
    max_attempts=MAX_ATTEMPTS,
    # Retries come quickly so that the run drains fast.
    retry=RetryPolicy(base=0.05, cap=1.0, jitter=0.5),
)
def payment(ctx: Context, order: int, amount: int) -> dict[str, Any]:
    """Charge ``amount`` for ``order`` once, and write the ledger row once."""
    url = os.environ["PGIDEM_STABILITY_PAY_URL"]
    window = float(os.environ.get("PGIDEM_STABILITY_WINDOW", "0.02"))
    headers = {
        HEADER_PID: str(os.getpid()),
        HEADER_TASK_KEY: ctx.idempotency_key or "",
        HEADER_TASK_ID: str(ctx.task_id),
    }

    def call(key: str) -> dict[str, Any]:
        return fakepay.charge(
            url,
            key=key,
            amount=amount,
            fencing_token=ctx.fencing_token,
            extra={"order": order},
            headers=headers,
        )

    charge = _step(ctx, "charge", call)
    time.sleep(window)  # the window between the charge and the commit
    params = {
        "task_id": ctx.task_id,
        "key": ctx.idempotency_key,
        "fencing_token": ctx.fencing_token,
        "charge_id": charge["id"],
        "amount": amount,
    }
    if os.environ.get(UNSAFE_ENV) == "1":
        # Deliberately wrong (test-only): commits the ledger row on its own, before and
        # regardless of the fenced completion.
        with psycopg.connect(os.environ["PGIDEM_DSN"], autocommit=True) as side:
            side.execute(_sql.query("stability_ledger_insert"), params)
    else:
        ctx.conn.execute(_sql.query("stability_ledger_insert"), params)
    return {"charge_id": charge["id"], "order": order}
