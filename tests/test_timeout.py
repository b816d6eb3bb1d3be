"""Per-task timeouts with a real `pgidem worker`: a handler past its timeout is abandoned (its
attempt fails `abandoned` at once, its writes never commit, a new slot takes its place), and the
task retries or dies by its policy."""

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


def test_timeout_abandons_then_retries_then_dies_by_policy(
    dsn: str, app: pgidem.App, ledger: None, spawn_worker: Any
) -> None:
    """`stuck` has timeout=1 s and max_attempts=2. One task stuck on its first attempt only:
    abandoned once, then succeeds on attempt 2. One stuck on every attempt: abandoned twice and
    dead, its outcome a TimeoutError. No stuck attempt's write commits; the worker (1 slot)
    keeps running other tasks while its stuck threads sleep."""
    worker = spawn_worker(dsn, "--queue", "control", "--concurrency", "1", "--lease", "3", app=APP)
    # (This App has no handlers registered: max_attempts is given as the worker's app has it.)
    once = app.enqueue(
        "stuck", {"stuck_attempts": 1, "seconds": 4}, queue="control", max_attempts=2
    )
    always = app.enqueue(
        "stuck", {"stuck_attempts": 2, "seconds": 4}, queue="control", max_attempts=2
    )
    assert once.result(timeout=60) == {"attempt": 2}
    with pytest.raises(pgidem.TaskFailed) as info:
        always.result(timeout=60)
    assert "TimeoutError" in info.value.error["class"]
    assert "timeout of 1.0 s" in info.value.error["message"]
    assert [
        r[0]
        for r in rows(
            dsn,
            "SELECT status FROM pgidem.attempts WHERE task_id = %s ORDER BY fencing_token",
            (once.id,),
        )
    ] == ["abandoned", "succeeded"]
    assert [
        r[0]
        for r in rows(
            dsn,
            "SELECT status FROM pgidem.attempts WHERE task_id = %s ORDER BY fencing_token",
            (always.id,),
        )
    ] == ["abandoned", "abandoned"]
    assert scalar(dsn, "SELECT state FROM pgidem.tasks WHERE id = %s", (always.id,)) == "dead"
    # Only the one successful attempt's write is in the ledger, once the stuck threads woke up
    # and rolled back.
    wait_until(
        lambda: sum(1 for e in worker.events() if e.get("event") == "task_abandoned") == 3,
        20,
        0.1,
        "three abandonments logged",
    )
    seen_at = time.monotonic()
    # The worker still works (new slots replaced the stuck ones).
    follow = app.enqueue("stuck", {"stuck_attempts": 0}, queue="control", max_attempts=2)
    assert follow.result(timeout=30) == {"attempt": 1}
    assert worker.alive()
    # Once the last stuck handler woke up (4 s of sleep) and its slot rolled it back, only the
    # successful attempts' writes are in the ledger.
    time.sleep(max(0.0, 4.5 - (time.monotonic() - seen_at)))
    assert sorted(rows(dsn, "SELECT task_id, attempt FROM ledger")) == [
        (once.id, 2),
        (follow.id, 1),
    ]


def test_tasks_claimed_with_a_stuck_one_are_given_back(
    dsn: str, app: pgidem.App, ledger: None, spawn_worker: Any
) -> None:
    """Regression: tasks claimed in the same batch as a handler that never returns used to wait
    for it for ever (the heartbeat kept their leases alive). Now they are given back when it is
    abandoned and run on the slot that replaces it, while the stuck handler still sleeps."""
    ids = app.enqueue_many(
        "stuck",
        [{"stuck_attempts": 1, "seconds": 600}, {"stuck_attempts": 0}, {"stuck_attempts": 0}],
        queue="control",
        max_attempts=2,
    )
    # Enqueued before the worker starts, so its first claim takes all three in one batch.
    worker = spawn_worker(dsn, "--queue", "control", "--concurrency", "1", app=APP)
    wait_until(
        lambda: (
            scalar(
                dsn,
                "SELECT count(*) FROM ledger WHERE task_id = ANY(%s) AND attempt = 1",
                (ids[1:],),
            )
            == 2
        ),
        30,
        0.1,
        "the stuck task's batch-mates to run",
    )
    event = worker.wait_for_event("leases_released", 5)
    assert event["released"] == 2
    assert app.handle(ids[0]).result(timeout=30) == {"attempt": 2}


@pytest.mark.parametrize(
    "bad", [True, False, 0, -1, 0.0, float("nan"), float("inf"), 31622401, "5", [1]]
)
def test_bad_task_timeouts_are_refused_with_the_range(bad: Any) -> None:
    """`@app.task(timeout=...)` refuses bools, non-numbers and values outside (0, 366 days]
    with InvalidInput naming the range."""
    bad_app = pgidem.App("dbname=unused")
    with pytest.raises(pgidem.InvalidInput) as info:
        bad_app.task(timeout=bad)
    assert "greater than 0 and at most 31622400" in str(info.value)
    assert "(366 days)" in str(info.value) and "None for no limit" in str(info.value)


@pytest.mark.parametrize("good", [None, 0.001, 1, 30.5, 31622400])
def test_good_task_timeouts_are_accepted(good: Any) -> None:
    """The documented range's ends are accepted."""
    ok_app = pgidem.App("dbname=unused")
    registered = ok_app.task(name="bounded", timeout=good)(lambda ctx: None)
    assert registered.timeout == good
