"""Cancellation with a real `pgidem worker`: a cancelled queued task never runs; a task
cancelled from SQL while its handler runs sees it through ctx.cancelled, and its writes never
commit (its ledger row is absent, its attempt `cancelled`, no outcome)."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

import pgidem
from tests.apps.control_app import LEDGER_DDL
from tests.helpers import rows, scalar, wait_until

APP = "tests.apps.control_app:app"


@pytest.fixture
def ledger(conn: psycopg.Connection[Any]) -> None:
    conn.execute(LEDGER_DDL)


def test_cancelled_queued_task_never_runs(
    dsn: str, app: pgidem.App, ledger: None, spawn_worker: Any
) -> None:
    """A task scheduled 1.5 s ahead, cancelled before then, with a worker serving its queue:
    it stays `cancelled` with no attempt, while a task enqueued after it runs."""
    worker = spawn_worker(dsn, "--queue", "control", "--poll-interval", "0.2", app=APP)
    worker.wait_for_event("worker_started", 30)
    doomed = app.enqueue("write_then_wait", {"seconds": 0}, queue="control", delay=1.5)
    assert app.cancel(doomed.id) == "queued"
    time.sleep(2.5)  # past its run_at, several polls
    after = app.enqueue("write_then_wait", {"seconds": 0}, queue="control")
    assert after.result(timeout=30) == {"saw_cancel": False}
    assert doomed.state == "cancelled"
    assert scalar(dsn, "SELECT count(*) FROM pgidem.attempts WHERE task_id = %s", (doomed.id,)) == 0
    assert scalar(dsn, "SELECT count(*) FROM ledger WHERE task_id = %s", (doomed.id,)) == 0
    with pytest.raises(pgidem.TaskCancelled):
        doomed.result(timeout=1)


def test_running_task_cancelled_from_sql_never_commits_its_writes(
    dsn: str, app: pgidem.App, ledger: None, spawn_worker: Any
) -> None:
    """The handler writes its ledger row, then waits; `SELECT pgidem.cancel(id)` while it
    waits: the heartbeat tells the handler (ctx.cancelled; it returns early), the completion is
    refused, the write rolls back, the attempt ends `cancelled`, no outcome is recorded, and the
    worker logs task_cancelled and goes on with the next task."""
    worker = spawn_worker(dsn, "--queue", "control", "--lease", "2", app=APP)
    handle = app.enqueue("write_then_wait", {"seconds": 30}, queue="control")
    wait_until(
        lambda: (
            scalar(dsn, "SELECT state FROM pgidem.tasks WHERE id = %s", (handle.id,)) == "running"
        ),
        30,
        0.05,
        "the handler to start",
    )
    time.sleep(0.3)  # its INSERT is done (in its open transaction)
    assert scalar(dsn, "SELECT pgidem.cancel(%s)", (handle.id,)) == "running"
    event = worker.wait_for_event("task_cancelled", 15)
    assert event["task_id"] == handle.id
    assert scalar(dsn, "SELECT count(*) FROM ledger") == 0
    assert rows(dsn, "SELECT status FROM pgidem.attempts WHERE task_id = %s", (handle.id,)) == [
        ("cancelled",)
    ]
    assert scalar(dsn, "SELECT count(*) FROM pgidem.outcomes") == 0
    assert handle.state == "cancelled"
    # It returned early (told by the heartbeat), not after its 30 s.
    assert event["duration_ms"] < 15000
    # The worker carries on.
    nxt = app.enqueue("write_then_wait", {"seconds": 0}, queue="control")
    assert nxt.result(timeout=30) == {"saw_cancel": False}
    assert scalar(dsn, "SELECT count(*) FROM ledger") == 1
    # Retried, it runs again; cancelled again, again nothing of it commits.
    assert app.retry(handle.id) == "cancelled"
    wait_until(
        lambda: (
            scalar(dsn, "SELECT state FROM pgidem.tasks WHERE id = %s", (handle.id,)) == "running"
        ),
        30,
        0.05,
        "the retried task to run",
    )
    time.sleep(0.3)
    assert app.cancel(handle.id) == "running"
    wait_until(
        lambda: sum(1 for e in worker.events() if e.get("event") == "task_cancelled") == 2,
        15,
        0.1,
        "the second cancellation",
    )
    assert rows(dsn, "SELECT status FROM pgidem.attempts WHERE task_id = %s", (handle.id,)) == [
        ("cancelled",),
        ("cancelled",),
    ]
    assert scalar(dsn, "SELECT count(*) FROM ledger WHERE task_id = %s", (handle.id,)) == 0
