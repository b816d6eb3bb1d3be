"""Operating pgidem from the command line and psql: `pgidem status`, `show`, `retry`, `cancel`
(their output, and a non-zero exit with a clear message on a bad id or state), and the views
pgidem.task_overview and pgidem.queue_stats, on history made by a real worker process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

import pgidem
from pgidem.cli import main
from tests.apps.worker_app import LEDGER_DDL
from tests.helpers import ROOT, rows, wait_until


def cli(dsn: str, *args: str) -> Any:
    return CliRunner().invoke(main, [*args[:1], "--dsn", dsn, *args[1:]])


@pytest.fixture
def history(dsn: str, conn: psycopg.Connection[Any], app: pgidem.App, spawn_worker: Any) -> Any:
    """A succeeded task, a dead one, a queued one in a queue nobody serves, and a live worker."""
    conn.execute(LEDGER_DDL)
    ok = app.enqueue("write", {"n": 1})
    dead = app.enqueue("always_fails", {"n": 2}, max_attempts=1)
    waiting = app.enqueue("write", {"n": 3}, queue="elsewhere")
    worker = spawn_worker(dsn, "--concurrency", "1")
    ok.result(timeout=30)
    wait_until(lambda: dead.state == "dead", 30, message="the failing task to die")
    return {"ok": ok.id, "dead": dead.id, "waiting": waiting.id, "worker": worker}


def check_status_shows_queues_states_and_live_workers(dsn: str, history: Any) -> None:
    """`pgidem status`: a row per queue with counts by state and the oldest wait, and the
    live workers."""
    result = cli(dsn, "status")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(line for line in lines if line.startswith("queue"))
    assert header.split() == [
        "queue",
        "available",
        "scheduled",
        "running",
        "succeeded",
        "dead",
        "cancelled",
        "oldest_wait_s",
    ]
    default = next(line.split() for line in lines if line.startswith("default "))
    assert default[:7] == ["default", "0", "0", "0", "1", "1", "0"]
    elsewhere = next(line.split() for line in lines if line.startswith("elsewhere "))
    assert elsewhere[:7] == ["elsewhere", "1", "0", "0", "0", "0", "0"]
    assert float(elsewhere[7]) >= 0
    assert "workers: 1" in lines
    (worker_id,) = [r[0] for r in rows(dsn, "SELECT id FROM pgidem.workers")]
    assert any(line.startswith(worker_id) for line in lines)


def check_show_prints_the_task_its_attempts_and_outcome(dsn: str, history: Any) -> None:
    """`pgidem show ID`: the task's fields, every attempt with token, worker, times and how it
    ended, and the outcome with its token; `--json` gives the same as JSON."""
    (token, worker_id) = rows(
        dsn,
        "SELECT fencing_token, worker_id FROM pgidem.attempts WHERE task_id = %s",
        (history["dead"],),
    )[0]
    result = cli(dsn, "show", str(history["dead"]))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "state: dead" in out
    assert f"outcome: dead (token {token})" in out
    assert "ValueError" in out
    attempt_line = next(line for line in out.splitlines() if line.startswith(str(token)))
    assert attempt_line.split()[:4] == [str(token), "1", "failed", worker_id]

    result = cli(dsn, "show", str(history["ok"]), "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["task"]["state"] == "succeeded"
    assert shown["task"]["outcome_result"]["n"] == 1
    assert [a["status"] for a in shown["attempts"]] == ["succeeded"]


def test_retry_and_cancel_change_state_or_refuse_clearly(dsn: str, history: Any) -> None:
    """`pgidem retry` puts a dead task back (and a worker runs it again); `pgidem cancel`
    cancels a queued task; on a bad id or a task in the wrong state each exits 1 with a message
    that says what was wrong, changing nothing."""
    result = cli(dsn, "cancel", str(history["waiting"]))
    assert (result.exit_code, result.stdout.strip()) == (
        0,
        f"task {history['waiting']}: queued -> cancelled",
    )
    result = cli(dsn, "cancel", str(history["waiting"]))
    assert result.exit_code == 1
    assert f"task {history['waiting']} is cancelled, only a queued or running" in result.output

    result = cli(dsn, "retry", str(history["ok"]))
    assert result.exit_code == 1
    assert f"task {history['ok']} is succeeded, only a dead or cancelled" in result.output
    result = cli(dsn, "retry", str(history["dead"]))
    assert (result.exit_code, result.stdout.strip()) == (
        0,
        f"task {history['dead']}: dead -> queued",
    )
    # The worker picks it up again (it fails again: max_attempts 1).
    wait_until(
        lambda: (
            len(rows(dsn, "SELECT 1 FROM pgidem.attempts WHERE task_id = %s", (history["dead"],)))
            == 2
        ),
        30,
        message="the retried task to run again",
    )

    for command in ("show", "retry", "cancel"):
        result = cli(dsn, command, "987654")
        assert result.exit_code == 1, command
        assert "no task with id 987654" in result.output, command
    result = cli(dsn, "show", "abc")
    assert result.exit_code == 2 and "is not a valid integer" in result.output
    assert rows(dsn, "SELECT state FROM pgidem.tasks WHERE id = %s", (history["ok"],)) == [
        ("succeeded",)
    ]


def test_status_show_and_views_on_a_worker_history(dsn: str, history: Any) -> None:
    """One history made by a real worker, read three ways (each check says what it checks)."""
    check_status_shows_queues_states_and_live_workers(dsn, history)
    check_show_prints_the_task_its_attempts_and_outcome(dsn, history)
    check_psql_views_have_a_row_per_task_and_per_queue(dsn, history)


def test_real_command_exits_non_zero_with_message(dsn: str) -> None:
    """The installed command (a real process) prints `Error: ...` on stderr and exits 1."""
    proc = subprocess.run(
        [sys.executable, "-m", "pgidem", "show", "424242"],
        env={**os.environ, "PGIDEM_DSN": dsn, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "Error: no task with id 424242" in proc.stderr


def check_psql_views_have_a_row_per_task_and_per_queue(dsn: str, history: Any) -> None:
    """pgidem.task_overview: one row per task with its latest attempt and outcome;
    pgidem.queue_stats: one row per queue with counts by state."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.row_factory = psycopg.rows.dict_row
        overview = {r["id"]: r for r in c.execute("SELECT * FROM pgidem.task_overview").fetchall()}
        stats = {r["queue"]: r for r in c.execute("SELECT * FROM pgidem.queue_stats").fetchall()}
    assert set(overview) == {history["ok"], history["dead"], history["waiting"]}
    dead = overview[history["dead"]]
    assert (dead["state"], dead["last_attempt_status"], dead["last_error_class"]) == (
        "dead",
        "failed",
        "ValueError",
    )
    assert dead["outcome_state"] == "dead" and dead["outcome_error"]["class"] == "ValueError"
    ok = overview[history["ok"]]
    assert (ok["last_attempt_status"], ok["outcome_state"], ok["result"]["n"]) == (
        "succeeded",
        "succeeded",
        1,
    )
    waiting = overview[history["waiting"]]
    assert waiting["last_attempt_status"] is None and waiting["outcome_state"] is None
    assert (stats["default"]["succeeded"], stats["default"]["dead"]) == (1, 1)
    assert stats["elsewhere"]["available"] == 1
    assert stats["elsewhere"]["oldest_available_age"].total_seconds() >= 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--app", "tests.apps.worker_app:app", "--lease", "0.5"], "lease must be 1 to 86400"),
        (["--app", "tests.apps.worker_app:app", "--concurrency", "0"], "concurrency must be"),
        (["--app", "tests.apps.no_such_module:app"], "cannot import 'tests.apps.no_such_module'"),
        (["--app", "tests.apps.worker_app:nothing"], "is not a pgidem.App"),
        (["--app", "no-colon"], "--app must look like MODULE:ATTR"),
        (
            ["--app", "tests.apps.worker_app:app", "--catch-up-window", "400d"],
            "catch_up_window must be 0 to 366 days",
        ),
        (
            ["--app", "tests.apps.worker_app:app", "--catch-up-window", "soon"],
            "invalid duration 'soon'",
        ),
        (
            ["--app", "tests.apps.worker_app:app", "--max-catch-up", "0"],
            "max_catch_up must be a whole number from 1 to 100000",
        ),
    ],
    ids=[
        "lease",
        "concurrency",
        "module",
        "attribute",
        "format",
        "catch-up-window",
        "catch-up-window-format",
        "max-catch-up",
    ],
)
def test_worker_refuses_bad_settings_with_a_message(args: list[str], message: str) -> None:
    """`pgidem worker` with a bad setting or app path exits 1 and says what is wrong (before
    it connects anywhere: the DSN names no database)."""
    result = CliRunner().invoke(main, ["worker", "--dsn", "dbname=nowhere", *args])
    assert result.exit_code == 1, result.output
    assert message in result.output


def test_worker_refuses_a_database_without_the_schema(server_dsn: str) -> None:
    """`pgidem worker` on a reachable database where pgidem was never migrated exits 1 at once
    and says to run `pgidem migrate` (it waits only for a database it cannot reach)."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    name = f"pgidem_unmigrated_{os.getpid()}"
    with psycopg.connect(server_dsn, autocommit=True) as c:
        c.execute(f"DROP DATABASE IF EXISTS {name}")
        c.execute(f"CREATE DATABASE {name}")
    try:
        dsn = make_conninfo(**{**conninfo_to_dict(server_dsn), "dbname": name})
        before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        result = CliRunner().invoke(
            main, ["worker", "--dsn", dsn, "--app", "tests.apps.worker_app:app"]
        )
        assert result.exit_code == 1, result.output
        assert "has no pgidem schema: run `pgidem migrate`" in result.output
        # The worker put back the signal handlers it found (here, pytest's).
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
