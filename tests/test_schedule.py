"""Periodic tasks and scheduling: one task per tick with three schedulers racing for a minute
(real worker processes), the missed-ticks policy, registration errors, scheduled and
prioritised tasks, and several queues per worker each with its own slots."""

from __future__ import annotations

import itertools
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

import pgidem
from pgidem import _scheduler, _sql, _store
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


def test_idle_worker_wakes_for_a_delayed_task_well_before_its_poll_interval(
    dsn: str, app: pgidem.App, ledger: None, spawn_worker: Any
) -> None:
    """A worker polling every 30 s, idle when a task delayed by 3 s is enqueued: the enqueue's
    NOTIFY makes it look up the next run_at, and it starts the task near its run_at, not at
    its next poll (the lateness is a small fraction of the poll interval)."""
    poll = 30.0
    worker = spawn_worker(dsn, "--queue", "limited", "--poll-interval", str(poll), app=APP)
    worker.wait_for_event("worker_started", 30)
    time.sleep(2)  # its slots have claimed nothing and sleep on their 30 s poll
    task = app.enqueue("quick", {}, queue="limited", delay=3)
    run_at = scalar(dsn, "SELECT run_at FROM pgidem.tasks WHERE id = %s", (task.id,))
    app.handle(task.id).result(timeout=2 * poll)
    started = scalar(dsn, "SELECT started FROM ledger WHERE task_id = %s", (task.id,))
    late = (started - run_at).total_seconds()
    assert late >= -0.05  # never before its run_at (the two clocks are the same host's)
    assert late < poll / 10, f"started {late:.2f} s after run_at with a {poll:.0f} s poll"


def test_next_run_at_is_one_index_probe_per_queue(conn: psycopg.Connection[Any]) -> None:
    """next_run_at reads tasks_scheduled with a LIMIT per queue: no sequential scan and no sort
    of the tasks, however many are queued (here 30,000 queued in three queues and 30,000 done),
    and it returns the earliest future run_at of the queues asked."""
    conn.execute(
        """
        INSERT INTO pgidem.tasks (task_name, queue, run_at)
        SELECT 't', 'q' || (i % 3), now() + make_interval(secs => 60 + (i * 7919) % 86400)
          FROM generate_series(1, 30000) AS i
        """
    )
    conn.execute(
        """
        INSERT INTO pgidem.tasks (task_name, queue, state, finished_at, run_at)
        SELECT 't', 'q' || (i % 3), 'succeeded', now(), now() - interval '1 hour'
          FROM generate_series(1, 30000) AS i
        """
    )
    conn.execute("ANALYZE pgidem.tasks")
    query = _sql.query("next_run_at")
    plan = "\n".join(
        r[0]
        for r in psycopg.ClientCursor(conn).execute(
            "EXPLAIN " + query, {"queues": ["q0", "q1", "nothing"]}
        )
    )
    assert "tasks_scheduled" in plan and "Limit" in plan, plan
    assert "Seq Scan" not in plan and "Sort" not in plan, plan
    expected = scalar_from(
        conn,
        "SELECT min(run_at) FROM pgidem.tasks WHERE state = 'queued' AND queue IN ('q0', 'q1')",
    )
    assert _store.next_run_at(conn, ["q0", "q1", "nothing"]) == expected
    assert _store.next_run_at(conn, ["nothing"]) is None


def scalar_from(conn: psycopg.Connection[Any], query: str) -> Any:
    row = conn.execute(query).fetchone()
    return None if row is None else row[0]


def test_schedules_show_in_pgidem_schedules_and_status(app: pgidem.App, dsn: str) -> None:
    """Each scheduler pass records its schedules in pgidem.schedules (task, cron, zone, queue,
    last tick enqueued and its task, next tick); a second scheduler behind the first never
    moves last_tick back; `pgidem status` lists them."""
    app.periodic("report", "*/10 * * * *", args={"kind": "daily"}, queue="reports")
    a = _scheduler.Scheduler(app, app.pool.connection)
    b = _scheduler.Scheduler(app, app.pool.connection)
    t0 = datetime(2026, 12, 4, 4, 33, 12, tzinfo=UTC)
    first = a.run_once(t0)
    task_id = first.enqueued[0][2]
    got = rows(
        dsn,
        "SELECT name, task_name, cron, timezone, queue, last_tick, last_task_id, next_tick"
        " FROM pgidem.schedules",
    )
    assert got == [
        (
            "report",
            "report",
            "*/10 * * * *",
            "UTC",
            "reports",
            datetime(2026, 12, 4, 4, 30, tzinfo=UTC),
            task_id,
            datetime(2026, 12, 4, 4, 40, tzinfo=UTC),
        )
    ]
    b.run_once(t0 - timedelta(minutes=20))  # a scheduler behind: 04:10 is older than 04:30
    assert rows(dsn, "SELECT last_tick, last_task_id FROM pgidem.schedules") == [
        (datetime(2026, 12, 4, 4, 30, tzinfo=UTC), task_id)
    ]
    out = CliRunner().invoke(main, ["status", "--dsn", dsn])
    assert out.exit_code == 0, out.output
    assert "schedules:" in out.output
    line = next(x for x in out.output.splitlines() if x.startswith("report "))
    assert "*/10 * * * *" in line and "reports" in line and str(task_id) in line
    assert "2026-12-04T04:30:00+00:00" in line and "2026-12-04T04:40:00+00:00" in line


def test_key_limit_and_concurrency_key_show_in_show_and_task_overview(
    app: pgidem.App, dsn: str
) -> None:
    """A queue with only max_per_key set shows its limits in `pgidem show`, and the task's
    concurrency key is a column of pgidem.task_overview."""
    app.set_queue_limit("accounts", max_per_key=2)
    handle = app.enqueue("sync", {}, queue="accounts", concurrency_key="account:42")
    out = CliRunner().invoke(main, ["show", str(handle.id), "--dsn", dsn])
    assert out.exit_code == 0, out.output
    assert "queue limits: max_per_key 2" in out.output
    assert "concurrency_key: account:42" in out.output
    assert scalar(
        dsn, "SELECT concurrency_key FROM pgidem.task_overview WHERE id = %s", (handle.id,)
    ) == ("account:42")


class _Recorder:
    """A logger that keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        def log(event: str, **fields: Any) -> None:
            self.lines.append((level, event, fields))

        return log


def test_scheduler_never_catches_up_a_tick_older_than_the_retention(
    dsn: str, server_dsn: str
) -> None:
    """With pgidem.key_retention at 1 hour, a catch_up_window of one day is clamped to one
    hour (logged as scheduler_catch_up_clamped): a daily tick 7 hours old is skipped, where a
    7-day retention enqueues it. A worker's prune_older_than clamps the same way, also on the
    running path (a pass that is late by an hour enqueues only the ticks within it)."""
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    t0 = datetime(2026, 12, 4, 10, 0, 5, tzinfo=UTC)  # the 03:00 tick is 7 h old

    def pass_at(retention: str, config: _scheduler.SchedulerConfig) -> tuple[Any, _Recorder]:
        with psycopg.connect(server_dsn, autocommit=True) as c:
            c.execute(f"ALTER DATABASE {dbname} SET pgidem.key_retention = '{retention}'")
        with pgidem.App(dsn) as app:  # new connections: the setting applies
            app.periodic("report", "0 3 * * *", name=f"daily-{retention.replace(' ', '')}")
            log = _Recorder()
            return _scheduler.Scheduler(app, app.pool.connection, config, log=log).run_once(t0), log

    short, log = pass_at("1 hour", _scheduler.SchedulerConfig())
    assert short.enqueued == [] and short.skipped == 1
    clamped = [
        f for lvl, e, f in log.lines if e == "scheduler_catch_up_clamped" and lvl == "warning"
    ]
    assert clamped and clamped[0]["effective_window_s"] == 3600.0
    assert clamped[0]["catch_up_window_s"] == 86400.0 and clamped[0]["key_retention_s"] == 3600.0
    week, log = pass_at("7 days", _scheduler.SchedulerConfig())
    assert [t for _, t, _ in week.enqueued] == [datetime(2026, 12, 4, 3, 0, tzinfo=UTC)]
    assert not [e for _, e, _ in log.lines if e == "scheduler_catch_up_clamped"]
    pruned, log = pass_at("2 days", _scheduler.SchedulerConfig(prune_older_than=3600))
    assert pruned.enqueued == [] and pruned.skipped == 1
    assert [
        f["effective_window_s"] for _, e, f in log.lines if e == "scheduler_catch_up_clamped"
    ] == [3600.0]
    # The running path: every 10 minutes, a pass 57 minutes late with a 30-minute retention.
    with pgidem.App(dsn) as app:
        app.periodic("report", "*/10 * * * *", name="often")
        s = _scheduler.Scheduler(
            app, app.pool.connection, _scheduler.SchedulerConfig(prune_older_than=1800)
        )
        assert [t.minute for _, t, _ in s.run_once(t0).enqueued] == [0]
        late = s.run_once(t0 + timedelta(minutes=57))  # 10:10 ... 10:50 came due
        assert [t.minute for _, t, _ in late.enqueued] == [30, 40, 50]
        assert late.skipped == 2


def test_worker_scheduler_settings_are_validated() -> None:
    """catch_up_window and max_catch_up are checked by WorkerConfig (and so by `pgidem worker`)
    with a message giving the range."""
    from pgidem.worker import WorkerConfig

    for bad, message in [
        ({"catch_up_window": -1}, "catch_up_window must be 0 to 366 days"),
        ({"catch_up_window": 367 * 86400}, "catch_up_window must be 0 to 366 days"),
        ({"catch_up_window": True}, "catch_up_window must be a number of seconds"),
        ({"max_catch_up": 0}, "max_catch_up must be a whole number from 1 to 100000"),
        ({"max_catch_up": 1.5}, "max_catch_up must be a whole number from 1 to 100000"),
    ]:
        with pytest.raises(pgidem.InvalidInput, match=message):
            WorkerConfig(**bad).validate()  # type: ignore[arg-type]
    config = WorkerConfig(catch_up_window=3600, max_catch_up=5, prune_older_than=600)
    config.validate()
    sched = config.scheduler_config()
    assert (sched.catch_up_window, sched.max_catch_up, sched.prune_older_than) == (3600, 5, 600)


def test_enqueue_run_at_from_the_cli(dsn: str) -> None:
    """`pgidem enqueue --run-at` with an ISO 8601 time and zone: the task's run_at is that
    instant (it is scheduled, not available)."""
    when = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0)
    text = when.astimezone(timezone(timedelta(hours=5, minutes=30))).isoformat()
    out = CliRunner().invoke(
        main, ["enqueue", "t", "--queue", "later", "--run-at", text, "--dsn", dsn]
    )
    assert out.exit_code == 0, out.output
    task_id = int(out.output.split()[-1])
    assert scalar(dsn, "SELECT run_at FROM pgidem.tasks WHERE id = %s", (task_id,)) == when
    assert scalar(dsn, "SELECT scheduled FROM pgidem.queue_stats WHERE queue = 'later'") == 1
