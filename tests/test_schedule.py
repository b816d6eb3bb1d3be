"""Periodic tasks and scheduling: one task per tick with three schedulers racing for a minute
(real worker processes), the missed-ticks policy, registration errors, scheduled and
prioritised tasks, and several queues per worker each with its own slots."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

import pgidem
from pgidem import _scheduler
from pgidem.cli import main
from tests.apps.control_app import LEDGER_DDL
from tests.helpers import rows, scalar, wait_until

APP = "tests.apps.control_app:app"


@pytest.fixture
def ledger(conn: psycopg.Connection[Any]) -> None:
    conn.execute(LEDGER_DDL)


def test_three_schedulers_enqueue_exactly_one_task_per_tick_for_a_minute(
    dsn: str, ledger: None, spawn_worker: Any
) -> None:
    """`tick` every second ("* * * * * *") with three worker processes, each running the
    scheduler, for about a minute: every tick from the first to the last has exactly one task
    (key cron:tick:<tick>), no tick is missing, every scheduler enqueued most ticks itself and
    got the same task id as the others for them, and every tick task ran once."""
    env = {"CONTROL_APP_CRON": "* * * * * *"}
    workers = [
        spawn_worker(dsn, "--queue", "ticks", "--concurrency", "2", app=APP, env=env)
        for _ in range(3)
    ]
    for w in workers:
        w.wait_for_event("worker_started", 30)
    wait_until(
        lambda: scalar(dsn, "SELECT count(*) FROM pgidem.tasks") >= 61,
        120,
        0.5,
        "61 ticks enqueued",
    )
    for w in workers:
        w.signal(15)
    for w in workers:
        assert w.wait(40) == 0
    tasks = rows(
        dsn,
        "SELECT run_at, idempotency_key, state FROM pgidem.tasks WHERE task_name = 'tick'"
        " ORDER BY run_at",
    )
    ticks = [r[0] for r in tasks]
    assert len(ticks) >= 61  # a minute of ticks, both ends included
    assert len(set(ticks)) == len(ticks), "two tasks for one tick"
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert all(g == timedelta(seconds=1) for g in gaps), f"missed ticks: {sorted(set(gaps))}"
    for run_at, key, _ in tasks:
        assert key == f"cron:tick:{run_at.astimezone(UTC):%Y-%m-%dT%H:%M:%S}Z"
    # Each scheduler enqueued (or was handed back) the task of most ticks: the key made it one.
    seen: dict[str, set[int]] = {}
    for w in workers:
        for e in w.events():
            if e.get("event") == "periodic_tick_enqueued":
                seen.setdefault(e["tick"], set()).add(e["task_id"])
    per_worker = [
        sum(1 for e in w.events() if e.get("event") == "periodic_tick_enqueued") for w in workers
    ]
    assert all(n >= len(ticks) * 0.8 for n in per_worker), per_worker
    assert all(len(ids) == 1 for ids in seen.values()), "schedulers disagree on a tick's task"
    # Every tick task ran exactly once (the last ones may still be queued at shutdown).
    assert scalar(dsn, "SELECT count(*) - count(DISTINCT task_id) FROM ledger") == 0
    assert scalar(dsn, "SELECT count(*) FROM ledger") >= len(ticks) - 5


def test_missed_ticks_policy(app: pgidem.App, dsn: str) -> None:
    """Two schedulers on one database: the first pass after a start enqueues only the latest
    due tick; a pass a few ticks late enqueues each missed tick once; a second scheduler
    gets the same task for each tick; a gap longer than max_catch_up counts as downtime; and a
    latest tick older than catch_up_window is not enqueued at all."""
    app.periodic("report", "*/10 * * * *", args={"kind": "daily"}, queue="reports")
    a = _scheduler.Scheduler(app, app.pool.connection)
    b = _scheduler.Scheduler(app, app.pool.connection, _scheduler.SchedulerConfig(max_catch_up=2))
    t0 = datetime(2026, 12, 4, 4, 33, 12, tzinfo=UTC)
    first = a.run_once(t0)
    assert [(n, t) for n, t, _ in first.enqueued] == [
        ("report", datetime(2026, 12, 4, 4, 30, tzinfo=UTC))
    ]
    assert a.run_once(t0 + timedelta(minutes=1)).enqueued == []
    late = a.run_once(t0 + timedelta(minutes=37))  # 04:40, 04:50, 05:00, 05:10 came due
    assert [t.minute for _, t, _ in late.enqueued] == [40, 50, 0, 10]
    again = b.run_once(t0)  # b starts: the latest tick, which a enqueued already
    assert [i for _, _, i in again.enqueued] == [first.enqueued[0][2]]
    gap = b.run_once(t0 + timedelta(minutes=37))  # 4 missed > max_catch_up 2: downtime
    assert [t.minute for _, t, _ in gap.enqueued] == [10]
    assert gap.enqueued[0][2] == late.enqueued[-1][2]
    stale = _scheduler.Scheduler(
        app, app.pool.connection, _scheduler.SchedulerConfig(catch_up_window=60)
    ).run_once(t0)
    assert stale.enqueued == [] and stale.skipped == 1
    got = rows(
        dsn,
        "SELECT idempotency_key, queue, args FROM pgidem.tasks ORDER BY run_at",
    )
    assert got[0] == ("cron:report:2026-12-04T04:30:00Z", "reports", {"kind": "daily"})
    assert len(got) == 5
    assert _scheduler.tick_key("x", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == (
        "cron:x:2026-01-02T03:04:05Z"
    )


def test_periodic_registration_errors(app: pgidem.App) -> None:
    """A bad expression, zone or args, and a schedule name used twice, are refused at
    registration; @app.task(cron=...) registers a schedule named after the task."""
    with pytest.raises(pgidem.InvalidInput, match="invalid cron expression '61 \\* \\* \\* \\*'"):
        app.periodic("t", "61 * * * *")
    with pytest.raises(pgidem.InvalidInput, match="unknown time zone"):
        app.periodic("t", "* * * * *", timezone="Nowhere/Land")
    with pytest.raises(pgidem.InvalidInput, match="invalid args"):
        app.periodic("t", "* * * * *", args={"x": float("nan")})

    @app.task(cron="@hourly")
    def hourly(ctx: pgidem.Context) -> None:
        pass

    assert app.periodic_tasks["hourly"].cron.minutes == frozenset({0})
    with pytest.raises(pgidem.InvalidInput, match="already registered"):
        app.periodic("hourly", "@daily")
    app.periodic("hourly", "@daily", name="hourly-daily")
    with pytest.raises(pgidem.InvalidInput, match="invalid cron"):

        @app.task(cron="not a cron")
        def never(ctx: pgidem.Context) -> None:
            pass

    assert "never" not in app.tasks


def test_per_queue_slots(dsn: str, app: pgidem.App, ledger: None, spawn_worker: Any) -> None:
    """`--queue payments=3 --queue emails=1`: at most 3 payment handlers and 1 email handler
    run at once in that worker (measured from the handlers' own start and end times), and both
    reach their concurrency; the worker registers 4 slots."""
    app.enqueue_many("payment", [{"seconds": 0.4}] * 12, queue="payments")
    app.enqueue_many("email", [{"seconds": 0.4}] * 6, queue="emails")
    worker = spawn_worker(
        dsn, "--queue", "payments=3", "--queue", "emails=1", "--batch-size", "1", app=APP
    )
    wait_until(lambda: scalar(dsn, "SELECT count(*) FROM ledger") == 18, 60, 0.2, "18 tasks done")
    overlap = dict(
        rows(
            dsn,
            "SELECT a.queue, max((SELECT count(*) FROM ledger b WHERE b.queue = a.queue"
            "   AND b.started <= a.started AND b.finished > a.started))"
            "  FROM ledger a GROUP BY a.queue",
        )
    )
    assert overlap == {"payments": 3, "emails": 1}
    assert scalar(dsn, "SELECT concurrency FROM pgidem.workers") == 4
    started = worker.wait_for_event("worker_started", 5)
    assert started["slot_groups"] == {"payments": 3, "emails": 1}


def test_bad_queue_options_are_refused(dsn: str) -> None:
    """`--queue Q=N` with a bad N, an empty name or a queue given twice exits 2 naming it."""
    runner = CliRunner()
    for args, message in [
        (["--queue", "a=0"], "from 1 to 1000"),
        (["--queue", "a=x"], "from 1 to 1000"),
        (["--queue", "=3"], "has no queue name"),
        (["--queue", "a", "--queue", "a=2"], "given twice"),
    ]:
        out = runner.invoke(main, ["worker", "--app", APP, *args, "--dsn", dsn])
        assert out.exit_code == 2, out.output
        assert message in out.output


def test_delayed_and_prioritised_tasks_from_the_cli(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    """`pgidem enqueue --delay` schedules (run_at in the future: the task is `scheduled` in
    queue_stats and no claim takes it); a delay beyond 366 days is refused; a claim takes the
    higher priority first."""
    runner = CliRunner()
    out = runner.invoke(main, ["enqueue", "t", "--delay", "3600", "--queue", "q", "--dsn", dsn])
    assert out.exit_code == 0, out.output
    delayed = int(out.output.split()[-1])
    out = runner.invoke(main, ["enqueue", "t", "--delay", str(367 * 86400), "--dsn", dsn])
    assert out.exit_code == 1 and "366 days" in out.output
    low = runner.invoke(main, ["enqueue", "t", "--queue", "q", "--priority", "-5", "--dsn", dsn])
    high = runner.invoke(main, ["enqueue", "t", "--queue", "q", "--priority", "7", "--dsn", dsn])
    assert conn.execute(
        "SELECT available, scheduled FROM pgidem.queue_stats WHERE queue = 'q'"
    ).fetchone() == (2, 1)
    from pgidem import _store

    got = _store.task_claim(
        conn, worker_id="w", queues=["q"], task_names=["t"], limit=1, lease_s=30
    )
    assert [r["id"] for r in got] == [int(high.output.split()[-1])]
    got = _store.task_claim(
        conn, worker_id="w", queues=["q"], task_names=["t"], limit=5, lease_s=30
    )
    assert [r["id"] for r in got] == [int(low.output.split()[-1])]
    assert delayed not in [r["id"] for r in got]
