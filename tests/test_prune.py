"""Retention: pgidem.prune_batch / pgidem.prune, `pgidem prune` and the worker's pruner delete
finished tasks older than the retention with their attempts, outcomes, steps and step calls,
and old once keys, in batches that skip locked rows; a pruned task's key can be used again."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

import pgidem
from pgidem import _store
from pgidem._pruner import Pruner, PrunerConfig, parse_duration
from pgidem.cli import main
from tests.apps import effects_app
from tests.effects_support import thread_worker, worker_processes
from tests.helpers import scalar, wait_until

#: Finished tasks as a worker leaves them, with an attempt, an outcome, a step and its call.
FINISHED_DDL = """
WITH t AS (
    INSERT INTO pgidem.tasks (task_name, idempotency_key, state, attempts, fencing_token,
                              created_at, finished_at)
    SELECT %(name)s, %(name)s || '-' || g, %(state)s, 1, nextval('pgidem.fencing_token_seq'),
           now() - %(age)s::interval, now() - %(age)s::interval
      FROM generate_series(1, %(n)s) AS g
    RETURNING id, fencing_token
), a AS (
    INSERT INTO pgidem.attempts (fencing_token, task_id, attempt, worker_id, status, finished_at)
    SELECT fencing_token, id, 1, 'w', 'succeeded', now() FROM t
), o AS (
    INSERT INTO pgidem.outcomes (task_id, fencing_token, state, result)
    SELECT id, fencing_token, 'succeeded', '{}' FROM t
), s AS (
    INSERT INTO pgidem.steps (task_id, name, step_key, fencing_token, attempt, result)
    SELECT id, 'charge', 'k', fencing_token, 1, '{}' FROM t
)
INSERT INTO pgidem.step_calls (task_id, fencing_token, attempt, name, step_key, status,
                               finished_at)
SELECT id, fencing_token, 1, 'charge', 'k', 'recorded', now() FROM t
"""


def finished(
    conn: psycopg.Connection[Any], name: str, n: int, age: str, state: str = "succeeded"
) -> None:
    conn.execute(FINISHED_DDL, {"name": name, "n": n, "age": age, "state": state})


def counts(conn: psycopg.Connection[Any]) -> dict[str, int]:
    tables = ("tasks", "attempts", "outcomes", "steps", "step_calls", "once_keys")
    return {t: conn.execute(f"SELECT count(*) FROM pgidem.{t}").fetchone()[0] for t in tables}


def test_prune_deletes_old_finished_tasks_with_their_history_and_keeps_the_rest(
    conn: psycopg.Connection[Any],
) -> None:
    """Old finished tasks go with their attempts, outcomes, steps and step calls, and old once
    keys; recent finished tasks, recent keys and unfinished tasks (however old) stay."""
    finished(conn, "old", 5, "2 days")
    finished(conn, "new", 3, "1 minute")
    old_queued = _store.task_enqueue(
        conn,
        task_name="waiting",
        args_json="{}",
        queue="default",
        idempotency_key=None,
        run_at=None,
        priority=0,
        max_attempts=None,
    )
    conn.execute(
        "UPDATE pgidem.tasks SET created_at = now() - interval '30 days' WHERE id = %s",
        (old_queued,),
    )
    conn.execute(
        "INSERT INTO pgidem.once_keys (key, created_at) VALUES"
        " ('old-1', now() - interval '2 days'), ('old-2', now() - interval '2 days'),"
        " ('new-1', now())"
    )
    assert _store.prune_pending(conn, older_than_s=86400) == (5, 2)
    assert _store.prune_batch(conn, older_than_s=86400, batch_size=1000) == (5, 2)
    assert counts(conn) == {
        "tasks": 4,
        "attempts": 3,
        "outcomes": 3,
        "steps": 3,
        "step_calls": 3,
        "once_keys": 1,
    }
    names = {r[0] for r in conn.execute("SELECT task_name FROM pgidem.tasks").fetchall()}
    assert names == {"new", "waiting"}


def test_any_delete_of_tasks_takes_their_attempts_and_outcomes_and_only_theirs(
    conn: psycopg.Connection[Any],
) -> None:
    """Attempts and outcomes have no foreign key (migration 0007): a statement-level trigger
    deletes them with their tasks, whoever deletes the tasks and however many at once, and
    leaves the other tasks' rows alone."""
    finished(conn, "gone", 4, "1 minute")
    finished(conn, "kept", 3, "1 minute")
    conn.execute("DELETE FROM pgidem.step_calls; DELETE FROM pgidem.steps")
    kept = {r[0] for r in conn.execute("SELECT id FROM pgidem.tasks WHERE task_name = 'kept'")}

    one = conn.execute("SELECT min(id) FROM pgidem.tasks WHERE task_name = 'gone'").fetchone()
    assert one is not None
    conn.execute("DELETE FROM pgidem.tasks WHERE id = %s", (one[0],))
    assert counts(conn)["attempts"] == 6 and counts(conn)["outcomes"] == 6
    conn.execute("DELETE FROM pgidem.tasks WHERE task_name = 'gone'")

    left = {
        table: {r[0] for r in conn.execute(f"SELECT task_id FROM pgidem.{table}")}
        for table in ("attempts", "outcomes")
    }
    assert left == {"attempts": kept, "outcomes": kept}
    with conn.transaction(force_rollback=True):
        conn.execute("DELETE FROM pgidem.tasks")
        assert counts(conn)["attempts"] == 0 and counts(conn)["outcomes"] == 0
    assert counts(conn)["attempts"] == 3  # rolled back with the delete


def test_truncating_the_tasks_empties_their_attempts_and_outcomes(
    conn: psycopg.Connection[Any],
) -> None:
    """TRUNCATE pgidem.tasks CASCADE (steps and step calls still have foreign keys) empties
    attempts and outcomes too, as it did when they had theirs."""
    finished(conn, "a", 5, "1 minute")
    with pytest.raises(psycopg.errors.FeatureNotSupported, match="foreign key"):
        conn.execute("TRUNCATE pgidem.tasks")
    conn.execute("TRUNCATE pgidem.tasks CASCADE")
    assert counts(conn) == {
        "tasks": 0,
        "attempts": 0,
        "outcomes": 0,
        "steps": 0,
        "step_calls": 0,
        "once_keys": 0,
    }


def test_prune_uses_the_key_retention_setting_by_default(conn: psycopg.Connection[Any]) -> None:
    """Without older_than, pgidem.key_retention decides (7 days when unset)."""
    finished(conn, "a", 2, "3 days")
    finished(conn, "b", 2, "8 days")
    assert conn.execute("SELECT pgidem.prune()").fetchone() == (2,)  # the 8-day-old ones
    conn.execute("SET pgidem.key_retention = '1 day'")
    assert conn.execute("SELECT pgidem.prune()").fetchone() == (2,)
    assert counts(conn)["tasks"] == 0


def test_prune_batch_deletes_at_most_a_batch_and_prune_counts_once_keys(
    conn: psycopg.Connection[Any],
) -> None:
    """A batch deletes at most batch_size tasks and once keys; pgidem.prune returns both,
    so a loop until 0 also clears a ledger with more old keys than old tasks."""
    finished(conn, "old", 25, "2 days")
    conn.execute(
        "INSERT INTO pgidem.once_keys (key, created_at)"
        " SELECT 'k' || g, now() - interval '2 days' FROM generate_series(1, 40) g"
    )
    with pytest.raises(pgidem.InvalidInput, match="batch_size"):
        _store.prune_batch(conn, older_than_s=None, batch_size=0)
    with pytest.raises(pgidem.InvalidInput, match="older_than"):
        _store.prune_batch(conn, older_than_s=-1, batch_size=10)
    assert _store.prune_batch(conn, older_than_s=3600, batch_size=10) == (10, 10)
    calls = 0
    while conn.execute("SELECT pgidem.prune('1 hour', 10)").fetchone() != (0,):
        calls += 1
    assert calls == 3  # 15 tasks + 30 keys left: 20, 15, 10 rows
    assert counts(conn)["tasks"] == 0 and counts(conn)["once_keys"] == 0


def test_prune_skips_a_locked_task_instead_of_waiting(dsn: str) -> None:
    """A finished task locked by another transaction is left for a later batch: the prune
    neither waits for it nor fails."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        finished(conn, "old", 3, "2 days")
        locked_id = conn.execute("SELECT min(id) FROM pgidem.tasks").fetchone()[0]
        with psycopg.connect(dsn) as holder:
            holder.execute("SELECT 1 FROM pgidem.tasks WHERE id = %s FOR UPDATE", (locked_id,))
            conn.execute("SET statement_timeout = '20s'")
            assert _store.prune_batch(conn, older_than_s=3600, batch_size=10) == (2, 0)
            holder.rollback()
        assert _store.prune_batch(conn, older_than_s=3600, batch_size=10) == (1, 0)


def test_bad_pruner_settings_and_durations_are_invalid_input() -> None:
    with pytest.raises(pgidem.InvalidInput, match="pruner setting"):
        PrunerConfig(batch_size=0).validate()
    with pytest.raises(pgidem.InvalidInput, match="invalid duration"):
        parse_duration("soon")
    assert [parse_duration(t) for t in ("90", "90s", "15m", "1.5h", "7d", "2w")] == [
        90,
        90,
        900,
        5400,
        604800,
        1209600,
    ]


def test_a_pruned_tasks_key_can_be_used_again(dsn: str, conn: psycopg.Connection[Any]) -> None:
    """Before the prune the key replays the old task; after it, the same key is a new task
    that runs."""
    conn.execute(effects_app.EFFECTS_DDL)
    app = pgidem.App(dsn)
    with thread_worker(effects_app.app, dsn):
        first = app.enqueue("echo", {"value": 1}, idempotency_key="reuse")
        first.result(timeout=30)
        conn.execute("UPDATE pgidem.tasks SET finished_at = now() - interval '8 days'")
        assert app.enqueue("echo", {"value": 1}, idempotency_key="reuse").id == first.id
        assert conn.execute("SELECT pgidem.prune()").fetchone() == (1,)
        with pytest.raises(pgidem.TaskNotFound):
            first.refresh()
        second = app.enqueue("echo", {"value": 1}, idempotency_key="reuse")
        assert second.id != first.id
        assert second.result(timeout=30) == {"value": 1}
    app.close()
    assert scalar(dsn, "SELECT count(*) FROM effects_ledger") == 2


def test_pruner_run_once_stops_at_max_batches_and_reports(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        finished(conn, "old", 35, "2 days")
    pool: list[psycopg.Connection[Any]] = []

    def connection() -> psycopg.Connection[Any]:
        c = psycopg.connect(dsn, autocommit=True)
        pool.append(c)
        return c

    pruner = Pruner(connection, PrunerConfig(older_than=3600, batch_size=10, max_batches=2))
    first = pruner.run_once()
    assert (first.tasks, first.batches, first.complete) == (20, 2, False)
    rest = Pruner(connection, PrunerConfig(older_than=3600, batch_size=10)).run_once()
    assert (rest.tasks, rest.batches, rest.complete) == (15, 2, True)
    assert all(c.closed for c in pool)


def test_pgidem_prune_command(dsn: str) -> None:
    """`pgidem prune`: --dry-run counts, a run reports tasks, keys and batches, a bad duration
    is a clear error with a non-zero exit."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        finished(conn, "old", 12, "3 hours")
        finished(conn, "new", 2, "1 minute")
    runner = CliRunner()
    dry = runner.invoke(main, ["prune", "--older-than", "1h", "--dry-run", "--dsn", dsn])
    assert dry.exit_code == 0, dry.output
    assert "would prune 12 finished tasks and 0 once keys" in dry.output
    run = runner.invoke(main, ["prune", "--older-than", "1h", "--batch-size", "5", "--dsn", dsn])
    assert run.exit_code == 0, run.output
    assert "pruned 12 finished tasks and 0 once keys in 3 batches" in run.output
    bad = runner.invoke(main, ["prune", "--older-than", "a while", "--dsn", dsn])
    assert bad.exit_code != 0 and "invalid duration" in bad.output
    assert scalar(dsn, "SELECT count(*) FROM pgidem.tasks") == 2


def test_worker_with_prune_interval_prunes_while_it_claims(dsn: str, tmp_path: Path) -> None:
    """`pgidem worker --prune-interval ... --prune-older-than 1h`: old finished tasks vanish
    in batches while the worker keeps running new tasks; recent ones stay."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(effects_app.EFFECTS_DDL)
        finished(conn, "old", 250, "2 hours")
        finished(conn, "recent", 5, "10 minutes")
    app = pgidem.App(dsn)
    args = ("--prune-interval", "0.5", "--prune-older-than", "1h", "--prune-batch-size", "100")
    with worker_processes(dsn, tmp_path, 1, *args, "--poll-interval", "0.2") as procs:
        handles = [app.enqueue("echo", {"value": i}) for i in range(5)]
        assert [h.result(timeout=60) for h in handles] == [{"value": i} for i in range(5)]
        wait_until(
            lambda: scalar(dsn, "SELECT count(*) FROM pgidem.tasks WHERE task_name = 'old'") == 0,
            timeout=60,
            message="the worker's pruner to delete the old tasks",
        )
        log = procs[0].log()
    app.close()
    assert scalar(dsn, "SELECT count(*) FROM pgidem.tasks WHERE task_name = 'recent'") == 5
    runs = [json.loads(line) for line in log.splitlines() if '"prune_finished"' in line]
    assert sum(r["tasks"] for r in runs) == 250
    assert sum(r["batches"] for r in runs) >= 3  # batches of at most 100


def test_in_process_pruner_thread_stops_with_the_worker(dsn: str) -> None:
    """The pruner runs on its own thread and ends when the worker stops."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        finished(conn, "old", 3, "8 days")
    with thread_worker(effects_app.app, dsn, prune_interval=0.2):
        wait_until(
            lambda: scalar(dsn, "SELECT count(*) FROM pgidem.tasks") == 0,
            timeout=30,
            message="the pruner to use the default retention of 7 days",
        )
    wait_until(
        lambda: not any(t.name == "pgidem-pruner" for t in threading.enumerate()),
        timeout=10,
        message="the pruner thread to end",
    )


def test_bad_worker_prune_settings_are_refused_before_anything_runs() -> None:
    """Out-of-range pruner settings on a Worker, or a bad --prune-interval, are InvalidInput /
    a clear CLI error; nothing connects."""
    for setting in ({"prune_interval": -1}, {"prune_batch_size": 0}, {"prune_older_than": -5}):
        with pytest.raises(pgidem.InvalidInput, match="prune"):
            pgidem.Worker(effects_app.app, **setting)
    result = CliRunner().invoke(
        main, ["worker", "--app", "tests.apps.effects_app:app", "--prune-interval", "soon"]
    )
    assert result.exit_code == 1 and "invalid duration 'soon'" in result.output
