"""Per-task timeouts with a real `pgidem worker`: a handler past its timeout is abandoned (its
attempt fails `abandoned` at once, its writes never commit, a new slot takes its place), and the
task retries or dies by its policy."""

from __future__ import annotations

import threading
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


def _count(worker: Any, event: str) -> int:
    return sum(1 for e in worker.events() if e.get("event") == event)


def test_worker_whose_every_slot_is_stuck_replaces_itself(
    dsn: str, app: pgidem.App, ledger: None, spawn_worker: Any
) -> None:
    """A `pgidem worker` with 2 slots whose handlers both hang (600 s) past their 1 s timeout:
    once both are stuck at once it stops gracefully (the stuck attempts were already failed by
    the heartbeat), deregisters, and re-executes itself in place (same pid, new worker id);
    the new process runs the retries and new tasks."""
    ids = app.enqueue_many(
        "stuck",
        [{"stuck_attempts": 1, "seconds": 600}, {"stuck_attempts": 1, "seconds": 600}],
        queue="control",
        max_attempts=2,
    )
    worker = spawn_worker(dsn, "--queue", "control", "--concurrency", "2", "--lease", "3", app=APP)
    first = worker.wait_for_event("worker_started", 30)
    event = worker.wait_for_event("worker_replacing_itself", 60)
    assert event["stuck_threads"] == 2 and event["slots"] == 2
    wait_until(lambda: _count(worker, "worker_started") == 2, 60, 0.1, "the re-executed worker")
    started = [e for e in worker.events() if e.get("event") == "worker_started"]
    assert started[1]["worker_id"] != first["worker_id"]
    # Same process (execv), still running.
    assert worker.alive()
    assert f":{worker.pid}:" in started[1]["worker_id"]
    # The old registration went before the exec; the new one is there.
    registered = [r[0] for r in rows(dsn, "SELECT id FROM pgidem.workers")]
    assert first["worker_id"] not in registered
    wait_until(
        lambda: (
            started[1]["worker_id"] in [r[0] for r in rows(dsn, "SELECT id FROM pgidem.workers")]
        ),
        10,
        0.1,
        "the new worker's row",
    )
    # Both stuck tasks retried (their first attempt failed `abandoned`) and succeeded.
    for task_id in ids:
        assert app.handle(task_id).result(timeout=60) == {"attempt": 2}
        statuses = rows(
            dsn,
            "SELECT status FROM pgidem.attempts WHERE task_id = %s ORDER BY fencing_token",
            (task_id,),
        )
        assert [s for (s,) in statuses] == ["abandoned", "succeeded"]
    follow = app.enqueue("stuck", {"stuck_attempts": 0}, queue="control", max_attempts=2)
    assert follow.result(timeout=30) == {"attempt": 1}
    assert _count(worker, "worker_replacing_itself") == 1


def test_worker_with_only_some_slots_stuck_does_not_replace_itself(
    dsn: str, app: pgidem.App, ledger: None, spawn_worker: Any
) -> None:
    """Regression: the worker used to count every abandonment in its life and re-execute itself
    after 2 x slots of them, though its handlers had since returned. With 3 slots, one handler
    stuck for good and five more abandoned one after another (each returns 4 s in, after
    being abandoned at its 1 s timeout), six abandonments happen but never more than two
    handlers are stuck at once: the worker keeps running, in the same process."""
    worker = spawn_worker(dsn, "--queue", "control", "--concurrency", "3", "--lease", "3", app=APP)
    worker.wait_for_event("worker_started", 30)
    forever = app.enqueue(
        "stuck", {"stuck_attempts": 1, "seconds": 600}, queue="control", max_attempts=2
    )
    assert forever.result(timeout=30) == {"attempt": 2}
    for n in range(1, 6):
        brief = app.enqueue(
            "stuck", {"stuck_attempts": 1, "seconds": 4}, queue="control", max_attempts=2
        )
        assert brief.result(timeout=30) == {"attempt": 2}
        wait_until(
            lambda n=n: _count(worker, "abandoned_handler_returned") == n,
            20,
            0.1,
            f"abandoned handler {n} to return",
        )
    assert _count(worker, "task_abandoned") == 6
    assert _count(worker, "worker_replacing_itself") == 0
    assert _count(worker, "worker_started") == 1
    assert worker.alive()
    follow = app.enqueue("stuck", {"stuck_attempts": 0}, queue="control", max_attempts=2)
    assert follow.result(timeout=30) == {"attempt": 1}


def test_embedded_worker_with_every_slot_stuck_returns_exit_stuck(dsn: str) -> None:
    """`Worker(...).run()` in a program of one's own does not re-execute the program (its
    command line may not start a worker): when its only slot is stuck past the timeout it stops
    and returns EXIT_STUCK (75), for the program to exit with."""
    from pgidem.worker import EXIT_STUCK, Worker

    release = threading.Event()
    embedded = pgidem.App(dsn)

    @embedded.task(queue="embedded", timeout=0.5, max_attempts=3)
    def hang(ctx: pgidem.Context) -> None:
        release.wait(60)

    task = embedded.enqueue("hang", {}, queue="embedded")
    worker = Worker(embedded, queues=["embedded"], concurrency=1, lease=3, grace_period=5)
    safety = threading.Timer(60, worker.stop)
    safety.start()
    try:
        began = time.monotonic()
        assert worker.run(install_signals=False) == EXIT_STUCK
        assert time.monotonic() - began < 60  # stopped by itself, not by the safety timer
    finally:
        safety.cancel()
        release.set()
        # The stuck thread returns, rolls back and hands its connection back to the closed
        # pool (which closes it): wait, so that nothing holds the test database open.
        for thread in threading.enumerate():
            if thread.name.startswith("pgidem-slot"):
                thread.join(10)
    assert scalar(dsn, "SELECT count(*) FROM pgidem.workers") == 0
    assert (
        scalar(dsn, "SELECT status FROM pgidem.attempts WHERE task_id = %s", (task.id,))
        == "abandoned"
    )
    embedded.close()


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
