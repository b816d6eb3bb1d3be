"""Example: charge an order through a payment service over HTTP, once, whatever crashes.

Run a worker with ``pgidem worker --app examples.payments.app:app`` (see README.md here). The
payment service's URL comes from ``PAYMENTS_URL`` (default ``http://127.0.0.1:8099``, where
``python -m pgidem.fakepay`` listens).

What makes a repeat harmless:

* the charge is a recorded step (``ctx.step``): a retry after the step was recorded returns the
  recorded charge without calling the service again;
* the step's key goes to the service as the ``Idempotency-Key`` header: if the worker died
  between the service's answer and the record, the retry calls again with the same key and the
  service replays the first charge instead of making a second one;
* the claim's ``ctx.fencing_token`` goes along as the ``Fencing-Token`` header: a worker that
  stalled past its lease is refused by the service (409) once a newer claim has been there;
* the ledger row is written through ``ctx.conn``: it commits with the task's completion, or not
  at all.
"""

from __future__ import annotations

import os
from typing import Any

import psycopg

import pgidem
from pgidem import fakepay

#: The ledger of this example: one row per order charged. No unique constraint on purpose: a
#: charge recorded twice would show up as two rows.
LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS payments_ledger (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id      bigint      NOT NULL,
    amount        integer     NOT NULL,
    charge_id     text        NOT NULL,
    task_id       bigint      NOT NULL,
    fencing_token bigint      NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now()
)
"""

app = pgidem.App()


def payments_url() -> str:
    """Where the payment service is."""
    return os.environ.get("PAYMENTS_URL", "http://127.0.0.1:8099")


def create_ledger(conn: psycopg.Connection[Any]) -> None:
    """Create the example's ledger table (idempotent)."""
    conn.execute(LEDGER_DDL)


@app.task(queue="payments", max_attempts=5, retry=pgidem.RetryPolicy(base=0.2, cap=5.0))
def charge_order(ctx: pgidem.Context, order_id: int, amount: int) -> dict[str, Any]:
    """Charge ``amount`` for ``order_id`` and write the ledger row.

    Enqueue it with the order as the idempotency key, so that enqueueing twice is one task:
    ``charge_order.enqueue({"order_id": 1, "amount": 100}, idempotency_key="order-1")``.
    """

    def call_service(key: str) -> dict[str, Any]:
        try:
            return fakepay.charge(
                payments_url(),
                key=key,  # the step's key: the same on every attempt of this task
                amount=amount,
                fencing_token=ctx.fencing_token,
                extra={"order_id": order_id},
                # For tracing on the service's side (the tests use it to find the worker).
                headers={"X-Pgidem-Worker": ctx.worker_id},
            )
        except fakepay.PaymentError as exc:
            if exc.status == 409:
                # The service saw a newer claim of this task: this attempt is stale.
                raise pgidem.LeaseLost(str(exc)) from exc
            if exc.status is not None and 400 <= exc.status < 500:
                raise pgidem.NonRetryable(str(exc)) from exc
            raise  # unreachable or 5xx: the task retries, with the same key

    charge: dict[str, Any] = ctx.step("charge", call_service)
    ctx.conn.execute(
        "INSERT INTO payments_ledger (order_id, amount, charge_id, task_id, fencing_token) "
        "VALUES (%s, %s, %s, %s, %s)",
        (order_id, amount, charge["id"], ctx.task_id, ctx.fencing_token),
    )
    return {"charge_id": charge["id"], "order_id": order_id}


if __name__ == "__main__":
    # python -m examples.payments.app ORDER_ID AMOUNT: create the ledger, enqueue one charge.
    import sys

    order, amount = int(sys.argv[1]), int(sys.argv[2])
    with app.connect() as setup:
        create_ledger(setup)
    handle = charge_order.enqueue(
        {"order_id": order, "amount": amount}, idempotency_key=f"order-{order}"
    )
    print(f"task {handle.id}: {handle.result(timeout=60)}")
