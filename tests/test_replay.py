"""Outcome replay: enqueueing the key of a finished task returns that task, runs nothing again,
and its handle replays the stored outcome (or final error); pgidem.outcome_of and App.find
read the same from SQL and Python."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

import pgidem
from tests.apps import effects_app
from tests.effects_support import rows, thread_worker
from tests.helpers import scalar


@pytest.fixture
def ledger(conn: psycopg.Connection[Any]) -> None:
    conn.execute(effects_app.EFFECTS_DDL)


def test_enqueue_of_a_succeeded_key_returns_the_same_task_and_runs_nothing(
    dsn: str, ledger: None
) -> None:
    """With a worker running, re-enqueueing the key gives the same id, no new attempt, no new
    write, and the stored result; the key with different args is IdempotencyKeyMismatch."""
    app = pgidem.App(dsn)
    first = app.enqueue("echo", {"value": [1, "a"]}, idempotency_key="e-1")
    with thread_worker(effects_app.app, dsn):
        assert first.result(timeout=30) == {"value": [1, "a"]}
        again = app.enqueue("echo", {"value": [1, "a"]}, idempotency_key="e-1")
        many = app.enqueue_many("echo", [{"value": [1, "a"]}], idempotency_keys=["e-1"])
        time.sleep(1.0)  # ten poll intervals of the worker: time to run it, were it runnable
        assert again.id == first.id and many == [first.id]
        assert again.result(timeout=1) == {"value": [1, "a"]}
        # The same key with other args is a client bug, not a replay.
        with pytest.raises(pgidem.IdempotencyKeyMismatch):
            app.enqueue("echo", {"value": 2}, idempotency_key="e-1")
    app.close()
    assert scalar(dsn, "SELECT count(*) FROM pgidem.tasks") == 1
    assert scalar(dsn, "SELECT count(*) FROM pgidem.attempts") == 1
    assert scalar(dsn, "SELECT count(*) FROM effects_ledger") == 1


def test_enqueue_of_a_dead_key_replays_the_final_error(dsn: str) -> None:
    """A dead task's key gives the same task; its result raises TaskFailed with the stored
    error, and nothing runs again."""
    app = pgidem.App(dsn)
    handle = app.enqueue(effects_app.doomed, {"reason": "card declined"}, idempotency_key="d-1")
    with thread_worker(effects_app.app, dsn):
        with pytest.raises(pgidem.TaskFailed) as first:
            handle.result(timeout=30)
        again = app.enqueue(effects_app.doomed, {"reason": "card declined"}, idempotency_key="d-1")
        time.sleep(1.0)
        with pytest.raises(pgidem.TaskFailed) as replayed:
            again.result(timeout=1)
    app.close()
    assert again.id == handle.id
    assert replayed.value.error == first.value.error
    assert replayed.value.error["class"] == "ValueError"
    assert replayed.value.error["message"] == "doomed: card declined"
    assert scalar(dsn, "SELECT count(*) FROM pgidem.attempts") == 2


def test_outcome_of_by_id_and_by_key_from_sql(dsn: str, ledger: None) -> None:
    """pgidem.outcome_of: queued (no outcome yet), succeeded (result), dead (error), unknown
    (no row), by id and by (task name, key)."""
    app = pgidem.App(dsn)
    ok = app.enqueue("echo", {"value": "x"}, idempotency_key="o-1")
    bad = app.enqueue(effects_app.doomed, idempotency_key="o-2")
    cols = "task_id, state, attempts, outcome_state, result, error"
    before = rows(dsn, f"SELECT {cols} FROM pgidem.outcome_of(%s)", (ok.id,))
    assert before == [
        {
            "task_id": ok.id,
            "state": "queued",
            "attempts": 0,
            "outcome_state": None,
            "result": None,
            "error": None,
        }
    ]
    with thread_worker(effects_app.app, dsn):
        ok.result(timeout=30)
        with pytest.raises(pgidem.TaskFailed):
            bad.result(timeout=30)
    by_id = rows(dsn, f"SELECT {cols} FROM pgidem.outcome_of(%s)", (ok.id,))
    by_key = rows(dsn, f"SELECT {cols} FROM pgidem.outcome_of('echo', 'o-1')")
    assert by_id == by_key
    assert by_id[0]["state"] == "succeeded" and by_id[0]["result"] == {"value": "x"}
    dead = rows(dsn, f"SELECT {cols} FROM pgidem.outcome_of('doomed', 'o-2')")[0]
    assert dead["state"] == "dead" and dead["outcome_state"] == "dead"
    assert dead["error"]["class"] == "ValueError" and dead["attempts"] == 2
    assert rows(dsn, "SELECT * FROM pgidem.outcome_of(999999)") == []
    assert rows(dsn, "SELECT * FROM pgidem.outcome_of('echo', 'nope')") == []
    found = app.find("echo", "o-1")
    assert found is not None and found.id == ok.id
    assert found.result(timeout=1) == {"value": "x"}
    assert app.find("echo", "nope") is None
    assert app.find(effects_app.doomed, "o-2").id == bad.id  # type: ignore[union-attr]
    app.close()
