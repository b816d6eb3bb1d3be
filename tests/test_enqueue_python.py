"""Enqueue from Python: App, @app.task defaults, handles and their results, the caller's
transaction, bulk enqueue in one round trip per batch, and one definition of the rules."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import pq

import pgidem
from pgidem import app as app_module


def count_tasks(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM pgidem.tasks").fetchone()
    assert row is not None
    return int(row[0])


class RoundTrips:
    """What one connection sent, read from libpq's protocol trace: `round_trips` counts the
    server's ReadyForQuery messages (one ends every round trip), `statements` the first line
    of each SQL text sent, `raw` the whole trace."""

    def __init__(self) -> None:
        self.round_trips = 0
        self.statements: list[str] = []
        self.raw = ""


@contextmanager
def traced(conn: psycopg.Connection[Any]) -> Iterator[RoundTrips]:
    seen = RoundTrips()
    with tempfile.TemporaryFile() as trace:
        conn.pgconn.trace(trace.fileno())
        conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            yield seen
        finally:
            conn.pgconn.untrace()
            trace.seek(0)
            seen.raw = trace.read().decode(errors="replace")
            for line in seen.raw.splitlines():
                parts = line.split("\t")
                if parts[0] == "B" and parts[2].startswith("ReadyForQuery"):
                    seen.round_trips += 1
                elif parts[0] == "F" and parts[2] in ("Parse", "Query"):
                    # Parse carries the statement's name before its text; Query only the text.
                    text = (
                        re.sub(r'^\s*("[^"]*" )?"', "", parts[3])
                        if parts[2] == "Parse"
                        else (parts[3].strip().strip('"'))
                    )
                    seen.statements.append(text)


def test_task_defaults_apply_and_enqueue_overrides_them(
    app: pgidem.App, conn: psycopg.Connection[Any]
) -> None:
    """@app.task's queue, max_attempts, priority and retry policy are the task's defaults;
    enqueue's own options override them."""
    policy = pgidem.RetryPolicy(base=2.0, cap=10.0, jitter=0.0)

    @app.task(queue="payments", max_attempts=3, priority=5, retry=policy)
    def charge(ctx: pgidem.Context, order: int) -> None:
        return None

    assert app.tasks["charge"] is charge and charge.retry is policy
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == [2.0, 4.0, 8.0, 10.0, 10.0]
    by_name = app.enqueue("charge", {"order": 1})
    by_task = charge.enqueue({"order": 2})
    overridden = app.enqueue(charge, {"order": 3}, queue="urgent", priority=-1, max_attempts=9)
    rows = conn.execute(
        "SELECT id, queue, priority, max_attempts FROM pgidem.tasks ORDER BY id"
    ).fetchall()
    assert rows == [
        (by_name.id, "payments", 5, 3),
        (by_task.id, "payments", 5, 3),
        (overridden.id, "urgent", -1, 9),
    ]
    plain = app.enqueue("unregistered", {})
    assert conn.execute(
        "SELECT queue, priority, max_attempts FROM pgidem.tasks WHERE id = %s", (plain.id,)
    ).fetchone() == ("default", 0, 5)


def test_handle_id_state_and_result_timeout(app: pgidem.App, conn: psycopg.Connection[Any]) -> None:
    """A handle has the task's id and state; result(timeout) raises ResultTimeout while there
    is no outcome, and returns the stored result once there is one."""
    handle = app.enqueue("charge", {"order": 1})
    assert isinstance(handle.id, int) and handle.state == "queued"
    with pytest.raises(pgidem.ResultTimeout, match=f"task {handle.id} had no outcome"):
        handle.result(timeout=0.2)
    conn.execute(
        "UPDATE pgidem.tasks SET state = 'succeeded', finished_at = now() WHERE id = %s",
        (handle.id,),
    )
    conn.execute(
        "INSERT INTO pgidem.outcomes (task_id, fencing_token, state, result) "
        "VALUES (%s, 1, 'succeeded', '{\"charge_id\": \"ch_1\"}')",
        (handle.id,),
    )
    assert handle.state == "succeeded"
    assert handle.result(timeout=5) == {"charge_id": "ch_1"}
    assert app.handle(handle.id).result(timeout=5) == {"charge_id": "ch_1"}


def test_result_of_a_dead_task_raises_task_failed(
    app: pgidem.App, conn: psycopg.Connection[Any]
) -> None:
    """A task made dead (with its final error as outcome) raises TaskFailed carrying that
    error; a dead task without an outcome row still raises it, with last_error."""
    handle = app.enqueue("charge", {"order": 1})
    conn.execute(
        "UPDATE pgidem.tasks SET state = 'dead', finished_at = now(), "
        "last_error = 'ValueError: card declined' WHERE id = %s",
        (handle.id,),
    )
    conn.execute(
        "INSERT INTO pgidem.outcomes (task_id, fencing_token, state, error) VALUES "
        '(%s, 1, \'dead\', \'{"class": "ValueError", "message": "card declined"}\')',
        (handle.id,),
    )
    with pytest.raises(pgidem.TaskFailed) as exc:
        handle.result(timeout=5)
    assert exc.value.task_id == handle.id
    assert exc.value.error == {"class": "ValueError", "message": "card declined"}
    assert "ValueError: card declined" in str(exc.value)

    bare = app.enqueue("charge", {"order": 2})
    conn.execute(
        "UPDATE pgidem.tasks SET state = 'dead', finished_at = now(), last_error = 'boom' "
        "WHERE id = %s",
        (bare.id,),
    )
    with pytest.raises(pgidem.TaskFailed, match="boom"):
        bare.result(timeout=5)


def test_result_of_a_cancelled_task_raises_task_cancelled(app: pgidem.App) -> None:
    """result() of a cancelled task raises TaskCancelled at once, whatever the timeout."""
    handle = app.enqueue("charge", {"order": 1})
    assert app.cancel(handle.id) == "queued"
    with pytest.raises(pgidem.TaskCancelled, match=f"task {handle.id} was cancelled"):
        handle.result(timeout=60)
    with pytest.raises(pgidem.TaskNotFound):
        app.handle(handle.id + 1000).refresh()


def test_enqueue_in_the_callers_transaction(
    app: pgidem.App, conn: psycopg.Connection[Any], dsn: str
) -> None:
    """enqueue(conn=...) writes in the caller's transaction: invisible to others until the
    commit, gone after a rollback, together with the caller's own writes."""
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    with psycopg.connect(dsn) as mine:
        mine.execute("INSERT INTO orders VALUES (1)")
        rolled_back = app.enqueue("charge", {"order": 1}, conn=mine)
        assert count_tasks(conn) == 0
        mine.rollback()
        assert count_tasks(conn) == 0
        mine.execute("INSERT INTO orders VALUES (1)")
        committed = app.enqueue("charge", {"order": 1}, idempotency_key="o1", conn=mine)
        ids = app.enqueue_many("charge", [{"n": 1}, {"n": 2}], conn=mine)
        assert count_tasks(conn) == 0
        mine.commit()
    assert conn.execute("SELECT id FROM pgidem.tasks ORDER BY id").fetchall() == [
        (committed.id,),
        (ids[0],),
        (ids[1],),
    ]
    assert rolled_back.id not in (committed.id, *ids)
    assert conn.execute("SELECT count(*) FROM orders").fetchone() == (1,)


def test_enqueue_many_20000_one_round_trip_per_batch(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    """20,000 tasks go in 4 batches of 5,000, each one statement and one round trip (plus
    BEGIN and COMMIT: all batches are one transaction); ids come back in the order of the args,
    and keys dedupe per row, across batches too."""
    app = pgidem.App(dsn, pool_size=1)
    try:
        app.enqueue("warm_up", {})  # opens the pool and checks the schema
        n, distinct = 20_000, 15_000
        args = [{"n": i % distinct} for i in range(n)]
        keys = [f"k{i % distinct}" for i in range(n)]
        # The pool has one connection: trace it while enqueue_many borrows it.
        pooled = app.pool.getconn()
        app.pool.putconn(pooled)
        with traced(pooled) as seen:
            ids = app.enqueue_many("charge", args, idempotency_keys=keys)
        with app.pool.connection() as again:
            assert again is pooled
        assert app_module.DEFAULT_BATCH_SIZE == 5000
        assert seen.round_trips == 4 + 2, seen.statements
        assert seen.statements[0] == "BEGIN" and seen.statements[-1] == "COMMIT"
        assert len(seen.statements) == 6
        assert seen.raw.count("FROM pgidem.enqueue_many(") == 4
        assert len(ids) == n
        assert ids[:distinct] == sorted(ids[:distinct]) and len(set(ids)) == distinct
        assert ids[distinct:] == ids[: n - distinct]
        assert count_tasks(conn) == distinct + 1  # and the warm-up task
        assert conn.execute(
            "SELECT count(*) FROM pgidem.tasks WHERE (args->>'n')::int = "
            "substr(idempotency_key, 2)::int"
        ).fetchone() == (distinct,)
    finally:
        app.close()


def test_enqueue_many_with_conn_is_one_round_trip_per_batch(
    app: pgidem.App, dsn: str, conn: psycopg.Connection[Any]
) -> None:
    """With conn= and keys, each batch is one round trip in the caller's open transaction."""
    app.enqueue("warm_up", {})
    with psycopg.connect(dsn) as mine:
        mine.execute("SELECT 1")  # the caller's transaction is open
        with traced(mine) as seen:
            ids = app.enqueue_many(
                "charge",
                [{"n": i} for i in range(2500)],
                idempotency_keys=[f"k{i}" for i in range(2500)],
                batch_size=1000,
                conn=mine,
            )
        mine.commit()
    assert seen.round_trips == 3, seen.statements
    assert seen.raw.count("FROM pgidem.enqueue_many(") == 3
    assert ids == sorted(ids) and len(ids) == 2500
    assert count_tasks(conn) == 1 + 2500


def test_enqueue_many_without_keys_is_one_copy_in_a_constant_number_of_round_trips(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    """Without keys, 20,000 tasks go in one binary COPY, whatever batch_size says: BEGIN, the
    checks and ids, the COPY, the args check, COMMIT. The ids come back in the order of the
    args, each on the row of its args."""
    app = pgidem.App(dsn, pool_size=1)
    try:
        app.enqueue("warm_up", {})  # opens the pool and checks the schema
        n = 20_000
        pooled = app.pool.getconn()
        app.pool.putconn(pooled)
        with traced(pooled) as seen:
            ids = app.enqueue_many("charge", [{"n": i} for i in range(n)], batch_size=1000)
        assert seen.round_trips == 5, seen.statements
        assert seen.statements[0] == "BEGIN" and seen.statements[-1] == "COMMIT"
        assert seen.raw.count("COPY pgidem.tasks") == 1
        assert "pgidem.enqueue_many(" not in seen.raw
        assert len(ids) == n and ids == sorted(ids) and len(set(ids)) == n
        stored = conn.execute(
            "SELECT id, (args->>'n')::int FROM pgidem.tasks WHERE task_name = 'charge' ORDER BY id"
        ).fetchall()
        assert stored == list(zip(ids, range(n), strict=True))
    finally:
        app.close()


#: Args whose jsonb differs from their compact JSON text (numbers printed in full, spaces
#: after ':' and ','), with text that is not ASCII and a literal backslash-u0000.
PARITY_ARGS: list[dict[str, Any]] = [
    {"n": 1},
    {},
    {"big": 1e300, "small": 1e-7, "text": "Zoë 東京 🚀 \\u0000", "nested": [1, {"a": None}]},
]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {
            "queue": "bulk",
            "priority": -7,
            "max_attempts": 9,
            "run_at": datetime.now(UTC) + timedelta(hours=2),
        },
    ],
    ids=["defaults", "options"],
)
def test_enqueue_many_without_keys_writes_the_rows_of_the_sql_function(
    app: pgidem.App, dsn: str, options: dict[str, Any]
) -> None:
    """Column for column, the tasks App.enqueue_many writes by COPY (no keys) equal those that
    pgidem.enqueue_many writes in SQL from the same inputs, in the same transaction (so that
    now() is the same): args, defaults (run_at, max_attempts, state, created_at...) and the
    concurrency key that the setting pgidem._concurrency_key gives an INSERT."""
    with psycopg.connect(dsn) as mine:
        mine.execute("SET LOCAL pgidem._concurrency_key = 'tenant-1'")
        copied = app.enqueue_many("charge", PARITY_ARGS, conn=mine, **options)
        by_sql = [
            row[0]
            for row in mine.execute(
                "SELECT id FROM pgidem.enqueue_many('charge', %s::text[]::jsonb[], %s, NULL, "
                "%s, %s, %s) ORDER BY ord",
                (
                    [app_module.dump_args(a) for a in PARITY_ARGS],
                    options.get("queue", "default"),
                    options.get("run_at"),
                    options.get("priority", 0),
                    options.get("max_attempts"),
                ),
            )
        ]
        written = dict(mine.execute("SELECT id, to_jsonb(t) - 'id' FROM pgidem.tasks t"))
        mine.commit()
    assert len(copied) == 3 and copied == sorted(copied) and max(copied) < min(by_sql)
    assert [written[i] for i in copied] == [written[i] for i in by_sql]
    assert [written[i]["args"] for i in copied[:2]] == PARITY_ARGS[:2]
    assert written[copied[2]]["args"]["big"] == 10**300  # jsonb's number, printed in full
    assert {written[i]["concurrency_key"] for i in copied} == {"tenant-1"}
    assert {(written[i]["queue"], written[i]["max_attempts"]) for i in copied} == {
        (options.get("queue", "default"), options.get("max_attempts", 5))
    }
    if not options:
        assert {written[i]["run_at"] for i in copied} == {written[copied[0]]["created_at"]}


def test_enqueue_many_without_keys_notifies_the_queue_at_commit(
    app: pgidem.App, dsn: str, conn: psycopg.Connection[Any]
) -> None:
    """The COPY path sends NOTIFY pgidem with the queue, as pgidem.enqueue_many does: once, at
    the caller's commit; a call that failed on a bad row (after its COPY) sends nothing."""
    conn.execute("LISTEN pgidem")
    with psycopg.connect(dsn) as mine:
        app.enqueue_many("charge", [{"n": 1}, {"n": 2}], queue="bulk", conn=mine)
        assert list(conn.notifies(timeout=0.3)) == []  # not before the commit
        mine.commit()
        mine.execute("SET pgidem.max_args_bytes = 20")
        with pytest.raises(pgidem.InvalidInput, match="row 2: invalid args"):
            app.enqueue_many("charge", [{"n": 1}, {"blob": "x" * 30}], queue="failed", conn=mine)
        mine.rollback()
    app.enqueue_many("charge", [{"n": 3}], queue="later")
    payloads = [(n.channel, n.payload) for n in conn.notifies(timeout=10, stop_after=2)]
    assert payloads == [("pgidem", "bulk"), ("pgidem", "later")]
    assert list(conn.notifies(timeout=0.3)) == []


def test_enqueue_many_without_keys_judges_only_its_own_rows(
    app: pgidem.App, dsn: str, conn: psycopg.Connection[Any]
) -> None:
    """After its COPY, the call checks args over its range of ids, where a concurrent enqueue
    may have committed tasks too (their ids drawn in between): those are not the call's to
    refuse, and the row it names is its own. Made here with a sequence stepping by 2 and tasks
    committed beforehand between the call's ids, with args over the limit the call runs under
    (its session's pgidem.max_args_bytes)."""
    conn.execute("ALTER TABLE pgidem.tasks ALTER COLUMN id SET INCREMENT BY 2")
    (last,) = conn.execute(
        "SELECT nextval(pg_get_serial_sequence('pgidem.tasks', 'id'))"
    ).fetchone() or (0,)
    # The first call will draw last+2, last+4, last+6; the second last+8, last+10.
    for other in (last + 3, last + 9):
        conn.execute(
            "INSERT INTO pgidem.tasks (id, task_name, args) VALUES (%s, 'other', %s)",
            (other, app_module.dump_args({"blob": "x" * 100})),
        )
    with psycopg.connect(dsn) as mine:
        mine.execute("SET pgidem.max_args_bytes = 50")
        ids = app.enqueue_many("charge", [{"n": 1}, {"n": 2}, {"n": 3}], conn=mine)
        assert ids == [last + 2, last + 4, last + 6]
        mine.commit()
        with pytest.raises(pgidem.InvalidInput, match=r"^row 2: invalid args: 112 bytes") as exc:
            app.enqueue_many("charge", [{"n": 4}, {"blob": "x" * 100}], conn=mine)
        assert exc.value.field == "args"
        mine.rollback()
    assert count_tasks(conn) == 2 + 3


def test_python_and_sql_give_the_same_mismatch_error(
    app: pgidem.App, conn: psycopg.Connection[Any]
) -> None:
    """A reused key with other args: the same message from SQL, App.enqueue and
    App.enqueue_many, because Python calls the SQL functions."""
    app.enqueue("charge", {"order": 1}, idempotency_key="order-1")
    with pytest.raises(psycopg.Error) as sql_error:
        conn.execute(
            "SELECT pgidem.enqueue('charge', '{\"order\": 2}', idempotency_key => 'order-1')"
        )
    with pytest.raises(pgidem.IdempotencyKeyMismatch) as py_error:
        app.enqueue("charge", {"order": 2}, idempotency_key="order-1")
    with pytest.raises(pgidem.IdempotencyKeyMismatch) as bulk_error:
        app.enqueue_many("charge", [{"order": 2}], idempotency_keys=["order-1"])
    primary = sql_error.value.diag.message_primary or ""
    assert str(py_error.value).startswith(primary + " (existing task ")
    assert str(bulk_error.value).startswith(primary + " (row 1: existing task ")
    assert py_error.value.field == "idempotency_key"
    assert py_error.value.__cause__ is not None
    assert py_error.value.__cause__.sqlstate == "PI001"  # type: ignore[attr-defined]
    assert count_tasks(conn) == 1


def test_a_rule_changed_in_sql_is_what_python_sees(
    app: pgidem.App, conn: psycopg.Connection[Any]
) -> None:
    """Change the args rule in the database only (pgidem._args_problem): App.enqueue and
    App.enqueue_many both apply the new rule. Python has no copy of it that could drift."""
    conn.execute(
        """
        CREATE OR REPLACE FUNCTION pgidem._args_problem(args jsonb) RETURNS text
        LANGUAGE sql STABLE AS $$
            SELECT CASE WHEN args ? 'forbidden' THEN 'invalid args: forbidden by the test rule'
                   END
        $$
        """
    )
    with pytest.raises(pgidem.InvalidInput, match="forbidden by the test rule") as one:
        app.enqueue("charge", {"forbidden": 1})
    assert one.value.field == "args"
    with pytest.raises(pgidem.InvalidInput, match="row 2: invalid args: forbidden") as many:
        app.enqueue_many("charge", [{"ok": 1}, {"forbidden": 1}])
    assert many.value.field == "args"
    assert count_tasks(conn) == 0


def test_max_args_bytes_setting_applies_to_python(
    app: pgidem.App, conn: psycopg.Connection[Any], dsn: str
) -> None:
    """ALTER DATABASE ... SET pgidem.max_args_bytes lowers the limit for Python enqueues."""
    dbname = conn.info.dbname
    conn.execute(f'ALTER DATABASE "{dbname}" SET pgidem.max_args_bytes = 20')
    with pgidem.App(dsn) as fresh:  # new connections pick up the database's setting
        fresh.enqueue("charge", {"a": 1})
        with pytest.raises(pgidem.InvalidInput, match="over the limit of 20 bytes") as exc:
            fresh.enqueue("charge", {"a": "x" * 20})
    assert exc.value.field == "args"
    assert count_tasks(conn) == 1


def test_run_at_and_delay(app: pgidem.App, conn: psycopg.Connection[Any]) -> None:
    """run_at (aware) and delay (seconds or timedelta) schedule the task; the row says when."""
    at = datetime.now(UTC) + timedelta(hours=2)
    scheduled = app.enqueue("charge", {}, run_at=at)
    delayed = app.enqueue("charge", {}, delay=3600)
    delta = app.enqueue("charge", {}, delay=timedelta(minutes=30))
    rows = dict(
        conn.execute(
            "SELECT id, extract(epoch FROM run_at - now())::int FROM pgidem.tasks"
        ).fetchall()
    )
    assert 7100 < rows[scheduled.id] <= 7200
    assert 3500 < rows[delayed.id] <= 3600
    assert 1700 < rows[delta.id] <= 1800
