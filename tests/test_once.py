"""The dedupe ledger: ctx.once(key) and pgidem.once(key) say True exactly once per key among
committed transactions; a key taken by a transaction that rolls back goes to another."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgidem
from pgidem import _store
from tests.apps import effects_app
from tests.effects_support import rows, thread_worker, worker_processes
from tests.helpers import scalar, wait_until


def test_once_from_sql_is_true_only_the_first_time(conn: psycopg.Connection[Any]) -> None:
    """pgidem.once(key): true, then false for the same key; another key is true again."""
    first = conn.execute("SELECT pgidem.once('credit:order-1', 7, 70)").fetchone()
    again = conn.execute("SELECT pgidem.once('credit:order-1')").fetchone()
    other = conn.execute("SELECT pgidem.once('credit:order-2')").fetchone()
    assert (first, again, other) == ((True,), (False,), (True,))
    row = conn.execute(
        "SELECT task_id, fencing_token FROM pgidem.once_keys WHERE key = 'credit:order-1'"
    ).fetchone()
    assert row == (7, 70)


def test_once_in_a_rolled_back_transaction_leaves_the_key_free(
    conn: psycopg.Connection[Any],
) -> None:
    """The key commits or rolls back with the caller's transaction."""
    with pytest.raises(RuntimeError), conn.transaction():
        assert conn.execute("SELECT pgidem.once('k')").fetchone() == (True,)
        raise RuntimeError("roll back")
    assert conn.execute("SELECT pgidem.once('k')").fetchone() == (True,)


def test_once_rejects_a_bad_key_with_invalid_input(conn: psycopg.Connection[Any]) -> None:
    for key in ["", "x" * 256]:
        with pytest.raises(pgidem.InvalidInput, match="once key"):
            _store.once_claim(conn, key=key, task_id=None, token=None)
    assert conn.execute("SELECT count(*) FROM pgidem.once_keys").fetchone() == (0,)


def test_concurrent_once_waits_for_the_holder_and_gets_the_key_after_its_rollback(
    dsn: str,
) -> None:
    """A second caller of a key held by an open transaction waits; when the holder rolls back
    it gets True, and a third caller after that commit gets False."""
    answers: list[bool] = []
    with psycopg.connect(dsn) as holder:
        assert holder.execute("SELECT pgidem.once('shared')").fetchone() == (True,)

        def second() -> None:
            with psycopg.connect(dsn, autocommit=True) as c:
                answers.append(bool(c.execute("SELECT pgidem.once('shared')").fetchone()[0]))

        thread = threading.Thread(target=second)
        thread.start()
        wait_until(
            lambda: scalar(
                dsn,
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()",
            ),
            timeout=20,
            message="the second caller to wait on the key",
        )
        assert answers == []
        holder.rollback()
        thread.join(20)
    assert answers == [True]
    assert scalar(dsn, "SELECT pgidem.once('shared')") is False


def test_ctx_once_with_a_bad_key_fails_the_task(dsn: str) -> None:
    """ctx.once checks its key before touching the transaction: the task dies with the reason."""
    app = pgidem.App(dsn)
    handle = app.enqueue("once_credit", {"order": 1})
    bad = pgidem.App(dsn)

    @bad.task(name="once_credit")
    def once_credit(ctx: pgidem.Context, order: int) -> bool:
        return ctx.once("x" * 300)

    with thread_worker(bad, dsn), pytest.raises(pgidem.TaskFailed) as failed:
        handle.result(timeout=30)
    app.close()
    bad.close()
    assert "invalid once key" in failed.value.error["message"]


def test_ctx_once_across_worker_processes_lets_exactly_one_task_commit_the_effect(
    dsn: str, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """24 tasks in 3 worker processes race to credit order 42 through ctx.once. A task that
    wins on its first attempt then fails on purpose, so its key rolls back and the race goes
    on. In the end every task succeeded, exactly one credit committed, from a task past its
    first attempt, and exactly one result says it was first."""
    conn.execute(effects_app.EFFECTS_DDL)
    app = pgidem.App(dsn)
    ids = app.enqueue_many(
        "once_credit", [{"order": 42, "fail_first_win": True, "hold": 0.05}] * 24
    )
    args = ("--concurrency", "2", "--batch-size", "1", "--poll-interval", "0.1", "--lease", "10")
    with worker_processes(dsn, tmp_path, 3, *args):
        results = [app.handle(i).result(timeout=90) for i in ids]
    app.close()
    firsts = [r for r in results if r["first"]]
    assert len(firsts) == 1, results
    credits = rows(dsn, "SELECT task_id, order_id, attempt FROM credits")
    assert len(credits) == 1
    winner = credits[0]
    assert winner["attempt"] >= 2  # every win on an attempt 1 was rolled back
    assert rows(dsn, "SELECT key, task_id FROM pgidem.once_keys") == [
        {"key": "credit:order-42", "task_id": winner["task_id"]}
    ]
    rolled_back = scalar(
        dsn,
        "SELECT count(*) FROM pgidem.attempts WHERE error_message LIKE 'won the once key%'",
    )
    assert rolled_back >= 1
    workers = scalar(dsn, "SELECT count(DISTINCT worker_id) FROM pgidem.attempts")
    assert workers >= 2, "the race should span several worker processes"
