"""Handlers for the worker tests, run by real `pgidem worker --app tests.apps.worker_app:app`.

Every handler that writes does so through ``ctx.conn`` into a ``ledger`` table the test creates
(no unique constraint, so a write that committed twice shows up as two rows). Behaviour is
steered by the task's args, so one app serves every test.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import pgidem
from pgidem import NonRetryable, Retry, RetryPolicy
from tests.apps import LONG_MESSAGE

LEDGER_DDL = """
CREATE TABLE ledger (
    task_id  bigint      NOT NULL,
    token    bigint      NOT NULL,
    attempt  integer     NOT NULL,
    worker   text        NOT NULL,
    n        integer,
    at       timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""

app = pgidem.App()
# A worker that only knows `write`: tasks of other names are not its to claim.
narrow_app = pgidem.App()


def _write(ctx: pgidem.Context, n: int | None) -> None:
    ctx.conn.execute(
        "INSERT INTO ledger (task_id, token, attempt, worker, n) VALUES (%s, %s, %s, %s, %s)",
        (ctx.task_id, ctx.fencing_token, ctx.attempt, ctx.worker_id, n),
    )


@app.task()
def write(ctx: pgidem.Context, n: int = 0, sleep: float = 0.0) -> dict[str, Any]:
    """One ledger row, then an optional sleep (so a test can kill or pause the worker)."""
    _write(ctx, n)
    if sleep:
        time.sleep(sleep)
    return {"n": n, "token": ctx.fencing_token}


@app.task(max_attempts=3, retry=RetryPolicy(base=0.1, cap=0.1, jitter=0.0))
def tally(ctx: pgidem.Context, n: int = 0, runs: str = "", fail: bool = False) -> dict[str, Any]:
    """Notes each call of the handler in the file ``runs`` (outside the database: a call whose
    writes were rolled back shows there), writes one ledger row, then fails on its first
    attempt if ``fail``."""
    with open(runs, "a") as out:
        out.write(f"{ctx.task_id} {ctx.fencing_token}\n")
    _write(ctx, n)
    if fail and ctx.attempt == 1:
        raise RuntimeError(f"tally {n} fails after writing")
    return {"n": n}


@narrow_app.task(name="write")
def narrow_write(ctx: pgidem.Context, n: int = 0, sleep: float = 0.0) -> dict[str, Any]:
    _write(ctx, n)
    return {"n": n}


@app.task()
def pure(ctx: pgidem.Context, n: int = 0, supersede: bool = False) -> dict[str, Any]:
    """Never touches ``ctx.conn`` (its completion is deferred to one statement per
    transaction). With ``supersede``, its first attempt plays another worker's rescue on a
    connection of its own: a new token and an expired lease, as if its claim were taken over."""
    if supersede and ctx.attempt == 1:
        import psycopg

        with psycopg.connect(os.environ["PGIDEM_DSN"], autocommit=True) as other:
            other.execute(
                "UPDATE pgidem.tasks SET fencing_token = nextval('pgidem.fencing_token_seq'),"
                " lease_expires_at = now() WHERE id = %s",
                (ctx.task_id,),
            )
    return {"n": n, "token": ctx.fencing_token}


@app.task(max_attempts=4, retry=RetryPolicy(base=0.3, cap=1.2, jitter=0.0))
def always_fails(ctx: pgidem.Context, n: int = 0) -> None:
    """Writes, then raises: the write never commits; retried with backoff 0.3, 0.6, 1.2 s."""
    _write(ctx, n)
    raise ValueError(f"attempt {ctx.attempt} of task {ctx.task_id} failed on purpose")


@app.task(max_attempts=5)
def retry_once(ctx: pgidem.Context, delay: float = 0.5) -> dict[str, Any]:
    """Asks for a retry after ``delay`` seconds on its first attempt, succeeds on the second."""
    _write(ctx, ctx.attempt)
    if ctx.attempt == 1:
        raise Retry(delay, reason="come back later")
    return {"attempt": ctx.attempt}


@app.task(max_attempts=5)
def non_retryable(ctx: pgidem.Context) -> None:
    """Fails for good on its first attempt."""
    _write(ctx, 0)
    raise NonRetryable("this request can never succeed")


@app.task(max_attempts=5)
def bad_result(ctx: pgidem.Context) -> Any:
    """Writes, then returns something that is not JSON."""
    _write(ctx, 0)
    return {"when": object()}


@app.task(max_attempts=3)
def ends_transaction(ctx: pgidem.Context, how: str) -> dict[str, Any]:
    """Writes, then tries to end the task's transaction itself, in the way ``how`` names; if
    pgidem stops it (an exception), the handler swallows that and returns normally."""
    _write(ctx, 0)
    try:
        if how == "commit":
            ctx.conn.commit()
        elif how == "rollback":
            ctx.conn.rollback()
        elif how == "close":
            ctx.conn.close()
        elif how == "execute_commit":
            ctx.conn.execute("COMMIT")
        elif how == "raw_commit":
            ctx.conn.raw.commit()
        elif how == "raw_rollback":
            ctx.conn.raw.rollback()
        elif how == "raw_close":
            ctx.conn.raw.close()
        elif how == "cursor_commit":
            ctx.cursor().execute("COMMIT")
        elif how == "conn_cursor_rollback":
            with ctx.conn.cursor() as cur:
                cur.execute("ROLLBACK")
        elif how == "cursor_executemany_commit":
            ctx.cursor().executemany("COMMIT", [()])
        elif how == "result_cursor_commit":
            # The cursor conn.execute returns is guarded too.
            ctx.conn.execute("SELECT 1").execute("COMMIT")
        elif how == "cursor_connection_commit":
            ctx.cursor().connection.commit()
        elif how == "raw_cursor_commit":
            # The documented way around the guard (ctx.conn.raw): not refused, only noticed.
            ctx.conn.raw.cursor().execute("COMMIT")
        elif how == "pgconn_commit":
            # libpq itself, under psycopg: only noticed, by the transaction's status.
            ctx.conn.pgconn.exec_(b"COMMIT")
        else:
            raise AssertionError(how)
    except pgidem.InvalidState:
        pass
    return {"how": how}


@app.task(max_attempts=1)
def long_error(ctx: pgidem.Context) -> None:
    """Raises a 10,000-character message, chained to another as long (a long traceback)."""
    raise ValueError(LONG_MESSAGE) from KeyError(LONG_MESSAGE)


@app.task(max_attempts=2)
def poison(ctx: pgidem.Context, how: str = "exit") -> None:
    """Kills the worker running it, every time."""
    _write(ctx, 0)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(3)


@app.task()
def session(ctx: pgidem.Context) -> dict[str, Any]:
    """Reports settings of the task's connection (the worker's session settings)."""
    row = ctx.conn.execute(
        "SELECT current_setting('jit'), current_setting('plan_cache_mode')"
    ).fetchone()
    assert row is not None
    return {"jit": row[0], "plan_cache_mode": row[1]}


@app.task(max_attempts=1)
def long_running(ctx: pgidem.Context, seconds: float) -> dict[str, Any]:
    """Runs for ``seconds``, checking its lease as it goes (the heartbeat must keep it)."""
    _write(ctx, 0)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ctx.check_lease()
        time.sleep(0.05)
    return {"lease_lost": ctx.lease_lost}


@app.task(max_attempts=2)
def exits(ctx: pgidem.Context) -> None:
    """Calls sys.exit() (SystemExit, a BaseException) in the worker's slot thread."""
    _write(ctx, 0)
    sys.exit(3)
