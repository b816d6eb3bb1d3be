"""Enqueue from SQL: pgidem.enqueue and pgidem.enqueue_many, from psql, triggers and many
concurrent connections."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.helpers import ROOT, wait_until

ENQUEUE_ORDER_1 = (
    """select pgidem.enqueue('charge', '{"order": 1}', idempotency_key => 'order-1')"""
)
ENQUEUE_ORDER_2 = (
    """select pgidem.enqueue('charge', '{"order": 2}', idempotency_key => 'order-1')"""
)


def libpq_env(dsn: str) -> dict[str, str]:
    """The environment a psql user would have: PGHOST... pointing at the database."""
    params = conninfo_to_dict(dsn)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    for key, var in (("host", "PGHOST"), ("port", "PGPORT"), ("user", "PGUSER"),
                     ("dbname", "PGDATABASE"), ("password", "PGPASSWORD")):  # fmt: skip
        if params.get(key):
            env[var] = str(params[key])
    return env


def psql(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def count_tasks(conn: psycopg.Connection[Any], where: str = "true") -> int:
    row = conn.execute(f"SELECT count(*) FROM pgidem.tasks WHERE {where}").fetchone()
    assert row is not None
    return int(row[0])


def test_done_when_psql_example(make_database: Callable[[], str]) -> None:
    """The README's psql example: after `pgidem migrate`, the same enqueue twice returns one id;
    the same key with {"order": 2} fails with SQLSTATE PI001 and a message naming the key."""
    target = make_database()
    env = libpq_env(target)
    migrate = subprocess.run(
        [sys.executable, "-m", "pgidem", "migrate"],
        env={**env, "PGIDEM_DSN": target, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert migrate.returncode == 0, migrate.stderr
    first = psql(env, "-c", ENQUEUE_ORDER_1)
    second = psql(env, "-c", ENQUEUE_ORDER_1)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    # psql's aligned output: header, rule, the value, "(1 row)".
    first_id, second_id = first.stdout.splitlines()[2].strip(), second.stdout.splitlines()[2]
    assert first_id.isdigit() and second_id.strip() == first_id, (first.stdout, second.stdout)
    mismatch = psql(env, "-c", ENQUEUE_ORDER_2)
    assert mismatch.returncode == 1
    assert "'order-1'" in mismatch.stderr and "different args" in mismatch.stderr
    verbose = psql(env, "-v", "VERBOSITY=verbose", "-c", ENQUEUE_ORDER_2)
    assert verbose.returncode == 1 and "ERROR:  PI001:" in verbose.stderr, verbose.stderr
    with psycopg.connect(target, autocommit=True) as c:
        assert count_tasks(c) == 1
        assert c.execute("SELECT args FROM pgidem.tasks").fetchone() == ({"order": 1},)


def test_same_key_and_args_returns_the_same_task(conn: psycopg.Connection[Any]) -> None:
    """Equal args (as jsonb: key order and spacing do not matter) dedupe to one task."""
    a = conn.execute("""SELECT pgidem.enqueue('charge', '{"a": 1, "b": [1, 2]}', """
                     "idempotency_key => 'k')").fetchone()  # fmt: skip
    b = conn.execute("""SELECT pgidem.enqueue('charge', '{"b":[1,2],"a":1}', """
                     "idempotency_key => 'k')").fetchone()  # fmt: skip
    assert a == b
    assert count_tasks(conn) == 1


def test_mismatch_error_names_key_task_and_row(conn: psycopg.Connection[Any]) -> None:
    """PI001's message names the key and the task; its detail the existing task id."""
    (task_id,) = conn.execute(
        "SELECT pgidem.enqueue('charge', '{\"order\": 1}', idempotency_key => 'order-1')"
    ).fetchone() or (None,)
    with pytest.raises(psycopg.Error) as exc:
        conn.execute(
            "SELECT pgidem.enqueue('charge', '{\"order\": 2}', idempotency_key => 'order-1')"
        )
    assert exc.value.sqlstate == "PI001"
    assert exc.value.diag.message_primary == (
        "idempotency key 'order-1' of task 'charge' was already used with different args"
    )
    assert f"existing task {task_id}" in (exc.value.diag.message_detail or "")
    assert count_tasks(conn) == 1


def test_keys_are_scoped_by_task_name(conn: psycopg.Connection[Any]) -> None:
    """The same key under two task names makes two tasks, even with different args."""
    a = conn.execute("SELECT pgidem.enqueue('charge', '{\"x\": 1}', idempotency_key => 'k')")
    b = conn.execute("SELECT pgidem.enqueue('refund', '{\"x\": 2}', idempotency_key => 'k')")
    assert a.fetchone() != b.fetchone()
    assert count_tasks(conn) == 2


def test_tasks_without_key_never_dedupe(conn: psycopg.Connection[Any]) -> None:
    """No key, no dedupe: two identical enqueues make two tasks."""
    conn.execute("SELECT pgidem.enqueue('charge')")
    conn.execute("SELECT pgidem.enqueue('charge')")
    assert count_tasks(conn) == 2


def test_defaults_and_options_are_stored(conn: psycopg.Connection[Any]) -> None:
    """The signature is the design's; the documented defaults (args {}, queue default,
    priority 0, max_attempts 5, run_at now) and explicit options land in the row."""
    signature = conn.execute(
        "SELECT pg_get_function_arguments(p.oid), pg_get_function_result(p.oid) "
        "FROM pg_proc p WHERE p.oid = 'pgidem.enqueue'::regproc"
    ).fetchone()
    assert signature == (
        "task_name text, args jsonb DEFAULT '{}'::jsonb, queue text DEFAULT 'default'::text, "
        "idempotency_key text DEFAULT NULL::text, run_at timestamp with time zone DEFAULT "
        "NULL::timestamp with time zone, priority integer DEFAULT 0, max_attempts integer "
        "DEFAULT NULL::integer",
        "bigint",
    )
    (plain,) = conn.execute("SELECT pgidem.enqueue('charge')").fetchone() or (None,)
    row = conn.execute(
        "SELECT args, queue, priority, max_attempts, state, attempts, run_at <= now() "
        "FROM pgidem.tasks WHERE id = %s",
        (plain,),
    ).fetchone()
    assert row == ({}, "default", 0, 5, "queued", 0, True)
    (custom,) = conn.execute(
        "SELECT pgidem.enqueue('charge', '{\"a\": 1}', queue => 'payments', priority => 7, "
        "max_attempts => 3, run_at => now() + interval '1 hour')"
    ).fetchone() or (None,)
    row = conn.execute(
        "SELECT queue, priority, max_attempts, run_at > now() + interval '59 minutes' "
        "FROM pgidem.tasks WHERE id = %s",
        (custom,),
    ).fetchone()
    assert row == ("payments", 7, 3, True)


def test_trigger_enqueue_commits_and_rolls_back_with_the_caller(
    conn: psycopg.Connection[Any], dsn: str
) -> None:
    """A trigger calling pgidem.enqueue enqueues in the inserting transaction: a rollback
    leaves no task, a commit leaves exactly one."""
    conn.execute("CREATE TABLE orders (id int PRIMARY KEY, amount int)")
    conn.execute(
        """
        CREATE FUNCTION orders_enqueue() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pgidem.enqueue('ship', jsonb_build_object('order', NEW.id),
                                   idempotency_key => 'order-' || NEW.id);
            RETURN NEW;
        END $$
        """
    )
    conn.execute(
        "CREATE TRIGGER orders_enqueue AFTER INSERT ON orders "
        "FOR EACH ROW EXECUTE FUNCTION orders_enqueue()"
    )
    with psycopg.connect(dsn) as tx:
        tx.execute("INSERT INTO orders VALUES (1, 100)")
        assert count_tasks(tx) == 1  # visible inside the transaction
        assert count_tasks(conn) == 0  # and not outside it
        tx.rollback()
    assert count_tasks(conn) == 0
    with psycopg.connect(dsn) as tx:
        tx.execute("INSERT INTO orders VALUES (1, 100)")
        tx.commit()
    assert count_tasks(conn) == 1
    assert conn.execute("SELECT idempotency_key, args FROM pgidem.tasks").fetchone() == (
        "order-1",
        {"order": 1},
    )


def test_enqueue_notifies_the_queue_at_commit(conn: psycopg.Connection[Any], dsn: str) -> None:
    """An enqueue sends NOTIFY pgidem with the queue as payload, at commit; a task scheduled
    for later too (since 0004: an idle worker then recomputes when to wake up for it)."""
    conn.execute("LISTEN pgidem")
    with psycopg.connect(dsn, autocommit=True) as other:
        other.execute("SELECT pgidem.enqueue('charge', queue => 'later', "
                      "run_at => now() + interval '1 hour')")  # fmt: skip
        other.execute("SELECT pgidem.enqueue('charge', queue => 'payments')")
        other.execute("SELECT pgidem.enqueue_many('charge', ARRAY['{}'::jsonb], queue => 'bulk')")
    payloads = []
    for note in conn.notifies(timeout=10, stop_after=3):
        payloads.append((note.channel, note.payload))
    assert payloads == [("pgidem", "later"), ("pgidem", "payments"), ("pgidem", "bulk")]


def _enqueue_in_thread(
    dsn: str, start: threading.Barrier, results: list[Any], index: int, query: str
) -> None:
    try:
        with psycopg.connect(dsn, autocommit=True) as c:
            start.wait(timeout=30)
            row = c.execute(query).fetchone()
            results[index] = row[0] if row else None
    except Exception as exc:  # reported by the test
        results[index] = exc


CONCURRENT_QUERY = "SELECT pgidem.enqueue('charge', '{\"order\": 1}', idempotency_key => 'k')"


def test_concurrent_enqueue_of_one_key_makes_one_task(
    conn: psycopg.Connection[Any], dsn: str
) -> None:
    """Eight connections enqueue one key at the same moment: one task, and every caller gets
    its id."""
    results: list[Any] = [None] * 8
    barrier = threading.Barrier(8)
    threads = [
        threading.Thread(
            target=_enqueue_in_thread, args=(dsn, barrier, results, i, CONCURRENT_QUERY)
        )
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(isinstance(r, int) for r in results), results
    assert len(set(results)) == 1
    assert count_tasks(conn) == 1
    assert conn.execute("SELECT id FROM pgidem.tasks").fetchone() == (results[0],)


def test_rolled_back_enqueue_leaves_no_task_and_no_phantom_id(
    conn: psycopg.Connection[Any], dsn: str
) -> None:
    """One caller enqueues the key in an open transaction; seven others enqueue it and block
    on the unique index; the first rolls back. The others do not fail: they get the id of the
    row one of them inserted, which exists, and there is exactly one task (not the first's)."""
    holder = psycopg.connect(dsn)
    try:
        (held_id,) = holder.execute(CONCURRENT_QUERY).fetchone() or (None,)
        results: list[Any] = [None] * 7
        barrier = threading.Barrier(7)
        threads = [
            threading.Thread(
                target=_enqueue_in_thread, args=(dsn, barrier, results, i, CONCURRENT_QUERY)
            )
            for i in range(7)
        ]
        for t in threads:
            t.start()
        # All seven are waiting for the holder's transaction (the unique index entry it holds).
        holder_pid = holder.info.backend_pid
        wait_until(
            lambda: (
                conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND %s = ANY(pg_blocking_pids(pid))",
                    (holder_pid,),
                ).fetchone()
                == (7,)
            ),
            timeout=30,
            message="seven enqueues blocked on the holder",
        )
        holder.rollback()
    finally:
        holder.close()
    for t in threads:
        t.join(60)
    assert all(isinstance(r, int) for r in results), results
    assert len(set(results)) == 1
    (winner,) = set(results)
    assert winner != held_id
    assert conn.execute("SELECT id FROM pgidem.tasks").fetchall() == [(winner,)]


def test_enqueue_many_returns_ids_in_order(conn: psycopg.Connection[Any]) -> None:
    """enqueue_many returns (ord, id) per element, ids rising with position."""
    rows = conn.execute(
        "SELECT ord, id FROM pgidem.enqueue_many('charge', "
        """ARRAY['{"n": 1}', '{"n": 2}', '{"n": 3}']::jsonb[]) ORDER BY ord"""
    ).fetchall()
    assert [r[0] for r in rows] == [1, 2, 3]
    ids = [r[1] for r in rows]
    assert ids == sorted(ids) and len(set(ids)) == 3
    stored = conn.execute("SELECT id, args->>'n' FROM pgidem.tasks ORDER BY id").fetchall()
    assert stored == [(ids[0], "1"), (ids[1], "2"), (ids[2], "3")]


def test_enqueue_many_dedupes_per_row(conn: psycopg.Connection[Any]) -> None:
    """Per row: a key enqueued before returns the existing task; a key repeated within the
    call with equal args is one task; rows without a key are always new."""
    (existing,) = conn.execute(
        "SELECT pgidem.enqueue('charge', '{\"n\": 1}', idempotency_key => 'a')"
    ).fetchone() or (None,)
    rows = conn.execute(
        "SELECT ord, id FROM pgidem.enqueue_many('charge', "
        """ARRAY['{"n": 1}', '{"n": 2}', '{"n": 2}', '{}', '{}']::jsonb[], """
        "idempotency_keys => ARRAY['a', 'b', 'b', NULL, NULL]) ORDER BY ord"
    ).fetchall()
    ids = [r[1] for r in rows]
    assert ids[0] == existing
    assert ids[1] == ids[2] and ids[1] != existing
    assert len({ids[1], ids[3], ids[4], existing}) == 4
    assert count_tasks(conn) == 4


def test_enqueue_many_key_repeated_with_other_args_names_the_row(
    conn: psycopg.Connection[Any],
) -> None:
    """A key repeated within one call with different args raises PI001 naming the key and the
    row, and writes nothing."""
    with pytest.raises(psycopg.Error) as exc:
        conn.execute(
            "SELECT * FROM pgidem.enqueue_many('charge', "
            """ARRAY['{"n": 1}', '{"n": 2}', '{"n": 3}']::jsonb[], """
            "idempotency_keys => ARRAY['x', 'y', 'x'])"
        )
    assert exc.value.sqlstate == "PI001"
    assert "'x'" in (exc.value.diag.message_primary or "")
    assert (exc.value.diag.message_detail or "").startswith("row 3:")
    assert count_tasks(conn) == 0


def test_enqueue_many_mismatch_with_an_existing_task_names_the_row(
    conn: psycopg.Connection[Any],
) -> None:
    """A row whose key exists with other args raises PI001 naming that row; nothing of the
    batch is written."""
    conn.execute("SELECT pgidem.enqueue('charge', '{\"n\": 1}', idempotency_key => 'old')")
    with pytest.raises(psycopg.Error) as exc:
        conn.execute(
            "SELECT * FROM pgidem.enqueue_many('charge', "
            """ARRAY['{"n": 5}', '{"n": 2}']::jsonb[], idempotency_keys => ARRAY['new', 'old'])"""
        )
    assert exc.value.sqlstate == "PI001"
    assert "'old'" in (exc.value.diag.message_primary or "")
    assert (exc.value.diag.message_detail or "").startswith("row 2:")
    assert count_tasks(conn) == 1


def test_enqueue_many_concurrent_overlapping_batches(
    conn: psycopg.Connection[Any], dsn: str
) -> None:
    """Four connections bulk-enqueue the same 200 keys, each in its own order, at once: no
    deadlock, no error, one task per key, and every caller gets the same id for a key."""
    keys = [f"k{i}" for i in range(200)]
    orders = [keys, keys[::-1], keys[100:] + keys[:100], keys[::2] + keys[1::2]]
    results: list[Any] = [None] * 4
    barrier = threading.Barrier(4)

    def run(i: int) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as c:
                barrier.wait(timeout=30)
                rows = c.execute(
                    "SELECT u.k, e.id FROM pgidem.enqueue_many('charge', "
                    "array_fill('{}'::jsonb, ARRAY[cardinality(%(keys)s::text[])]), "
                    "idempotency_keys => %(keys)s::text[]) e "
                    "JOIN unnest(%(keys)s::text[]) WITH ORDINALITY u(k, i) ON u.i = e.ord",
                    {"keys": orders[i]},
                ).fetchall()
                results[i] = dict(rows)
        except Exception as exc:  # reported by the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(isinstance(r, dict) for r in results), results
    assert all(r == results[0] for r in results)
    assert count_tasks(conn) == 200


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_enqueue_many_waits_for_a_concurrent_batch(
    conn: psycopg.Connection[Any], dsn: str, outcome: str
) -> None:
    """A bulk enqueue blocked on keys held by another open transaction gets, once that one
    commits, the other's ids (after its rollback, ids of its own rows), never a phantom id."""
    keys_sql = "ARRAY['a', 'b', 'c']"
    holder = psycopg.connect(dsn)
    results: list[Any] = [None]
    try:
        held = dict(
            holder.execute(
                "SELECT ord, id FROM pgidem.enqueue_many('charge', "
                f"array_fill('{{}}'::jsonb, ARRAY[3]), idempotency_keys => {keys_sql})"
            ).fetchall()
        )

        def other() -> None:
            try:
                with psycopg.connect(dsn, autocommit=True) as c:
                    rows = c.execute(
                        "SELECT ord, id FROM pgidem.enqueue_many('charge', "
                        "array_fill('{}'::jsonb, ARRAY[4]), "
                        "idempotency_keys => ARRAY['c', 'new', 'a', 'b'])"
                    ).fetchall()
                    results[0] = dict(rows)
            except Exception as exc:  # reported by the test
                results[0] = exc

        thread = threading.Thread(target=other)
        thread.start()
        wait_until(
            lambda: (
                conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND %s = ANY(pg_blocking_pids(pid))",
                    (holder.info.backend_pid,),
                ).fetchone()
                == (1,)
            ),
            timeout=30,
            message="the second batch blocked on the first",
        )
        holder.commit() if outcome == "commit" else holder.rollback()
    finally:
        holder.close()
    thread.join(60)
    got = results[0]
    assert isinstance(got, dict), got
    stored = dict(conn.execute("SELECT idempotency_key, id FROM pgidem.tasks").fetchall())
    assert set(stored) == {"a", "b", "c", "new"}
    assert got == {1: stored["c"], 2: stored["new"], 3: stored["a"], 4: stored["b"]}
    if outcome == "commit":
        assert (stored["a"], stored["b"], stored["c"]) == (held[1], held[2], held[3])
    else:
        assert not {stored["a"], stored["b"], stored["c"]} & set(held.values())


def test_repeatable_read_caller_gets_a_serialization_failure_not_a_hang(
    conn: psycopg.Connection[Any], dsn: str
) -> None:
    """A REPEATABLE READ transaction whose snapshot predates a concurrent enqueue of the same
    key cannot see that task: it gets SQLSTATE 40001 (retry the transaction), from
    pgidem.enqueue and pgidem.enqueue_many alike, instead of a duplicate or an endless loop."""
    for call in (
        "SELECT pgidem.enqueue('charge', '{}', idempotency_key => %(key)s)",
        "SELECT * FROM pgidem.enqueue_many('charge', ARRAY['{}'::jsonb], "
        "idempotency_keys => ARRAY[%(key)s])",
    ):
        key = f"rr-{len(call)}"
        with psycopg.connect(dsn) as rr:
            rr.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            rr.execute("SELECT 1")  # the snapshot is taken here
            conn.execute(call, {"key": key})
            rr.execute("SET LOCAL statement_timeout = '20s'")
            with pytest.raises(psycopg.errors.SerializationFailure):
                rr.execute(call, {"key": key})
    assert count_tasks(conn) == 2
