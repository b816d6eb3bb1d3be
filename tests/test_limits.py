"""Global limits, enforced by the claim query under the queue's limit-row lock, with real
`pgidem worker` processes: most running tasks per queue (also after a worker holding slots is
SIGKILLed), most running tasks per concurrency key, most starts per period; and the input they
refuse."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

import pgidem
from pgidem.cli import main
from tests.apps.control_app import LEDGER_DDL
from tests.helpers import rows, scalar, wait_until

APP = "tests.apps.control_app:app"


@pytest.fixture
def ledger(conn: psycopg.Connection[Any]) -> None:
    conn.execute(LEDGER_DDL)


class Sampler:
    """Samples, from its own connection every few milliseconds, the running tasks of a queue
    (in all and per concurrency key) in pgidem.tasks: what a limit must bound."""

    def __init__(self, dsn: str, queue: str) -> None:
        self.dsn = dsn
        self.queue = queue
        self.max_running = 0
        self.max_per_key = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as c:
            while not self._stop.is_set():
                # One statement, so both counts come from one snapshot.
                row = c.execute(
                    "SELECT (SELECT count(*) FROM pgidem.tasks"
                    "         WHERE state = 'running' AND queue = %(q)s),"
                    "       (SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n"
                    "          FROM pgidem.tasks WHERE state = 'running' AND queue = %(q)s"
                    "           AND concurrency_key IS NOT NULL GROUP BY concurrency_key) k)",
                    {"q": self.queue},
                ).fetchone()
                assert row is not None
                self.max_running = max(self.max_running, int(row[0]))
                self.max_per_key = max(self.max_per_key, int(row[1]))
                self.samples += 1
                self._stop.wait(0.005)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def sampler(dsn: str) -> Iterator[Any]:
    made: list[Sampler] = []

    def make(queue: str) -> Sampler:
        s = Sampler(dsn, queue)
        made.append(s)
        return s

    yield make
    for s in made:
        s._stop.set()


def test_global_limit_is_never_exceeded_and_recovers_after_sigkill(
    dsn: str, app: pgidem.App, ledger: None, spawn_worker: Any, sampler: Any
) -> None:
    """max_running=3 on a queue served by three workers of 4 slots each: sampled from
    pgidem.tasks every few ms, never more than 3 of its tasks are running, and 3 are reached.
    A worker holding slots is SIGKILLed: its tasks count until their leases expire, then the
    claim rescues them in place; the queue drains and every task succeeds exactly once. The
    limit is set while the workers already run (their cache of limited queues is stale at
    first: the claim must skip the queue rather than claim it unlocked)."""
    workers = [
        spawn_worker(dsn, "--queue", "limited", "--concurrency", "4", "--lease", "2", app=APP)
        for _ in range(3)
    ]
    for w in workers:
        w.wait_for_event("worker_started", 30)
    app.set_queue_limit("limited", max_running=3)
    handles = [app.enqueue("hold", {"seconds": 0.4}, queue="limited") for _ in range(24)]
    with sampler("limited") as s:
        # Kill the worker that holds running tasks, while it holds them.
        owner = wait_until(
            lambda: scalar(
                dsn,
                "SELECT w.pid FROM pgidem.tasks t JOIN pgidem.workers w ON w.id = t.lease_owner"
                " WHERE t.state = 'running' GROUP BY w.pid ORDER BY count(*) DESC LIMIT 1",
            ),
            30,
            0.02,
            "a worker holding running tasks",
        )
        victim = next(w for w in workers if w.pid == owner)
        victim.kill()
        wait_until(
            lambda: (
                scalar(dsn, "SELECT count(*) FROM pgidem.tasks WHERE state = 'succeeded'")
                == len(handles)
            ),
            90,
            0.2,
            "the limited queue to drain after the SIGKILL",
        )
    assert s.samples > 100
    assert s.max_running == 3, f"max running sampled: {s.max_running}"
    # The dead worker's claims were taken over by rescue, not left running.
    rescued = scalar(dsn, "SELECT count(*) FROM pgidem.attempts WHERE status = 'lease_expired'")
    assert rescued >= 1
    assert scalar(dsn, "SELECT count(*) FROM ledger") == len(handles)
    assert scalar(dsn, "SELECT count(DISTINCT task_id) FROM ledger") == len(handles)
    # Handlers, not just rows, never overlapped more than 3 (at each committed start).
    overlap = scalar(
        dsn,
        "SELECT max(n) FROM (SELECT (SELECT count(*) FROM ledger b"
        "  WHERE b.started <= a.started AND b.finished > a.started) AS n FROM ledger a) x",
    )
    assert overlap <= 3


def test_concurrency_key_allows_one_running_task_per_key(
    dsn: str, app: pgidem.App, ledger: None, spawn_worker: Any, sampler: Any
) -> None:
    """Tasks with concurrency keys (3 keys, 4 tasks each) and 2 workers of 4 slots: sampled,
    never two running tasks with one key; tasks of different keys do run at the same time;
    then max_per_key=2 lets two of a key run."""
    workers = [
        spawn_worker(dsn, "--queue", "limited", "--concurrency", "4", "--lease", "5", app=APP)
        for _ in range(2)
    ]
    for w in workers:
        w.wait_for_event("worker_started", 30)
    for i in range(12):
        app.enqueue("hold", {"seconds": 0.3}, queue="limited", concurrency_key=f"account-{i % 3}")
    with sampler("limited") as s:
        wait_until(
            lambda: scalar(dsn, "SELECT count(*) FROM ledger") == 12, 60, 0.2, "12 tasks done"
        )
    assert s.max_per_key == 1
    assert s.max_running >= 2, "tasks of different keys should run side by side"
    app.set_queue_limit("limited", max_per_key=2)
    for _ in range(8):
        app.enqueue("hold", {"seconds": 0.5}, queue="limited", concurrency_key="account-0")
    with sampler("limited") as s2:
        wait_until(
            lambda: scalar(dsn, "SELECT count(*) FROM ledger") == 20, 60, 0.2, "20 tasks done"
        )
    assert s2.max_per_key == 2
    assert scalar(dsn, "SELECT count(DISTINCT task_id) FROM ledger") == 20


def test_rate_limit_holds_over_every_window(
    dsn: str, app: pgidem.App, ledger: None, spawn_worker: Any
) -> None:
    """rate_limit 5 per second, 25 quick tasks, 2 workers: in every window of one second
    (measured on the attempts' claimed_at, the time the rate limit counts) at most 5 tasks
    started; so the 25 took at least 4 seconds; and all ran."""
    app.set_queue_limit("limited", rate_limit=5, rate_period=1.0)
    app.enqueue_many("quick", [{} for _ in range(25)], queue="limited")
    for _ in range(2):
        spawn_worker(dsn, "--queue", "limited", "--concurrency", "3", app=APP)
    wait_until(lambda: scalar(dsn, "SELECT count(*) FROM ledger") == 25, 90, 0.2, "25 quick tasks")
    claims = [r[0] for r in rows(dsn, "SELECT claimed_at FROM pgidem.attempts ORDER BY claimed_at")]
    assert len(claims) == 25
    window = timedelta(seconds=1)
    worst = max(sum(1 for c in claims[i:] if c < start + window) for i, start in enumerate(claims))
    assert worst <= 5, f"{worst} starts in one second"
    assert claims[-1] - claims[0] >= timedelta(seconds=4)
    status = {r["queue"]: r for r in app.queue_limits()}["limited"]
    assert status["rate_limit"] == 5 and status["rate_period_s"] == 1.0


def test_limits_show_in_views_status_and_show(
    dsn: str, app: pgidem.App, conn: psycopg.Connection[Any]
) -> None:
    """Limits appear in the pgidem.queue_stats view (also for a queue with no tasks), in
    `pgidem status`, `pgidem limit` and `pgidem show` (with the task's concurrency key)."""
    conn.execute("SELECT pgidem.set_queue_limit('payments', 4, 10, '2 seconds')")
    handle = app.enqueue("charge", {"n": 1}, queue="payments", concurrency_key="acct-7")
    row = conn.execute(
        "SELECT max_running, rate_limit, rate_period, max_per_key, started_in_period, available"
        "  FROM pgidem.queue_stats WHERE queue = 'payments'"
    ).fetchone()
    assert row == (4, 10, timedelta(seconds=2), 1, 0, 1)
    conn.execute("SELECT pgidem.set_queue_limit('idle', 0)")
    assert conn.execute(
        "SELECT available, max_running FROM pgidem.queue_stats WHERE queue = 'idle'"
    ).fetchone() == (0, 0)

    runner = CliRunner()
    out = runner.invoke(main, ["status", "--dsn", dsn])
    assert out.exit_code == 0, out.output
    assert "limits:" in out.output and "10/2s" in out.output
    out = runner.invoke(main, ["show", str(handle.id), "--dsn", dsn])
    assert out.exit_code == 0, out.output
    assert "acct-7" in out.output and "max_running 4, rate 10/2s" in out.output
    out = runner.invoke(main, ["limit", "payments", "--rate", "3/1m", "--dsn", dsn])
    assert out.exit_code == 0, out.output
    assert "3/60s" in out.output
    assert conn.execute(
        "SELECT max_running, rate_limit, rate_period FROM pgidem.queue_limits"
        " WHERE queue = 'payments'"
    ).fetchone() == (4, 3, timedelta(minutes=1))
    out = runner.invoke(main, ["limit", "payments", "--clear", "--dsn", dsn])
    assert out.exit_code == 0, out.output
    assert conn.execute(
        "SELECT max_running, rate_limit FROM pgidem.queue_limits WHERE queue = 'payments'"
    ).fetchone() == (None, None)


BAD_LIMITS = [
    ("SELECT pgidem.set_queue_limit('q', -1)", "invalid max_running -1"),
    ("SELECT pgidem.set_queue_limit('q', NULL, 0)", "invalid rate_limit 0"),
    ("SELECT pgidem.set_queue_limit('q', NULL, 5, '0 seconds')", "invalid rate_period"),
    ("SELECT pgidem.set_queue_limit('q', NULL, 5, '2 days')", "invalid rate_period"),
    ("SELECT pgidem.set_queue_limit('q', NULL, 5, NULL)", "invalid rate_period"),
    ("SELECT pgidem.set_queue_limit('q', 1, NULL, '1 s', 0)", "invalid max_per_key 0"),
    ("SELECT pgidem.set_queue_limit('q', 1, NULL, '1 s', NULL)", "invalid max_per_key"),
    ("SELECT pgidem.set_queue_limit('bad queue!', 1)", "invalid queue name"),
    ("SELECT pgidem.set_queue_limit(NULL, 1)", "invalid queue name"),
    ("SELECT pgidem.enqueue_keyed('t', concurrency_key => '')", "invalid concurrency key"),
    (
        "SELECT pgidem.enqueue_keyed('t', '{}', 'bad queue', concurrency_key => 'k')",
        "invalid queue",
    ),
]


def test_bad_limits_are_refused_from_sql(conn: psycopg.Connection[Any]) -> None:
    """Each bad value raises SQLSTATE PI002 with a message naming the field, and nothing is
    written (no limits row, no task)."""
    for sql, message in BAD_LIMITS:
        with pytest.raises(psycopg.Error) as info:
            conn.execute(sql)
        assert info.value.sqlstate == "PI002", sql
        assert message in str(info.value), (sql, str(info.value))
    assert conn.execute("SELECT count(*) FROM pgidem.queue_limits").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM pgidem.tasks").fetchone() == (0,)


def test_bad_limits_are_refused_from_python_and_cli(app: pgidem.App, dsn: str) -> None:
    """InvalidInput from the Python API, exit 1 with the message from `pgidem limit`, and a
    concurrency key reused under one idempotency key must be the same key."""
    with pytest.raises(pgidem.InvalidInput, match="invalid max_running -3"):
        app.set_queue_limit("q", max_running=-3)
    with pytest.raises(pgidem.InvalidInput, match="rate_period"):
        app.set_queue_limit("q", rate_limit=3, rate_period=0)
    with pytest.raises(pgidem.InvalidInput, match="max_per_key"):
        app.set_queue_limit("q", max_per_key=True)  # type: ignore[arg-type]
    out = CliRunner().invoke(main, ["limit", "q", "--max-running", "-2", "--dsn", dsn])
    assert out.exit_code == 1 and "invalid max_running -2" in out.output
    out = CliRunner().invoke(main, ["limit", "q", "--rate", "ten", "--dsn", dsn])
    assert out.exit_code == 2 and "R/PERIOD" in out.output
    assert app.queue_limits() == []
    first = app.enqueue("t", {}, idempotency_key="k1", concurrency_key="a")
    assert app.enqueue("t", {}, idempotency_key="k1", concurrency_key="a").id == first.id
    with pytest.raises(pgidem.IdempotencyKeyMismatch, match="another concurrency key"):
        app.enqueue("t", {}, idempotency_key="k1", concurrency_key="b")
    # pgidem.enqueue (no concurrency key given) does not compare keys: it replays the task.
    assert app.enqueue("t", {}, idempotency_key="k1").id == first.id


def test_claim_skips_a_limited_queue_it_did_not_lock(conn: psycopg.Connection[Any]) -> None:
    """The claim statement itself: a queue with a limits row is claimed from only when the
    transaction holds its lock (a worker whose cache missed the new limit claims nothing
    there), and then no more than its room; unlimited queues are claimed as before."""
    from pgidem import _store

    for i in range(5):
        conn.execute("SELECT pgidem.enqueue('t', jsonb_build_object('i', %s::int), 'lim')", (i,))
        conn.execute("SELECT pgidem.enqueue('t', jsonb_build_object('i', %s::int), 'free')", (i,))
    conn.execute("SELECT pgidem.set_queue_limit('lim', 2)")
    claim = dict(worker_id="w", queues=["lim", "free"], task_names=["t"], limit=10, lease_s=30)
    got = _store.task_claim(conn, **claim)  # type: ignore[arg-type]
    assert sorted(r["queue"] for r in got) == ["free"] * 5
    with conn.transaction():
        locked = _store.queue_limits_lock(conn, ["lim", "free"])
        assert locked == ["lim"]
        got = _store.task_claim(conn, locked=locked, **claim)  # type: ignore[arg-type]
    assert [r["queue"] for r in got] == ["lim", "lim"]
    with conn.transaction():
        got = _store.task_claim(conn, locked=_store.queue_limits_lock(conn, ["lim"]), **claim)  # type: ignore[arg-type]
    assert got == []


def test_concurrent_claimers_never_take_more_than_the_room(dsn: str, conn: Any) -> None:
    """Eight connections claim from a queue limited to 3 running, all at once, through the
    worker's path (READ COMMITTED transaction, limit-row lock, claim), five rounds each without
    finishing anything: exactly 3 tasks are claimed in all. Raising the limit to 5 lets exactly
    2 more be claimed."""
    from pgidem import _store

    conn.execute(
        "SELECT count(*) FROM pgidem.enqueue_many('t', array_fill('{}'::jsonb, ARRAY[40]), 'lim')"
    )
    conn.execute("SELECT pgidem.set_queue_limit('lim', 3)")
    barrier = threading.Barrier(8)
    claimed: list[int] = []
    lock = threading.Lock()

    def claimer() -> None:
        with psycopg.connect(dsn, autocommit=True) as c:
            barrier.wait()
            for _ in range(5):
                _store.claim_begin(c)
                got = _store.task_claim(
                    c,
                    worker_id=f"w{threading.get_ident()}",
                    queues=["lim"],
                    task_names=["t"],
                    limit=2,
                    lease_s=30,
                    locked=_store.queue_limits_lock(c, ["lim"]),
                )
                c.commit()
                with lock:
                    claimed.extend(r["id"] for r in got)

    def race() -> None:
        threads = [threading.Thread(target=claimer) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)

    race()
    assert len(claimed) == 3 and len(set(claimed)) == 3
    conn.execute("SELECT pgidem.set_queue_limit('lim', 5)")
    race()
    assert len(claimed) == 5 and len(set(claimed)) == 5
    assert conn.execute("SELECT count(*) FROM pgidem.tasks WHERE state = 'running'").fetchone() == (
        5,
    )


def test_a_claim_waits_for_the_claim_holding_the_queue_lock(dsn: str, conn: Any) -> None:
    """The race a count without the lock would lose, made deterministic: claim A takes 2 of a
    queue limited to 3 and has not committed; claim B then waits on the limit row instead of
    counting A's uncommitted claims as free room (its snapshot would show none of them
    running), and after A commits gets exactly the 1 left."""
    from pgidem import _store

    conn.execute(
        "SELECT count(*) FROM pgidem.enqueue_many('t', array_fill('{}'::jsonb, ARRAY[10]), 'lim')"
    )
    conn.execute("SELECT pgidem.set_queue_limit('lim', 3)")
    args: dict[str, Any] = dict(queues=["lim"], task_names=["t"], limit=3, lease_s=30)
    got_b: list[Any] = []
    with psycopg.connect(dsn, autocommit=True) as a, psycopg.connect(dsn, autocommit=True) as b:
        _store.claim_begin(a)
        got_a = _store.task_claim(
            a, worker_id="a", locked=_store.queue_limits_lock(a, ["lim"]), **{**args, "limit": 2}
        )
        assert len(got_a) == 2

        def claim_b() -> None:
            _store.claim_begin(b)
            got_b.extend(
                _store.task_claim(
                    b, worker_id="b", locked=_store.queue_limits_lock(b, ["lim"]), **args
                )
            )
            b.commit()

        thread = threading.Thread(target=claim_b)
        thread.start()
        thread.join(1.0)
        assert thread.is_alive(), "B should wait for A's lock on the limit row"
        a.commit()
        thread.join(30)
    assert len(got_b) == 1
    assert conn.execute("SELECT count(*) FROM pgidem.tasks WHERE state = 'running'").fetchone() == (
        3,
    )


def test_claim_without_limits_claims_what_the_whole_statement_claims(
    conn: psycopg.Connection[Any], app: pgidem.App
) -> None:
    """A worker that locked no limited queue runs task_claim_without_limits (the claim without
    its limits' half, which plans in a third of the time). On the same rows it claims what the
    whole statement claims with nothing locked: by priority, then run_at, queues mixed, an
    expired lease rescued, and a queue with limits (unlocked here) left alone."""
    from pgidem import _sql, _store

    assert "limited AS (" not in _sql.query("task_claim_without_limits")
    assert "limited AS (" in _sql.query("task_claim")
    markers = re.compile(r"^-- (<<limits|limits>>)$", re.MULTILINE)
    assert not markers.search(_sql.query("task_claim"))
    app.enqueue_many("noop", [{"n": i} for i in range(5)], queue="a")
    app.enqueue_many("noop", [{"n": i} for i in range(5)], queue="b", priority=3)
    app.enqueue_many("noop", [{"n": i} for i in range(3)], queue="capped")
    app.set_queue_limit("capped", max_running=10)
    conn.execute(
        "INSERT INTO pgidem.workers (id, hostname, pid, queues, concurrency)"
        " VALUES ('w', 'h', 1, '{a,b,capped}', 1)"
    )
    rescued = _store.task_claim(
        conn, worker_id="w", queues=["a"], task_names=["noop"], limit=1, lease_s=0.01
    )
    conn.execute("SELECT pg_sleep(0.05)")

    claims = {}
    for name in ("task_claim", "task_claim_without_limits"):
        with conn.transaction(force_rollback=True):
            got = _store._all(
                conn,
                name,
                {
                    "worker_id": "w",
                    "queues": ["a", "b", "capped"],
                    "task_names": ["noop"],
                    "limit": 8,
                    "lease_s": 60,
                    "locked": [],
                },
            )
            claims[name] = [(r["id"], r["queue"], r["attempts"]) for r in got]
    assert claims["task_claim"] == claims["task_claim_without_limits"]
    got = claims["task_claim"]
    assert len(got) == 8
    assert (rescued[0]["id"], "a", 2) in got
    assert [q for _, q, _ in got].count("b") == 5
    assert "capped" not in {q for _, q, _ in got}


def test_claim_without_rescue_leaves_expired_leases_and_claims_the_rest_alike(
    conn: psycopg.Connection[Any], app: pgidem.App
) -> None:
    """A worker's listener claims for an idle slot without the rescue (new work came;
    task_claim_without_rescue, or _without_limits_rescue with nothing locked): the expired
    lease that the whole statement rescues stays as it is, and the queued tasks claimed are
    those the whole statement claims besides it, limits honoured alike."""
    from pgidem import _sql, _store

    for name in ("task_claim_without_rescue", "task_claim_without_limits_rescue"):
        body = "\n".join(
            line for line in _sql.query(name).splitlines() if not line.lstrip().startswith("--")
        )
        assert "rescued" not in body and "expired_attempts" not in body
    assert "limited AS (" in _sql.query("task_claim_without_rescue")
    app.enqueue_many("noop", [{"n": i} for i in range(5)], queue="a")
    app.enqueue_many("noop", [{"n": i} for i in range(5)], queue="b", priority=3)
    app.enqueue_many("noop", [{"n": i} for i in range(3)], queue="capped")
    app.set_queue_limit("capped", max_running=2)
    conn.execute(
        "INSERT INTO pgidem.workers (id, hostname, pid, queues, concurrency)"
        " VALUES ('w', 'h', 1, '{a,b,capped}', 1)"
    )
    (expired,) = _store.task_claim(
        conn, worker_id="w", queues=["a"], task_names=["noop"], limit=1, lease_s=0.01
    )
    conn.execute("SELECT pg_sleep(0.05)")

    def claim(*, locked: bool, rescue: bool) -> list[tuple[int, str, int]]:
        with conn.transaction(force_rollback=True):
            if locked:
                _store.queue_limits_lock(conn, ["capped"])
            got = _store.task_claim(
                conn,
                worker_id="w",
                queues=["a", "b", "capped"],
                task_names=["noop"],
                limit=20,
                lease_s=60,
                locked=["capped"] if locked else [],
                rescue=rescue,
            )
            return [(r["id"], r["queue"], r["attempts"]) for r in got]

    for locked in (False, True):
        whole = claim(locked=locked, rescue=True)
        fresh = claim(locked=locked, rescue=False)
        assert (expired["id"], "a", 2) in whole
        assert expired["id"] not in {i for i, _, _ in fresh}
        assert fresh == [c for c in whole if c[0] != expired["id"]]
        assert [q for _, q, _ in fresh].count("capped") == (2 if locked else 0)
    row = conn.execute(
        "SELECT state, fencing_token FROM pgidem.tasks WHERE id = %s", (expired["id"],)
    ).fetchone()
    assert row == ("running", expired["fencing_token"])
