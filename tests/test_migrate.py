"""Migrations: schema.sql matches them, migrate is idempotent and concurrent-safe, and code
refuses a schema that is older or newer than itself."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

import pgidem
from pgidem import _migrate, _sql
from pgidem.worker import Worker, WorkerConfig
from tests.helpers import ROOT

# Each query returns (kind, identity, definition) rows describing one sort of catalog object in
# schema pgidem; two databases have the same schema when they return the same rows.
CATALOG_QUERIES = {
    "relation": """
        SELECT c.relname, c.relkind::text || ' persistence=' || c.relpersistence::text
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'pgidem'
    """,
    "column": """
        SELECT c.relname || '.' || a.attname,
               'position=' || row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum)
               || ' type=' || format_type(a.atttypid, a.atttypmod)
               || ' not_null=' || a.attnotnull
               || ' default=' || coalesce(pg_get_expr(d.adbin, d.adrelid), '-')
               || ' identity=' || a.attidentity::text || ' generated=' || a.attgenerated::text
               || ' collation=' || coalesce(a.attcollation::regcollation::text, '-')
          FROM pg_attribute a
          JOIN pg_class c ON c.oid = a.attrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE n.nspname = 'pgidem' AND a.attnum > 0 AND NOT a.attisdropped
           AND c.relkind IN ('r', 'v', 'm', 'p', 'f')
    """,
    "constraint": """
        SELECT c.conrelid::regclass::text || '.' || c.conname,
               c.contype::text || ' ' || pg_get_constraintdef(c.oid)
               || ' deferrable=' || c.condeferrable || ' validated=' || c.convalidated
          FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
         WHERE n.nspname = 'pgidem'
    """,
    "index": """
        SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'pgidem'
    """,
    "function": """
        SELECT p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
               pg_get_functiondef(p.oid)
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'pgidem'
    """,
    "view": """
        SELECT viewname, definition FROM pg_views WHERE schemaname = 'pgidem'
    """,
    "sequence": """
        SELECT sequencename,
               data_type::text || ' start=' || start_value || ' min=' || min_value
               || ' max=' || max_value || ' increment=' || increment_by
               || ' cycle=' || cycle || ' cache=' || cache_size
          FROM pg_sequences WHERE schemaname = 'pgidem'
    """,
    "trigger": """
        SELECT c.relname || '.' || t.tgname, pg_get_triggerdef(t.oid)
          FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'pgidem' AND NOT t.tgisinternal
    """,
    "type": """
        SELECT t.typname, t.typtype::text || ' ' || coalesce(
                   (SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
                      FROM pg_enum e WHERE e.enumtypid = t.oid), '')
          FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
         WHERE n.nspname = 'pgidem' AND t.typtype IN ('e', 'd', 'c')
           AND NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.reltype = t.oid)
    """,
    "comment": """
        SELECT d.classoid::regclass::text || ':' || d.objoid || ':' || d.objsubid, d.description
          FROM pg_description d
         WHERE d.objoid IN (SELECT c.oid FROM pg_class c JOIN pg_namespace n
                              ON n.oid = c.relnamespace WHERE n.nspname = 'pgidem')
            OR d.objoid IN (SELECT p.oid FROM pg_proc p JOIN pg_namespace n
                              ON n.oid = p.pronamespace WHERE n.nspname = 'pgidem')
    """,
    "migration": """
        SELECT version::text, name FROM pgidem.migrations
    """,
}


def catalog(dsn: str) -> dict[tuple[str, str], str]:
    """Every object of schema pgidem, as (kind, identity) -> definition."""
    found: dict[tuple[str, str], str] = {}
    with psycopg.connect(dsn, autocommit=True) as c:
        for kind, query in CATALOG_QUERIES.items():
            for identity, definition in c.execute(query).fetchall():
                found[(kind, identity)] = definition
    return found


def differences(left: dict[tuple[str, str], str], right: dict[tuple[str, str], str]) -> list[str]:
    out = []
    for key in sorted(left.keys() | right.keys()):
        kind, name = key
        if key not in right:
            out.append(f"{kind} {name}: only in the migrations: {left[key]}")
        elif key not in left:
            out.append(f"{kind} {name}: only in schema.sql: {right[key]}")
        elif left[key] != right[key]:
            out.append(
                f"{kind} {name}: migrations\n    {left[key]}\n  schema.sql\n    {right[key]}"
            )
    return out


def test_schema_sql_matches_the_migrations(dsn: str, make_database: Callable[[], str]) -> None:
    """A database built from sql/schema.sql has exactly the catalog of one built by the
    migrations: columns, constraints, indexes, functions, views, sequences, triggers, comments
    and the migrations rows; and a difference is reported. Failing? Run bin/schema-dump."""
    from_schema = make_database()
    with psycopg.connect(from_schema, autocommit=True) as c:
        c.execute(_sql.schema_sql().encode())
    migrated, dumped = catalog(dsn), catalog(from_schema)
    diff = differences(migrated, dumped)
    assert not diff, "sql/schema.sql differs from the migrations (run bin/schema-dump):\n" + (
        "\n".join(diff)
    )
    assert (
        "function",
        "enqueue(task_name text, args jsonb, queue text, idempotency_key text, "
        "run_at timestamp with time zone, priority integer, max_attempts integer)",
    ) in migrated
    # The database built from schema.sql is one pgidem accepts as current.
    with psycopg.connect(from_schema, autocommit=True) as c:
        _migrate.check(c)
        assert _migrate.migrate(c) == []
        # And the comparison is not vacuous: a changed constraint and a missing index show.
        c.execute("ALTER TABLE pgidem.tasks DROP CONSTRAINT tasks_priority_range")
        c.execute(
            "ALTER TABLE pgidem.tasks ADD CONSTRAINT tasks_priority_range CHECK (priority < 9)"
        )
        c.execute("DROP INDEX pgidem.tasks_lease_expiry")
    diff = differences(migrated, catalog(from_schema))
    assert [d.split(":")[0] for d in diff] == [
        "constraint pgidem.tasks.tasks_priority_range",
        "index tasks_lease_expiry",
        "relation tasks_lease_expiry",
    ], diff
    assert "only in the migrations" in diff[1]


def test_migrate_is_a_noop_when_current(conn: psycopg.Connection[Any]) -> None:
    """On a migrated database, migrate applies nothing and leaves the migrations rows alone."""
    before = conn.execute("SELECT version, applied_at FROM pgidem.migrations").fetchall()
    assert _migrate.migrate(conn) == []
    assert _migrate.migrate(conn) == []
    assert conn.execute("SELECT version, applied_at FROM pgidem.migrations").fetchall() == before
    assert _migrate.database_version(conn) == _migrate.code_version()


def test_migrate_applies_every_migration_in_order(make_database: Callable[[], str]) -> None:
    """On an empty database, migrate applies 1..N and records each one."""
    with psycopg.connect(make_database(), autocommit=True) as c:
        assert _migrate.database_version(c) is None
        applied = _migrate.migrate(c)
        expected = [m.version for m in _sql.migrations()]
        assert applied == expected
        rows = c.execute("SELECT version, name FROM pgidem.migrations ORDER BY version").fetchall()
        assert rows == [(m.version, m.name) for m in _sql.migrations()]


def _cli(*args: str, dsn: str | None = None, **kwargs: Any) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "PGIDEM_DSN"}
    if dsn is not None:
        env["PGIDEM_DSN"] = dsn
    return subprocess.Popen(
        [sys.executable, "-m", "pgidem", "--log-json", *args],
        env={**env, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        **kwargs,
    )


def test_concurrent_migrate_processes_apply_once(make_database: Callable[[], str]) -> None:
    """Three `pgidem migrate` processes started at once on a fresh database all succeed; the
    schema is applied exactly once (one of them reports it, the others find it current), and
    no advisory lock outlives the migration (it is transaction-level)."""
    target = make_database()
    procs = [_cli("migrate", dsn=target) for _ in range(3)]
    outputs = [p.communicate(timeout=120) for p in procs]
    codes = [p.returncode for p in procs]
    assert codes == [0, 0, 0], outputs
    applied = [out for out, _ in outputs if out.startswith("applied migrations")]
    current = [out for out, _ in outputs if "up to date" in out]
    assert len(applied) == 1 and len(current) == 2, outputs
    with psycopg.connect(target, autocommit=True) as c:
        versions = [r[0] for r in c.execute("SELECT version FROM pgidem.migrations ORDER BY 1")]
        assert versions == [m.version for m in _sql.migrations()]
        locks = c.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone()
        assert locks == (0,)


@pytest.fixture
def too_new(dsn: str) -> str:
    """The test database with a migration recorded that this code does not know."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(
            "INSERT INTO pgidem.migrations (version, name) VALUES (%s, 'from_the_future')",
            (_migrate.code_version() + 1,),
        )
    return dsn


def test_schema_too_new_refuses_migrate(too_new: str) -> None:
    """migrate (Python and CLI) refuses a schema newer than the code and says to upgrade."""
    newer = _migrate.code_version() + 1
    with psycopg.connect(too_new, autocommit=True) as c, pytest.raises(pgidem.SchemaTooNew) as exc:
        _migrate.migrate(c)
    assert f"version {newer}" in str(exc.value) and "upgrade pgidem" in str(exc.value)
    proc = _cli("migrate", dsn=too_new)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "newer than this pgidem" in err and "upgrade pgidem" in err


def test_schema_too_new_refuses_enqueue(too_new: str) -> None:
    """App.enqueue, with or without conn=, refuses a schema newer than the code."""
    with pgidem.App(too_new) as app, pytest.raises(pgidem.SchemaTooNew, match="upgrade pgidem"):
        app.enqueue("charge", {})
    too_new_error = pytest.raises(pgidem.SchemaTooNew, match="upgrade pgidem")
    with pgidem.App(too_new) as app, psycopg.connect(too_new) as c, too_new_error:
        app.enqueue("charge", {}, conn=c)
    with psycopg.connect(too_new, autocommit=True) as c:
        assert c.execute("SELECT count(*) FROM pgidem.tasks").fetchone() == (0,)


def test_schema_too_new_refuses_worker_start(too_new: str) -> None:
    """A worker refuses to start on a schema newer than the code (before claiming anything)."""
    app = pgidem.App(too_new)

    @app.task()
    def noop(ctx: pgidem.Context) -> None:
        return None

    with pytest.raises(pgidem.SchemaTooNew, match="upgrade pgidem"):
        Worker(app, WorkerConfig(queues=["default"])).run(install_signals=False)
    app.close()


def test_no_schema_says_run_migrate(make_database: Callable[[], str]) -> None:
    """Enqueue and worker start on a database that was never migrated raise SchemaOutdated
    telling the user to run `pgidem migrate`; the CLI exits 1 with that message."""
    empty = make_database()
    with pgidem.App(empty) as app:
        app.task(name="charge")(lambda ctx: None)
        with pytest.raises(pgidem.SchemaOutdated, match="run `pgidem migrate`"):
            app.enqueue("charge", {})
        with pytest.raises(pgidem.SchemaOutdated, match="run `pgidem migrate`"):
            Worker(app, WorkerConfig(queues=["default"])).run(install_signals=False)
    outdated = pytest.raises(pgidem.SchemaOutdated, match="run `pgidem migrate`")
    with pgidem.App(empty) as app, psycopg.connect(empty) as c, outdated:
        app.enqueue("charge", {}, conn=c)
    proc = _cli("enqueue", "charge", dsn=empty)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "run `pgidem migrate`" in err, err


def test_older_schema_says_run_migrate(conn: psycopg.Connection[Any]) -> None:
    """A database behind the code (its last migration row removed) raises SchemaOutdated
    naming both versions."""
    latest = _migrate.code_version()
    conn.execute("DELETE FROM pgidem.migrations WHERE version = %s", (latest,))
    with pytest.raises(pgidem.SchemaOutdated) as exc:
        _migrate.check(conn)
    assert f"version {latest - 1}" in str(exc.value) and f"needs {latest}" in str(exc.value)
    assert "run `pgidem migrate`" in str(exc.value)


@pytest.fixture
def older(dsn: str) -> str:
    """The test database with its last migration's row removed: to pgidem, a schema one
    version behind the code."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("DELETE FROM pgidem.migrations WHERE version = %s", (_migrate.code_version(),))
    return dsn


def test_older_schema_refuses_enqueue_and_worker(older: str) -> None:
    """Enqueue (Python, with and without conn=, and the CLI) and a worker (Python and the CLI)
    refuse a database whose schema is behind the code, saying to run `pgidem migrate`; nothing
    is enqueued."""
    latest = _migrate.code_version()

    def outdated() -> Any:
        return pytest.raises(pgidem.SchemaOutdated, match="run `pgidem migrate`")

    with pgidem.App(older) as app, outdated() as exc:
        app.enqueue("charge", {})
    assert f"version {latest - 1}, this code needs {latest}" in str(exc.value)
    with pgidem.App(older) as app, psycopg.connect(older) as c, outdated():
        app.enqueue("charge", {}, conn=c)
    app = pgidem.App(older)

    @app.task()
    def noop(ctx: pgidem.Context) -> None:
        return None

    with outdated():
        Worker(app, WorkerConfig(queues=["default"])).run(install_signals=False)
    app.close()
    enqueue = _cli("enqueue", "charge", dsn=older)
    _, err = enqueue.communicate(timeout=60)
    assert enqueue.returncode == 1 and "run `pgidem migrate`" in err, err
    worker = _cli("worker", "--app", "tests.apps.worker_app:app", dsn=older)
    _, err = worker.communicate(timeout=60)
    assert worker.returncode == 1 and "run `pgidem migrate`" in err, err
    with psycopg.connect(older, autocommit=True) as c:
        assert c.execute("SELECT count(*) FROM pgidem.tasks").fetchone() == (0,)
