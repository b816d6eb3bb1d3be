"""The handler's connection guard (pgidem/context.py) on a real PostgreSQL connection: ctx.conn
and every cursor it hands out (ctx.cursor(), ctx.conn.cursor(), the cursor conn.execute returns)
refuse statements that would end the task's transaction, while everything else a cursor does
works; ctx.conn.raw is the one deliberate way around it. The worker's side (a refused attempt
fails, a raw COMMIT is noticed) is tested with real workers in test_worker.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

import pgidem
from pgidem.context import Context, LeaseState, TaskConnection, TaskCursor

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
