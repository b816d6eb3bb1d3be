"""The worker's everyday behaviour, with real `pgidem worker` processes on real PostgreSQL:
exactly-once writes at volume, retries and backoff, handlers that misbehave, batches in which
one task fails, handler selection, the heartbeat, cancellation, and the per-attempt log line."""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import pgidem
from pgidem.errors import MAX_ERROR_MESSAGE, MAX_TRACEBACK
from pgidem.worker import Worker
from tests.apps import LONG_MESSAGE
from tests.apps.worker_app import LEDGER_DDL
from tests.apps.worker_app import app as worker_app
from tests.helpers import rows, scalar, wait_until

ATTEMPT_LOG_KEYS = {
    "task_id",
    "task_name",
    "queue",
    "attempt",
    "fencing_token",
    "worker_id",
    "outcome",
    "duration_ms",
}


@pytest.fixture
def ledger(conn: psycopg.Connection[Any]) -> None:
    """The test database's ledger table (no unique constraint: a duplicate write shows)."""
    conn.execute(LEDGER_DDL)


def states(dsn: str) -> dict[str, int]:
    return dict(rows(dsn, "SELECT state, count(*) FROM pgidem.tasks GROUP BY state"))


def wait_all(dsn: str, total: int, timeout: float, finished: tuple[str, ...] = ()) -> None:
    """Wait until ``total`` tasks are in a final state (succeeded, dead, cancelled)."""
    final = finished or ("succeeded", "dead", "cancelled")

    def done() -> bool:
        counts = states(dsn)
        return sum(counts.get(s, 0) for s in final) >= total

    wait_until(done, timeout, 0.2, f"{total} tasks to finish (now {states(dsn)})")


def task_row(dsn: str, task_id: int) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.row_factory = psycopg.rows.dict_row
        row = c.execute(
            "SELECT t.*, o.state AS o_state, o.fencing_token AS o_token, o.result, o.error"
            "  FROM pgidem.tasks t LEFT JOIN pgidem.outcomes o ON o.task_id = t.id"
            " WHERE t.id = %s",
            (task_id,),
        ).fetchone()
        assert row is not None
        return row


def attempts(dsn: str, task_id: int) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.row_factory = psycopg.rows.dict_row
        return c.execute(
            "SELECT * FROM pgidem.attempts WHERE task_id = %s ORDER BY fencing_token", (task_id,)
        ).fetchall()


@pytest.mark.slow
def test_thousand_tasks_by_four_workers_write_exactly_once_and_log_json(
    dsn: str, ledger: None, app: pgidem.App, spawn_worker: Any
) -> None:
    """1,000 tasks, each writing one ledger row through ctx.conn, run by 4 worker processes:
    exactly 1,000 ledger rows (one per task, carrying the winning token), 1,000 succeeded
    outcomes, one succeeded attempt per task; and each worker's log (a file, not a terminal:
    JSON without asking) has one line per attempt with the canonical keys."""
    workers = [spawn_worker(dsn, "--concurrency", "2", log_json=None) for _ in range(4)]
    # All four ready before the work arrives (woken by the NOTIFY of the bulk enqueue).
    wait_until(lambda: scalar(dsn, "SELECT count(*) FROM pgidem.workers") == 4, 60, 0.1)
    ids = app.enqueue_many("write", [{"n": i} for i in range(1000)])
    wait_all(dsn, 1000, timeout=150)

    assert states(dsn) == {"succeeded": 1000}
    assert scalar(dsn, "SELECT count(*) FROM ledger") == 1000
    assert scalar(dsn, "SELECT count(DISTINCT task_id) FROM ledger") == 1000
    assert scalar(dsn, "SELECT count(*) FROM pgidem.outcomes WHERE state = 'succeeded'") == 1000
    # The ledger row of every task was written by the claim whose completion won.
    assert (
        scalar(
            dsn,
            "SELECT count(*) FROM ledger l JOIN pgidem.outcomes o"
            " ON o.task_id = l.task_id AND o.fencing_token = l.token",
        )
        == 1000
    )
    # Attempts agree: one per task unless a lease was lost on this noisy machine, and exactly
    # one succeeded attempt per task, the outcome's token, with attempts counted on the task.
    assert scalar(dsn, "SELECT count(*) FROM pgidem.attempts WHERE status = 'succeeded'") == 1000
    assert (
        scalar(
            dsn,
            "SELECT count(*) FROM pgidem.tasks t WHERE t.attempts <>"
            " (SELECT count(*) FROM pgidem.attempts a WHERE a.task_id = t.id)",
        )
        == 0
    )
    assert scalar(dsn, "SELECT count(*) FROM pgidem.attempts WHERE status = 'running'") == 0
    assert set(ids) == {r[0] for r in rows(dsn, "SELECT task_id FROM ledger")}

    for w in workers:
        w.signal(signal.SIGTERM)
    assert [w.wait(30) for w in workers] == [0, 0, 0, 0]
    succeeded_lines = []
    for w in workers:
        events = w.events()  # every line parses as JSON
        succeeded_lines += [e for e in events if e["event"] == "task_succeeded"]
        assert any(e["event"] == "worker_stopped" for e in events)
    assert len(succeeded_lines) == 1000
    assert {e["task_id"] for e in succeeded_lines} == set(ids)
    for line in succeeded_lines:
        assert line.keys() >= ATTEMPT_LOG_KEYS, line
        assert line["outcome"] == "succeeded" and line["queue"] == "default"
    # More than one worker took part.
    assert len({e["worker_id"] for e in succeeded_lines}) > 1
    assert scalar(dsn, "SELECT count(*) FROM pgidem.workers") == 0  # deregistered on exit


def test_failing_handler_retries_with_growing_backoff_then_dies_with_every_error(
    dsn: str, ledger: None, app: pgidem.App, spawn_worker: Any
) -> None:
    """A handler that raises is retried with exponential backoff (its task's policy: base
    0.3 s, cap 1.2 s, no jitter), ends `dead` after max_attempts (4), each attempt's error class,
    message and traceback on its attempt row and the final error in the outcome; none of its
    writes commit."""
    handle = app.enqueue("always_fails", {"n": 1}, max_attempts=4)
    spawn_worker(dsn, "--concurrency", "1", "--poll-interval", "0.1")
    wait_all(dsn, 1, timeout=30)

    row = task_row(dsn, handle.id)
    assert row["state"] == "dead" and row["attempts"] == 4
    assert row["o_state"] == "dead"
    assert row["error"]["class"] == "ValueError"
    assert row["error"]["message"] == f"attempt 4 of task {handle.id} failed on purpose"
    tries = attempts(dsn, handle.id)
    assert [a["attempt"] for a in tries] == [1, 2, 3, 4]
    assert row["o_token"] == tries[-1]["fencing_token"]
    for k, a in enumerate(tries, start=1):
        assert a["status"] == "failed"
        assert a["error_class"] == "ValueError"
        assert a["error_message"] == f"attempt {k} of task {handle.id} failed on purpose"
        assert "Traceback" in a["error_traceback"] and "always_fails" in a["error_traceback"]
    # Backoff: the next claim came no sooner than base * 2**(k-1) after the failure (the
    # failure's transaction time is both the attempt's finished_at and the base of run_at).
    gaps = [
        (tries[k + 1]["claimed_at"] - tries[k]["finished_at"]).total_seconds() for k in range(3)
    ]
    for gap, planned in zip(gaps, [0.3, 0.6, 1.2], strict=True):
        assert gap >= planned - 0.001, gaps
    assert scalar(dsn, "SELECT count(*) FROM ledger") == 0
    with pytest.raises(pgidem.TaskFailed, match="failed on purpose"):
        handle.result(timeout=1)


def test_retry_nonretryable_and_non_json_result(
    dsn: str, ledger: None, app: pgidem.App, spawn_worker: Any
) -> None:
    """Retry(delay) retries after that delay and then succeeds (its writes of the failed
    attempt rolled back); NonRetryable goes `dead` at once with attempts left; a result that
    is not JSON fails the attempt without retry and commits none of its writes."""
    retry = app.enqueue("retry_once", {"delay": 0.8})
    final = app.enqueue("non_retryable", {})
    bad = app.enqueue("bad_result", {})
    spawn_worker(dsn, "--concurrency", "2", "--poll-interval", "0.1")
    wait_all(dsn, 3, timeout=30)

    assert retry.result(timeout=1) == {"attempt": 2}
    first, second = attempts(dsn, retry.id)
    assert first["status"] == "failed" and first["error_class"] == "pgidem.errors.Retry"
    assert first["error_message"] == "come back later"
    assert (second["claimed_at"] - first["finished_at"]).total_seconds() >= 0.8 - 0.001
    # Only the successful attempt's ledger row committed.
    assert rows(dsn, "SELECT n FROM ledger WHERE task_id = %s", (retry.id,)) == [(2,)]

    row = task_row(dsn, final.id)
    assert (row["state"], row["attempts"], row["max_attempts"]) == ("dead", 1, 5)
    assert row["error"]["class"] == "pgidem.errors.NonRetryable"

    row = task_row(dsn, bad.id)
    assert (row["state"], row["attempts"]) == ("dead", 1)
    assert row["error"]["class"] == "pgidem.errors.InvalidInput"
    assert "not JSON serializable" in row["error"]["message"]
    assert scalar(dsn, "SELECT count(*) FROM ledger WHERE task_id = %s", (final.id,)) == 0
    assert scalar(dsn, "SELECT count(*) FROM ledger WHERE task_id = %s", (bad.id,)) == 0
    assert scalar(dsn, "SELECT count(*) FROM pgidem.outcomes WHERE state = 'succeeded'") == 1


def test_long_error_message_and_traceback_are_cut_to_the_documented_limits(
    dsn: str, app: pgidem.App, spawn_worker: Any
) -> None:
    """A handler raising a 10,000-character message (chained to another as long): the attempt
    row keeps exactly its first 2,000 characters, and the last 16,000 of the traceback (which
    end with the error's own line); the dead outcome and last_error carry the same cut message
    (docs/errors.md, "Limits")."""
    assert (MAX_ERROR_MESSAGE, MAX_TRACEBACK) == (2000, 16000)  # the figures documented
    assert len(LONG_MESSAGE) == 10000
    handle = app.enqueue("long_error", {}, max_attempts=1)
    spawn_worker(dsn, "--concurrency", "1", "--poll-interval", "0.1")
    wait_all(dsn, 1, timeout=30)

    (tried,) = attempts(dsn, handle.id)
    assert tried["status"] == "failed" and tried["error_class"] == "ValueError"
    assert tried["error_message"] == LONG_MESSAGE[:2000]
    # Both messages are in the whole traceback (over 20,000 characters): the end is kept.
    assert len(tried["error_traceback"]) == 16000
    assert tried["error_traceback"].endswith(f"ValueError: {LONG_MESSAGE}\n")
    row = task_row(dsn, handle.id)
    assert row["state"] == "dead"
    assert row["error"]["message"] == LONG_MESSAGE[:2000]
    assert row["last_error"] == f"ValueError: {LONG_MESSAGE[:2000]}"


#: How a handler can try to end its own transaction, and whether its write survives. pgidem's
#: connection wrapper, and the cursors it hands out, refuse every attempt through ctx.conn and
#: ctx.cursor(); a COMMIT through the raw connection (ctx.conn.raw, the documented way around
#: the guard) or libpq underneath it cannot be stopped, only noticed.
ENDINGS = [
    ("commit", 0),
    ("rollback", 0),
    ("close", 0),
    ("execute_commit", 0),
    ("cursor_commit", 0),
    ("conn_cursor_rollback", 0),
    ("cursor_executemany_commit", 0),
    ("result_cursor_commit", 0),
    ("cursor_connection_commit", 0),
    ("raw_rollback", 0),
    ("raw_close", 0),
    ("raw_commit", 1),
    ("raw_cursor_commit", 1),
    ("pgconn_commit", 1),
]


def test_handler_ending_its_transaction_never_succeeds(
    dsn: str, ledger: None, app: pgidem.App, spawn_worker: Any
) -> None:
    """A handler that commits (conn.commit(), execute("COMMIT"), a cursor's execute, through
    the raw connection or libpq), rolls back or closes the task's connection never yields
    `succeeded`: its attempt fails (TransactionEnded) without retry, even when it swallowed
    pgidem's refusal; through ctx.conn and ctx.cursor() its write never commits; tasks that ran
    before it in the same batch transaction still end exactly once, and the worker lives."""
    before = app.enqueue_many("write", [{"n": i} for i in range(3)])
    ends = {how: app.enqueue("ends_transaction", {"how": how}).id for how, _ in ENDINGS}
    after = app.enqueue_many("write", [{"n": i} for i in range(3)])
    # One slot: the whole lot is claimed as one batch and shares completion transactions.
    worker = spawn_worker(dsn, "--concurrency", "1", "--poll-interval", "0.1")
    wait_all(dsn, len(before) + len(ENDINGS) + len(after), timeout=60)

    for how, rows_kept in ENDINGS:
        row = task_row(dsn, ends[how])
        assert row["state"] == "dead", how
        assert row["o_state"] == "dead" and row["result"] is None, how
        assert row["error"]["class"] == "pgidem.errors.TransactionEnded", how
        # An earlier try may have been rolled back by a neighbour's ROLLBACK (and retried).
        tries = attempts(dsn, ends[how])
        assert {a["status"] for a in tries} == {"failed"}, how
        assert tries[-1]["error_class"] == "pgidem.errors.TransactionEnded", how
        kept = scalar(dsn, "SELECT count(*) FROM ledger WHERE task_id = %s", (ends[how],))
        assert kept == rows_kept, how
    for task_id in before + after:
        row = task_row(dsn, task_id)
        assert row["state"] == "succeeded", task_id
        assert rows(dsn, "SELECT token FROM ledger WHERE task_id = %s", (task_id,)) == [
            (row["o_token"],)
        ]
    assert worker.alive()
    assert scalar(dsn, "SELECT count(*) FROM pgidem.attempts WHERE status = 'running'") == 0


def test_writes_awaiting_the_batch_completion_follow_a_handler_that_ends_the_transaction(
    dsn: str, ledger: None, app: pgidem.App, spawn_worker: Any
) -> None:
    """A task that wrote, whose row is held and whose completion waits for the statement
    before COMMIT, shares its transaction with a handler that ends it through ctx.conn.raw.
    After that handler's ROLLBACK the write is gone and the task runs again (one ledger row,
    from its second attempt); after a COMMIT its write stayed and it is completed, not run
    again (one ledger row, one attempt). The worker asks PostgreSQL which of the two it was."""
    # Both handlers known to be quick, so that the next ones share a transaction.
    app.enqueue("write", {"n": -1})
    app.enqueue("ends_transaction", {"how": "raw_rollback"})
    worker = spawn_worker(
        dsn, "--concurrency", "1", "--poll-interval", "0.1", "--commit-interval", "5"
    )
    wait_all(dsn, 2, timeout=30)

    at = datetime.now(UTC) + timedelta(seconds=1.5)
    rolled_back = app.enqueue("write", {"n": 1}, run_at=at).id
    app.enqueue("ends_transaction", {"how": "raw_rollback"}, run_at=at)
    committed = app.enqueue("write", {"n": 2}, run_at=at).id
    app.enqueue("ends_transaction", {"how": "raw_commit"}, run_at=at)
    wait_all(dsn, 6, timeout=30)

    first, second = attempts(dsn, rolled_back)
    assert first["status"] == "failed"
    assert "rolled back" in first["error_message"]
    assert second["status"] == "succeeded"
    row = task_row(dsn, rolled_back)
    assert row["state"] == "succeeded"
    assert rows(dsn, "SELECT token FROM ledger WHERE task_id = %s", (rolled_back,)) == [
        (second["fencing_token"],)
    ]
    (only,) = attempts(dsn, committed)
    assert only["status"] == "succeeded"
    assert task_row(dsn, committed)["state"] == "succeeded"
    assert rows(dsn, "SELECT token FROM ledger WHERE task_id = %s", (committed,)) == [
        (only["fencing_token"],)
    ]
    assert worker.alive()


def test_one_bad_task_in_a_batch_does_not_affect_the_others(
    dsn: str, ledger: None, app: pgidem.App, spawn_worker: Any
) -> None:
    """Tasks claimed as one batch complete in one transaction with a savepoint each: a task
    that raises and one that returns a non-JSON value roll back alone; the others in the same
    transaction commit their writes once, and the worker keeps running."""
    # A first round, so that the worker knows these handlers are quick (a handler not known
    # to be quick gets a transaction of its own).
    warm = [app.enqueue("write", {"n": -1}).id]
    warm.append(app.enqueue("always_fails", {"n": -1}, max_attempts=1).id)
    warm.append(app.enqueue("bad_result", {}).id)
    worker = spawn_worker(
        dsn, "--concurrency", "1", "--poll-interval", "0.1", "--commit-interval", "5"
    )
    wait_all(dsn, 3, timeout=30)

    # Then one batch, all runnable at the same instant, and a long commit interval.
    at = datetime.now(UTC) + timedelta(seconds=1.5)
    ids = app.enqueue_many("write", [{"n": i} for i in range(5)], run_at=at)
    failing = app.enqueue("always_fails", {"n": 99}, max_attempts=1, run_at=at).id
    bad = app.enqueue("bad_result", {}, run_at=at).id
    ids += app.enqueue_many("write", [{"n": i} for i in range(5, 10)], run_at=at)
    wait_all(dsn, 15, timeout=30)

    assert states(dsn) == {"succeeded": 11, "dead": 4}
    assert task_row(dsn, failing)["state"] == "dead"
    assert task_row(dsn, bad)["state"] == "dead"
    assert scalar(dsn, "SELECT count(*) FROM ledger WHERE n >= 0") == 10
    assert {r[0] for r in rows(dsn, "SELECT task_id FROM ledger WHERE n >= 0")} == set(ids)
    # They were one claim (consecutive tokens) and shared a completion transaction: the
    # attempts of the failing task and of its neighbours finished at one transaction time.
    batch = [*ids[:5], failing, bad, *ids[5:]]
    tokens = [task_row(dsn, i)["fencing_token"] for i in batch]
    assert tokens == list(range(tokens[0], tokens[0] + 12))
    finished = rows(
        dsn,
        "SELECT count(DISTINCT finished_at) FROM pgidem.attempts WHERE task_id = ANY(%s)",
        (batch,),
    )[0][0]
    assert finished < 12
    together = rows(
        dsn,
        "SELECT count(*) FROM pgidem.attempts a WHERE a.task_id = %s AND EXISTS"
        " (SELECT 1 FROM pgidem.attempts b WHERE b.task_id = ANY(%s) AND b.status = 'succeeded'"
        "  AND b.finished_at = a.finished_at)",
        (failing, ids),
    )[0][0]
    assert together == 1, "the failing task shared no transaction with a succeeding one"
    assert worker.alive()


def test_an_idle_worker_s_listener_claims_notified_tasks_for_its_idle_slots(
    dsn: str, ledger: None, app: pgidem.App, spawn_worker: Any
) -> None:
    """With a poll interval far longer than the test, only a NOTIFY can start a task. On each,
    the listener claims on its own connection (the one that ran LISTEN) and hands the batch to
    an idle slot: every task runs once, and the listener's backend last ran the claim."""
    worker = spawn_worker(dsn, "--concurrency", "2", "--poll-interval", "600")

    def listener_pid() -> int | None:
        found = rows(
            dsn,
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND query = 'LISTEN pgidem'",
        )
        return found[0][0] if found else None

    wait_until(listener_pid, 30, 0.1, "the worker's listener")
    pid = listener_pid()

    def waiting_slots() -> int:
        # A slot that found nothing looks up the next run_at (next_run_at, whose text starts
        # with this comment) and waits: the last query its connection shows.
        n: int = scalar(
            dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND query LIKE '-- When the earliest scheduled task%%'",
        )
        return n

    wait_until(lambda: waiting_slots() == 2, 30, 0.05, "both slots waiting for work")
    ids = []
    for i in range(5):
        handle = app.enqueue("write", {"n": i})
        assert handle.result(timeout=20) == {
            "n": i,
            "token": task_row(dsn, handle.id)["fencing_token"],
        }
        ids.append(handle.id)
    assert sorted(r[0] for r in rows(dsn, "SELECT task_id FROM ledger")) == ids
    for task_id in ids:
        assert [a["status"] for a in attempts(dsn, task_id)] == ["succeeded"]
    (last,) = rows(dsn, "SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,))
    # (pg_stat_activity keeps the first 1 kB of the text: the claim's opening comment.)
    assert last[0].startswith("-- Claim up to"), last[0][:200]
    assert worker.alive()


@pytest.mark.parametrize("task_savepoints", [False, True], ids=["unguarded", "savepoints"])
def test_a_quick_task_failing_after_its_write_makes_the_writers_before_it_run_again(
    dsn: str, ledger: None, app: pgidem.App, spawn_worker: Any, tmp_path: Any, task_savepoints: bool
) -> None:
    """Once a quick handler has returned cleanly often enough, its writes go into the batch's
    transaction without a savepoint of their own. When one of them then fails after writing,
    the whole transaction rolls back: its failure is recorded, and the batch-mates that had
    written before it in that transaction run again (same claim, same token), so each write
    still commits exactly once. With ``--task-savepoints`` nothing runs again."""
    runs = tmp_path / "runs.txt"
    args = ["--concurrency", "1", "--poll-interval", "0.1", "--commit-interval", "5"]
    if task_savepoints:
        args.append("--task-savepoints")
    worker = spawn_worker(dsn, *args)
    # A clean record first (more than _CLEAN_RUNS_UNGUARDED returns).
    app.enqueue_many("tally", [{"n": -1, "runs": str(runs)} for _ in range(60)])
    wait_all(dsn, 60, timeout=30)

    # Then one batch (one claim, one transaction): five writers, one that fails after its
    # write, four more.
    at = datetime.now(UTC) + timedelta(seconds=1.5)
    batch = app.enqueue_many(
        "tally",
        [{"n": i, "runs": str(runs), "fail": i == 5} for i in range(10)],
        run_at=at,
    )
    wait_all(dsn, 70, timeout=30, finished=("succeeded",))

    tokens = [task_row(dsn, i)["fencing_token"] for i in batch]
    assert tokens[:5] + tokens[6:] == [tokens[0] + i for i in range(10) if i != 5], "one claim"
    calls: dict[int, list[int]] = {}
    for line in runs.read_text().splitlines():
        task_id, token = map(int, line.split())
        calls.setdefault(task_id, []).append(token)
    # Every write committed once, by the attempt that succeeded.
    ledger_rows = rows(
        dsn, "SELECT task_id, token, attempt FROM ledger WHERE task_id = ANY(%s)", (batch,)
    )
    assert sorted(r[0] for r in ledger_rows) == sorted(batch)
    for task_id, token, _ in ledger_rows:
        assert token == task_row(dsn, task_id)["fencing_token"]
    failing = batch[5]
    assert [a["status"] for a in attempts(dsn, failing)] == ["failed", "succeeded"]
    first = attempts(dsn, failing)[0]
    assert first["error_class"] == "RuntimeError"
    assert len(calls[failing]) == 2
    for task_id in batch[:5] + batch[6:]:
        assert [a["status"] for a in attempts(dsn, task_id)] == ["succeeded"]
    again = [e for e in worker.events() if e.get("event") == "tasks_run_again"]
    if task_savepoints:
        assert all(len(calls[i]) == 1 for i in batch[:5] + batch[6:]), calls
        assert again == []
    else:
        # The five before it ran twice under the same claim; those after it once.
        assert [calls[i] for i in batch[:5]] == [[t, t] for t in tokens[:5]]
        assert all(len(calls[i]) == 1 for i in batch[6:]), calls
        assert [(e["task_ids"], e["failed_task_id"]) for e in again] == [(batch[:5], failing)]
    assert worker.alive()


@pytest.mark.slow
def test_tasks_that_never_touch_the_connection_complete_together_and_fenced(
    dsn: str, ledger: None, app: pgidem.App, spawn_worker: Any
) -> None:
    """Handlers that never reach ``ctx.conn`` get no savepoint; their completions go in one
    fenced statement before COMMIT, next to tasks that write. One of them whose claim was
    taken over while it ran is refused there (no outcome from its stale attempt, attempt
    ``fenced``) and succeeds once on its next claim; its neighbours are not affected."""
    warm = [app.enqueue("pure", {"n": -1}).id, app.enqueue("write", {"n": -1}).id]
    worker = spawn_worker(
        dsn, "--concurrency", "1", "--poll-interval", "0.1", "--commit-interval", "5"
    )
    wait_all(dsn, len(warm), timeout=30)

    at = datetime.now(UTC) + timedelta(seconds=1.5)
    pure = app.enqueue_many("pure", [{"n": i} for i in range(4)], run_at=at)
    stale = app.enqueue("pure", {"n": 99, "supersede": True}, run_at=at).id
    writes = app.enqueue_many("write", [{"n": i} for i in range(3)], run_at=at)
    pure += app.enqueue_many("pure", [{"n": i} for i in range(4, 8)], run_at=at)
    wait_all(dsn, len(warm) + 12, timeout=30, finished=("succeeded",))

    assert states(dsn) == {"succeeded": 14}
    assert scalar(dsn, "SELECT count(*) FROM ledger WHERE n >= 0") == 3
    assert {r[0] for r in rows(dsn, "SELECT task_id FROM ledger WHERE n >= 0")} == set(writes)
    for task_id in pure:
        row = task_row(dsn, task_id)
        assert row["o_state"] == "succeeded"
        assert row["result"]["token"] == row["o_token"] == row["fencing_token"]
        assert [a["status"] for a in attempts(dsn, task_id)] == ["succeeded"]
    first, second = attempts(dsn, stale)
    assert first["status"] == "fenced"
    assert second["status"] == "succeeded"
    row = task_row(dsn, stale)
    assert row["o_token"] == second["fencing_token"] == row["result"]["token"]
    assert scalar(dsn, "SELECT count(*) FROM pgidem.outcomes WHERE task_id = %s", (stale,)) == 1
    # The batch was one claim: the superseded task was claimed with tasks that succeeded.
    together = rows(
        dsn,
        "SELECT count(*) FROM pgidem.attempts a WHERE a.fencing_token = %s AND EXISTS"
        " (SELECT 1 FROM pgidem.attempts b WHERE b.task_id = ANY(%s) AND b.status = 'succeeded'"
        "  AND b.claimed_at = a.claimed_at)",
        (first["fencing_token"], pure + writes),
    )[0][0]
    assert together == 1, "the superseded task was not claimed with the others"
    assert worker.alive()


def test_pgidem_statements_run_without_jit_and_handlers_with_their_own_settings(
    dsn: str, ledger: None, app: pgidem.App, spawn_worker: Any
) -> None:
    """The worker's connections run pgidem's statements with JIT off (with it, every claim on
    a deep queue was compiled with LLVM first, several times slower); each task transaction
    sets back the session's own value for the handlers, here from a DSN's ``options``."""
    worker = Worker(worker_app)
    with psycopg.connect(dsn, autocommit=True, options="-c jit=on") as conn:
        worker._configure_session(conn)
        assert conn.execute("SHOW jit").fetchone() == ("off",)
        conn.execute(worker._begin)
        assert conn.execute("SHOW jit").fetchone() == ("on",)
        conn.execute("COMMIT")
        assert conn.execute("SHOW jit").fetchone() == ("off",)

    task_id = app.enqueue("session").id
    own = make_conninfo(dsn, options="-c plan_cache_mode=force_custom_plan -c jit=on")
    spawn_worker(own, "--concurrency", "1")
    wait_all(dsn, 1, timeout=30)
    assert task_row(dsn, task_id)["result"] == {"jit": "on", "plan_cache_mode": "force_custom_plan"}


def test_tasks_without_a_handler_are_not_claimed(
    dsn: str, ledger: None, app: pgidem.App, spawn_worker: Any
) -> None:
    """A worker claims only tasks it has a handler for: the others stay queued, untouched
    (no attempt counted, no attempt row), for a worker that has their handler."""
    known = app.enqueue("write", {"n": 1})
    unknown = app.enqueue("always_fails", {"n": 2})
    nobody = app.enqueue("no_such_handler", {})
    spawn_worker(dsn, "--poll-interval", "0.1", app="tests.apps.worker_app:narrow_app")
    known.result(timeout=30)
    # Give the worker many claim rounds (poll every 0.1 s) to take what it should not.
    wait_until(
        lambda: scalar(dsn, "SELECT count(*) FROM pgidem.workers") == 1, 10, message="worker"
    )
    time.sleep(1.5)
    for handle in (unknown, nobody):
        row = task_row(dsn, handle.id)
        assert (row["state"], row["attempts"], row["fencing_token"]) == ("queued", 0, None)
        assert attempts(dsn, handle.id) == []


@pytest.mark.slow
def test_heartbeat_extends_every_held_lease_in_one_statement(
    dsn: str, ledger: None, app: pgidem.App, spawn_worker: Any
) -> None:
    """Three handlers of one worker run 3.5 s on a 1 s lease: the heartbeat keeps their leases
    (one UPDATE for all: the three leases carry the same expiry time, though claimed apart),
    a second worker that polls all along never gets them, and each completes once."""
    handles = [app.enqueue("long_running", {"seconds": 3.5}, max_attempts=1) for _ in range(3)]
    holder = spawn_worker(dsn, "--concurrency", "3", "--batch-size", "1", "--lease", "1")

    def running() -> list[tuple[Any, ...]]:
        found = rows(
            dsn,
            "SELECT id, lease_owner, lease_expires_at, started_at FROM pgidem.tasks"
            " WHERE state = 'running'",
        )
        return found if len(found) == 3 else []

    first = wait_until(running, 30, 0.05, "three running tasks")
    assert len({r[1] for r in first}) == 1  # one worker holds them all
    spawn_worker(dsn, "--concurrency", "2", "--lease", "1", "--poll-interval", "0.1")

    # The leases move forward together: at some point all three share one expiry time that
    # lies beyond a single lease from their claims.
    def extended_together() -> bool:
        now = running()
        return (
            len(now) == 3
            and len({r[2] for r in now}) == 1
            and all((r[2] - r[3]).total_seconds() > 1.05 for r in now)
        )

    wait_until(extended_together, 10, 0.05, "one lease expiry for all three, extended")
    for handle in handles:
        assert handle.result(timeout=30) == {"lease_lost": False}
        tries = attempts(dsn, handle.id)
        assert [(a["status"], a["worker_id"]) for a in tries] == [("succeeded", first[0][1])]
    assert scalar(dsn, "SELECT count(*) FROM ledger") == 3
    assert holder.alive()
    assert not [e for e in holder.events() if e["event"] == "lease_lost"]


def test_cancel_running_task_refuses_its_completion(
    dsn: str, ledger: None, app: pgidem.App, spawn_worker: Any
) -> None:
    """Cancelling a running task: the heartbeat tells the handler (ctx.check_lease raises),
    its completion is refused, its writes roll back, its attempt ends `cancelled`."""
    handle = app.enqueue("long_running", {"seconds": 20}, max_attempts=1)
    worker = spawn_worker(dsn, "--lease", "2")
    wait_until(lambda: handle.state == "running", 30, message="the task to run")
    assert app.cancel(handle.id) == "running"
    worker.wait_for_event("task_cancelled", 15)
    row = task_row(dsn, handle.id)
    assert row["state"] == "cancelled" and row["o_state"] is None
    assert [a["status"] for a in attempts(dsn, handle.id)] == ["cancelled"]
    assert scalar(dsn, "SELECT count(*) FROM ledger") == 0
    with pytest.raises(pgidem.TaskCancelled):
        handle.result(timeout=1)
    assert worker.alive()


def test_live_worker_removes_rows_of_workers_gone_silent(
    dsn: str, ledger: None, spawn_worker: Any
) -> None:
    """A worker that died without deregistering (SIGKILL) leaves its pgidem.workers row; the
    heartbeat of a live worker removes rows silent for over STALE_WORKER_S and keeps its own."""
    from tests.helpers import execute

    execute(
        dsn,
        "INSERT INTO pgidem.workers (id, hostname, pid, queues, concurrency, heartbeat_at)"
        " VALUES ('ghost', 'nowhere', 1, '{default}', 1, now() - interval '5 minutes'),"
        "        ('recent', 'nowhere', 2, '{default}', 1, now() - interval '10 seconds')",
    )
    spawn_worker(dsn, "--lease", "1")
    wait_until(
        lambda: "ghost" not in {r[0] for r in rows(dsn, "SELECT id FROM pgidem.workers")},
        30,
        0.1,
        "the ghost worker's row to go",
    )
    left = {r[0] for r in rows(dsn, "SELECT id FROM pgidem.workers")}
    assert "recent" in left and len(left) == 2


def test_sys_exit_in_a_handler_and_args_that_do_not_fit_fail_only_the_attempt(
    dsn: str, ledger: None, app: pgidem.App, spawn_worker: Any
) -> None:
    """A handler calling sys.exit() fails its attempt like any exception (it must not end the
    worker's only slot: the tasks after it still run); args that do not fit the handler's
    signature fail at once without retry (retrying cannot help)."""
    exits = app.enqueue("exits", {}, max_attempts=2)
    misfit = app.enqueue("write", {"n": 1, "colour": "red"})
    after = app.enqueue_many("write", [{"n": i} for i in range(3)])
    worker = spawn_worker(dsn, "--concurrency", "1", "--poll-interval", "0.1")
    wait_all(dsn, 5, timeout=60)

    row = task_row(dsn, exits.id)
    assert (row["state"], row["attempts"], row["error"]["class"]) == ("dead", 2, "SystemExit")
    row = task_row(dsn, misfit.id)
    assert (row["state"], row["attempts"]) == ("dead", 1)
    assert row["error"]["class"] == "pgidem.errors.InvalidInput"
    assert "do not fit the handler of 'write'" in row["error"]["message"]
    assert all(task_row(dsn, i)["state"] == "succeeded" for i in after)
    assert scalar(dsn, "SELECT count(*) FROM ledger") == 3
    assert worker.alive()
