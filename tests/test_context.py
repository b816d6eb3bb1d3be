"""The handler's connection guard (pgidem/context.py) on a real PostgreSQL connection: ctx.conn
and every cursor it hands out (ctx.cursor(), ctx.conn.cursor(), the cursor conn.execute returns)
refuse statements that would end the task's transaction, while everything else a cursor does
works; ctx.conn.raw is the one deliberate way around it. The worker's side (a refused attempt
fails, a raw COMMIT is noticed) is tested with real workers in test_worker.py."""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

import pgidem
from pgidem.context import Context, LeaseState, TaskConnection, TaskCursor, let_go_of_rows

INTRANS = psycopg.pq.TransactionStatus.INTRANS
IDLE = psycopg.pq.TransactionStatus.IDLE


@pytest.fixture
def task_conn(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection inside an open transaction, as a worker hands it to a handler."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE written (n integer)")
        c.execute("BEGIN")
        yield c


def make_ctx(conn: psycopg.Connection[Any]) -> Context:
    return Context(
        task_id=1,
        task_name="t",
        queue="default",
        attempt=1,
        max_attempts=1,
        fencing_token=1,
        idempotency_key=None,
        args={},
        conn=conn,
        log=None,
        worker_id="w",
        lease=LeaseState(),
    )


def _with_block(ctx: Context) -> None:
    with ctx.cursor() as cur:
        cur.execute("COMMIT")


#: Ways to end the transaction through ctx.conn and its cursors; each must be refused.
REFUSED: dict[str, Callable[[Context], Any]] = {
    "cursor_execute": lambda ctx: ctx.cursor().execute("COMMIT"),
    "cursor_bytes": lambda ctx: ctx.cursor().execute(b"  rollback"),
    "conn_cursor_end": lambda ctx: ctx.conn.cursor().execute("END"),
    "cursor_abort": lambda ctx: ctx.cursor().execute("abort"),
    "cursor_prepare": lambda ctx: ctx.cursor().execute("PREPARE TRANSACTION 'x'"),
    "executemany": lambda ctx: ctx.cursor().executemany("COMMIT", [()]),
    "stream": lambda ctx: list(ctx.cursor().stream("COMMIT")),
    "result_cursor": lambda ctx: ctx.conn.execute("SELECT 1").execute("COMMIT"),
    "cursor_connection": lambda ctx: ctx.cursor().connection.commit(),
    "cursor_in_with": _with_block,
    "row_factory_cursor": lambda ctx: ctx.cursor(row_factory=dict_row).execute("ROLLBACK"),
}


@pytest.mark.parametrize("how", sorted(REFUSED))
def test_cursors_refuse_to_end_the_task_transaction(
    task_conn: psycopg.Connection[Any], dsn: str, how: str
) -> None:
    """A COMMIT/ROLLBACK/END through any cursor of ctx.conn raises InvalidState, marks the
    connection as misused (the worker fails such an attempt even if the handler goes on), and
    leaves the transaction open: the handler's write is not committed."""
    ctx = make_ctx(task_conn)
    ctx.conn.execute("INSERT INTO written VALUES (1)")
    with pytest.raises(pgidem.InvalidState, match="the handler may not"):
        REFUSED[how](ctx)
    assert ctx.conn.misused == ("commit" if how == "cursor_connection" else "end")
    assert task_conn.info.transaction_status == INTRANS
    with psycopg.connect(dsn, autocommit=True) as other:
        assert other.execute("SELECT count(*) FROM written").fetchone() == (0,)
    assert task_conn.execute("SELECT count(*) FROM written").fetchone() == (1,)


def test_cursors_otherwise_work_like_psycopg_cursors(task_conn: psycopg.Connection[Any]) -> None:
    """Writes, reads, row factories, iteration, executemany, savepoints and `with` all work
    through the guarded cursors, and nothing is flagged."""
    ctx = make_ctx(task_conn)
    cur = ctx.cursor()
    assert isinstance(cur, TaskCursor) and isinstance(cur.connection, TaskConnection)
    assert isinstance(cur.raw, psycopg.Cursor)
    cur.executemany(
        "INSERT INTO written VALUES (%s) RETURNING n", [(1,), (2,), (3,)], returning=True
    )
    assert [(type(c), c.fetchone()) for c in cur.results()] == [
        (TaskCursor, (1,)),
        (TaskCursor, (2,)),
        (TaskCursor, (3,)),
    ]
    assert cur.execute("SELECT n FROM written ORDER BY n").fetchall() == [(1,), (2,), (3,)]
    assert cur.rowcount == 3 and cur.description is not None
    assert [row for row in cur.execute("SELECT n FROM written ORDER BY n")] == [(1,), (2,), (3,)]
    assert cur.execute("SELECT n FROM written ORDER BY n").fetchmany(2) == [(1,), (2,)]
    assert cur.fetchone() == (3,)
    cur.execute("SAVEPOINT mine")
    cur.execute("DELETE FROM written")
    cur.execute("ROLLBACK TO SAVEPOINT mine")
    cur.execute("RELEASE SAVEPOINT mine")
    with pytest.raises(ZeroDivisionError), ctx.conn.transaction():  # a savepoint of its own
        cur.execute("DELETE FROM written")
        raise ZeroDivisionError
    with ctx.conn.cursor(row_factory=dict_row) as named:
        assert named.execute("SELECT count(*) AS n FROM written").fetchone() == {"n": 3}
    assert named.closed
    assert list(ctx.conn.cursor().stream("SELECT n FROM written ORDER BY n")) == [(1,), (2,), (3,)]
    assert ctx.conn.execute("SELECT 1").fetchone() == (1,)
    assert ctx.conn.misused == ""
    assert task_conn.info.transaction_status == INTRANS


def test_raw_connection_is_the_documented_way_around_the_guard(
    task_conn: psycopg.Connection[Any],
) -> None:
    """ctx.conn.raw is psycopg's own connection: its cursors are not guarded (a COMMIT there
    goes through; the worker notices afterwards that the transaction ended)."""
    ctx = make_ctx(task_conn)
    assert ctx.conn.raw is task_conn
    raw_cur = ctx.conn.raw.cursor()
    assert not isinstance(raw_cur, TaskCursor)
    raw_cur.execute("COMMIT")
    assert task_conn.info.transaction_status == IDLE
    assert ctx.conn.misused == ""


def _inner(cur: TaskCursor) -> weakref.ref[psycopg.Cursor[Any]]:
    """The psycopg cursor under ``cur``, weakly: the test must not keep it alive itself."""
    return weakref.ref(object.__getattribute__(cur, "_cur"))


def test_execute_uses_one_cursor_again_only_while_nothing_else_holds_it(
    task_conn: psycopg.Connection[Any],
) -> None:
    """ctx.conn.execute uses its last psycopg cursor again (it saves psycopg's per-cursor set-up)
    only when the handler let go of it: a kept cursor, a kept bound method, an iterator or an
    exception raised through it each keep their own results, and a later execute gets another
    cursor."""
    conn = TaskConnection(task_conn)
    first = _inner(conn.execute("INSERT INTO written VALUES (1)"))
    for n in range(2, 6):
        assert _inner(conn.execute("INSERT INTO written VALUES (%s)", (n,)))() is first()
    assert first() is not None

    kept = conn.execute("SELECT 10")
    assert _inner(conn.execute("SELECT 20"))() is not _inner(kept)()
    assert kept.fetchall() == [(10,)]

    fetch = conn.execute("SELECT 30").fetchone
    conn.execute("SELECT 40")
    assert fetch() == (30,)

    rows = iter(conn.execute("SELECT generate_series(1, 3)"))
    assert next(rows) == (1,)
    conn.execute("SELECT 50")
    assert list(rows) == [(2,), (3,)]

    spare = _inner(conn.execute("SELECT 60"))
    with pytest.raises(psycopg.errors.DivisionByZero) as raised, conn.transaction():
        conn.execute("SELECT 1 / 0")  # on the spare cursor
    assert spare() is not None  # the exception's traceback holds it
    assert _inner(conn.execute("SELECT 70"))() is not spare()
    assert conn.execute("SELECT 80").fetchone() == (80,)
    del raised
    assert conn.execute("SELECT count(*) FROM written").fetchone() == (5,)


def test_execute_takes_a_new_cursor_after_the_handler_reaches_one_s_settings(
    task_conn: psycopg.Connection[Any],
) -> None:
    """After the handler reaches what could change a cursor for later statements (the raw
    cursor or connection, the adapters, any setting, a close), execute() starts from a new
    cursor, and the connection's row and cursor factories apply as they do in psycopg."""
    conn = TaskConnection(task_conn)

    def next_inner() -> weakref.ref[psycopg.Cursor[Any]]:
        return _inner(conn.execute("SELECT 1 AS one"))

    spare = next_inner()
    assert next_inner()() is spare()
    assert conn.execute("SELECT 1").rowcount == 1  # reading a result's figures: still the same
    assert next_inner()() is spare() is not None

    reaches: list[Callable[[TaskCursor], Any]] = [
        lambda cur: cur.raw,
        lambda cur: cur.adapters,
        lambda cur: cur.row_factory,
        lambda cur: cur.close(),
    ]
    for reach in reaches:
        reach(conn.execute("SELECT 1"))
        fresh = next_inner()
        assert fresh() is not spare() and fresh() is not None
        spare = fresh
    for reach_conn in (lambda: conn.raw, lambda: conn.adapters):
        reach_conn()
        fresh = next_inner()
        assert fresh() is not spare() and fresh() is not None
        spare = fresh

    conn.row_factory = dict_row
    assert conn.execute("SELECT 1 AS one").fetchone() == {"one": 1}
    conn.cursor_factory = psycopg.ClientCursor
    assert type(_inner(conn.execute("SELECT %s", (2,)))()) is psycopg.ClientCursor
    assert conn.execute("SELECT %s AS two", (2,)).fetchone() == {"two": 2}


def test_rows_a_handler_read_are_let_go_of_at_the_end_of_its_task(
    task_conn: psycopg.Connection[Any],
) -> None:
    """The spare cursor is kept from task to task only if its last statement returned no rows:
    a handler's result is not kept alive after its task by the cursor used again."""
    conn = TaskConnection(task_conn)
    written = _inner(conn.execute("INSERT INTO written VALUES (1)"))
    let_go_of_rows(task_conn)
    assert _inner(conn.execute("SELECT generate_series(1, 1000)"))() is written()
    let_go_of_rows(task_conn)
    assert written() is None  # nothing else held it: gone with its rows
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_threads_of_one_handler_never_share_a_cursor(
    task_conn: psycopg.Connection[Any],
) -> None:
    """Threads of one handler running ctx.conn.execute at once (psycopg's connection takes them
    in turn) each read their own statement's rows: the spare cursor goes to one of them at a
    time."""
    conn = TaskConnection(task_conn)
    wrong: list[tuple[int, Any]] = []

    def run(base: int) -> None:
        for i in range(base, base + 300):
            row = conn.execute("SELECT %s::int", (i,)).fetchone()
            if row != (i,):
                wrong.append((i, row))

    threads = [threading.Thread(target=run, args=(n * 1000,)) for n in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between almost any two bytecodes
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert wrong == []


def test_statements_in_a_pipeline_each_keep_their_own_cursor(
    task_conn: psycopg.Connection[Any],
) -> None:
    """In pipeline mode psycopg holds each cursor until its results arrive: ctx.conn.execute
    takes no cursor the pipeline still holds, and a cursor the handler keeps from a pipeline is
    never used again after it."""
    conn = TaskConnection(task_conn)
    conn.execute("SELECT 0")  # a spare cursor exists
    with conn.pipeline():
        cursors = [conn.execute("SELECT %s::int", (i,)) for i in range(5)]
        last = conn.execute("SELECT 5")
    assert [c.fetchone() for c in cursors] == [(i,) for i in range(5)]
    after = conn.execute("SELECT 6")
    assert last.fetchone() == (5,)
    assert after.fetchone() == (6,)
