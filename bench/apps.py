"""The pgidem app the benchmarks run: a no-op task, a task that writes one row, a latency probe.

Workers load it with ``pgidem worker --app apps:app`` and ``PYTHONPATH`` including ``bench/``;
the DSN comes from ``PGIDEM_DSN`` (the scratch database ``bench/run.py`` created).

The tables the handlers write (``bench_rows``, ``bench_latency``) are created by
``bench/pgidem_drain.py`` in the scratch database, outside the pgidem schema.
"""

from __future__ import annotations

import time
from typing import Any

import pgidem

app = pgidem.App(check_schema=False)


@app.task(name="noop")
def noop(ctx: pgidem.Context, **_: Any) -> None:
    """Does nothing: what is left is the queue's own cost per task."""


@app.task(name="write_row")
def write_row(ctx: pgidem.Context, **_: Any) -> None:
    """Writes one row through the task's connection: it commits with the completion."""
    ctx.conn.execute("INSERT INTO bench_rows (task_id) VALUES (%s)", (ctx.task_id,))


@app.task(name="latency")
def latency(ctx: pgidem.Context, t: float, **_: Any) -> None:
    """Records how long after ``t`` (the enqueuer's clock, taken just before enqueue) it
    started, in milliseconds."""
    started = time.time()
    ctx.conn.execute("INSERT INTO bench_latency (ms) VALUES (%s)", ((started - float(t)) * 1000.0,))
