"""Bad input gets a specific error and writes nothing: through Python, SQL, bulk and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import structlog
from click.testing import CliRunner
from psycopg.conninfo import make_conninfo

import pgidem
from pgidem import _migrate
from pgidem.app import MAX_DELAY_S
from pgidem.cli import main
from tests.conftest import TEST_DB
from tests.helpers import ROOT

INJECTION = "x'); DROP TABLE pgidem.tasks; --"
CIRCULAR: dict[str, Any] = {}
CIRCULAR["self"] = CIRCULAR
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def shared_dsn(pg_server: Any) -> Iterator[str]:
    """One migrated database for every case that must write nothing (a fresh database per
    case would cost most of this module's time); each case checks it is still empty."""
    admin = make_conninfo(
        host=pg_server.host,
        port=pg_server.port,
        user=pg_server.user,
        dbname=pg_server.maintenance_dbname,
        password=pg_server.password or None,
    )
    name = f"{TEST_DB}_bad_input"
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}"')
        c.execute(f'CREATE DATABASE "{name}"')
    target = make_conninfo(admin, dbname=name)
    with psycopg.connect(target, autocommit=True) as c:
        _migrate.migrate(c)
    yield target
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def shared_app(shared_dsn: str) -> Iterator[pgidem.App]:
    with pgidem.App(shared_dsn) as application:
        yield application


@pytest.fixture
def empty_conn(shared_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection to the shared database, which holds no task before and after the case."""
    with psycopg.connect(shared_dsn, autocommit=True) as c:
        assert count_tasks(c) == 0, "an earlier case wrote a task"
        yield c


def count_tasks(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM pgidem.tasks").fetchone()
    assert row is not None
    return int(row[0])


def tasks_table_exists(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT to_regclass('pgidem.tasks') IS NOT NULL").fetchone()
    return bool(row and row[0])


# (case id, enqueue keyword arguments, the field the error must name)
PYTHON_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("args_list", {"args": [1, 2]}, "args"),
    ("args_string", {"args": "order=1"}, "args"),
    ("args_number", {"args": 5}, "args"),
    ("args_nan", {"args": {"amount": float("nan")}}, "args"),
    ("args_infinity", {"args": {"amount": float("inf")}}, "args"),
    ("args_minus_infinity", {"args": {"amount": float("-inf")}}, "args"),
    ("args_nul_in_value", {"args": {"note": "a\x00b"}}, "args"),
    ("args_nul_in_key", {"args": {"no\x00te": 1}}, "args"),
    ("args_nul_nested", {"args": {"items": [{"sku": "\x00"}]}}, "args"),
    ("args_not_json", {"args": {"when": object()}}, "args"),
    ("args_circular", {"args": CIRCULAR}, "args"),
    ("args_lone_surrogate", {"args": {"name": "\ud800"}}, "args"),
    ("args_lone_surrogate_key", {"args": {"\udc00": 1}}, "args"),
    ("args_over_1_mib", {"args": {"blob": "x" * MIB}}, "args"),
    ("key_nul", {"idempotency_key": "order\x001"}, "idempotency_key"),
    ("key_empty", {"idempotency_key": ""}, "idempotency_key"),
    ("key_too_long", {"idempotency_key": "k" * 256}, "idempotency_key"),
    ("key_not_text", {"idempotency_key": 12}, "idempotency_key"),
    ("key_lone_surrogate", {"idempotency_key": "order-\ud800"}, "idempotency_key"),
    ("queue_nul", {"queue": "pay\x00ments"}, "queue"),
    ("queue_empty", {"queue": ""}, "queue"),
    ("queue_too_long", {"queue": "q" * 65}, "queue"),
    ("queue_space", {"queue": "pay ments"}, "queue"),
    ("queue_leading_digit", {"queue": "1payments"}, "queue"),
    ("queue_non_ascii", {"queue": "café"}, "queue"),
    ("queue_injection", {"queue": INJECTION}, "queue"),
    ("queue_lone_surrogate", {"queue": "q\ud800"}, "queue"),
    ("task_nul", {"task": "charge\x00"}, "task_name"),
    ("task_empty", {"task": ""}, "task_name"),
    ("task_too_long", {"task": "t" * 129}, "task_name"),
    ("task_slash", {"task": "billing/charge"}, "task_name"),
    ("task_injection", {"task": INJECTION}, "task_name"),
    ("task_lone_surrogate", {"task": "charge\ud800"}, "task_name"),
    ("priority_too_high", {"priority": 32768}, "priority"),
    ("priority_too_low", {"priority": -32769}, "priority"),
    ("priority_over_int4", {"priority": 2**40}, "priority"),
    ("priority_not_int", {"priority": "1"}, "priority"),
    ("priority_bool", {"priority": True}, "priority"),
    ("max_attempts_zero", {"max_attempts": 0}, "max_attempts"),
    ("max_attempts_too_many", {"max_attempts": 1001}, "max_attempts"),
    ("max_attempts_float", {"max_attempts": 2.5}, "max_attempts"),
    ("delay_negative", {"delay": -1}, "run_at"),
    ("delay_too_far", {"delay": MAX_DELAY_S + 1}, "run_at"),
    ("delay_infinite", {"delay": float("inf")}, "run_at"),
    ("delay_nan", {"delay": float("nan")}, "run_at"),
    ("delay_not_a_number", {"delay": "10"}, "run_at"),
    ("run_at_naive", {"run_at": datetime(2030, 1, 1)}, "run_at"),
    ("run_at_too_far", {"run_at": datetime.now(UTC) + timedelta(days=400)}, "run_at"),
    ("run_at_not_datetime", {"run_at": "2030-01-01T00:00:00Z"}, "run_at"),
    (
        "run_at_and_delay",
        {"run_at": datetime.now(UTC) + timedelta(hours=1), "delay": 5},
        "run_at",
    ),
]


def _enqueue_kwargs(case: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    options = dict(case)
    task = options.pop("task", "charge")
    args = options.pop("args", {"order": 1})
    return task, args, options


@pytest.mark.parametrize(
    ("case", "field"), [(c, f) for _, c, f in PYTHON_CASES], ids=[i for i, _, _ in PYTHON_CASES]
)
def test_python_enqueue_rejects(
    shared_app: pgidem.App, empty_conn: psycopg.Connection[Any], case: dict[str, Any], field: str
) -> None:
    """App.enqueue raises InvalidInput naming the field, and writes nothing."""
    task, args, options = _enqueue_kwargs(case)
    with pytest.raises(pgidem.InvalidInput) as exc:
        shared_app.enqueue(task, args, **options)
    assert type(exc.value) is pgidem.InvalidInput
    assert exc.value.field == field, str(exc.value)
    assert str(exc.value).startswith("invalid ") or "give run_at or delay" in str(exc.value)
    assert count_tasks(empty_conn) == 0


@pytest.mark.parametrize(
    ("case", "field"), [(c, f) for _, c, f in PYTHON_CASES], ids=[i for i, _, _ in PYTHON_CASES]
)
def test_python_enqueue_many_rejects_a_bad_batch_whole(
    shared_app: pgidem.App, empty_conn: psycopg.Connection[Any], case: dict[str, Any], field: str
) -> None:
    """The same cases through enqueue_many: InvalidInput with the field, and nothing of the
    batch is written (good rows before the bad one included)."""
    task, args, options = _enqueue_kwargs(case)
    key = options.pop("idempotency_key", None)
    rows = [{"n": 1}, {"n": 2}, args]
    keys = None if "idempotency_key" not in case else ["a", "b", key]
    with pytest.raises(pgidem.InvalidInput) as exc:
        shared_app.enqueue_many(task, rows, idempotency_keys=keys, **options)
    assert exc.value.field == field, str(exc.value)
    assert count_tasks(empty_conn) == 0


@pytest.mark.parametrize(
    "case",
    [c for _, c, _ in PYTHON_CASES if "idempotency_key" not in c],
    ids=[i for i, c, _ in PYTHON_CASES if "idempotency_key" not in c],
)
def test_enqueue_many_without_keys_raises_what_the_function_path_raises(
    shared_app: pgidem.App, empty_conn: psycopg.Connection[Any], case: dict[str, Any]
) -> None:
    """Without keys, enqueue_many takes the COPY path; with keys (all None here) the SQL
    function's. The same bad input gives the same error from both: class, message (with its
    row number) and field; and neither writes anything."""
    task, args, options = _enqueue_kwargs(case)
    rows = [{"n": 1}, {"n": 2}, args]
    errors = []
    for keys in (None, [None, None, None]):
        with pytest.raises(pgidem.InvalidInput) as exc:
            shared_app.enqueue_many(task, rows, idempotency_keys=keys, **options)
        errors.append(exc.value)
    copied, by_function = errors
    assert (type(copied), str(copied), copied.field) == (
        type(by_function),
        str(by_function),
        by_function.field,
    )
    assert count_tasks(empty_conn) == 0


def test_unusual_but_valid_args_are_stored(app: pgidem.App, conn: psycopg.Connection[Any]) -> None:
    """Non-ASCII text, a literal backslash-u0000 (not a NUL) and a Mapping that is not a dict
    are fine."""
    import types

    app.enqueue("charge", {"name": "Zoë 東京 🚀", "escaped": "\\u0000"})
    app.enqueue("charge", types.MappingProxyType({"n": 1}))
    rows = conn.execute("SELECT args FROM pgidem.tasks ORDER BY id").fetchall()
    assert rows == [({"name": "Zoë 東京 🚀", "escaped": "\\u0000"},), ({"n": 1},)]


def test_none_args_mean_an_empty_object(app: pgidem.App, conn: psycopg.Connection[Any]) -> None:
    """args=None is allowed and stored as {}."""
    app.enqueue("charge", None)
    assert conn.execute("SELECT args FROM pgidem.tasks").fetchone() == ({},)


def test_limits_themselves_are_accepted(app: pgidem.App, conn: psycopg.Connection[Any]) -> None:
    """Exactly at every documented limit is allowed: 128-character task name, 64-character
    queue, 255-character key, priority -32768 and 32767, max_attempts 1 and 1000, a delay of
    366 days minus a minute, args of exactly pgidem.max_args_bytes."""
    app.enqueue("t" * 128, {}, queue="q" * 64, idempotency_key="k" * 255, priority=32767)
    app.enqueue("a_b.c:d-e", {}, queue="_x.y:z-1", priority=-32768, max_attempts=1)
    app.enqueue("charge", {}, max_attempts=1000, delay=MAX_DELAY_S - 60)
    conn.execute(f'ALTER DATABASE "{conn.info.dbname}" SET pgidem.max_args_bytes = 10')
    with pgidem.App(conn.info.dsn) as fresh:
        fresh.enqueue("charge", {"a": 12})  # {"a": 12} is 9 bytes as jsonb text
        fresh.enqueue("charge", {"a": 123})  # 10 bytes: at the limit
        with pytest.raises(pgidem.InvalidInput, match="over the limit of 10 bytes"):
            fresh.enqueue("charge", {"a": 1234})
    assert count_tasks(conn) == 5


def test_args_of_exactly_1_mib_are_accepted(app: pgidem.App, conn: psycopg.Connection[Any]) -> None:
    """The default limit is 1 MiB of JSON text (as PostgreSQL prints it): exactly that is
    stored; one byte more is refused (case args_over_1_mib)."""
    overhead = len('{"blob": ""}')
    app.enqueue("charge", {"blob": "x" * (MIB - overhead)})
    assert conn.execute("SELECT octet_length(args::text) FROM pgidem.tasks").fetchone() == (MIB,)


def test_injection_shaped_key_and_args_are_stored_as_data(
    app: pgidem.App, conn: psycopg.Connection[Any]
) -> None:
    """A key and args shaped like SQL injection are stored verbatim and never executed;
    the same in a task name or queue is rejected. The table is still there."""
    handle = app.enqueue("charge", {"note": INJECTION, INJECTION: 1}, idempotency_key=INJECTION)
    assert app.enqueue(
        "charge", {"note": INJECTION, INJECTION: 1}, idempotency_key=INJECTION
    ).id == (handle.id)
    for bad in ({"task": INJECTION}, {"queue": INJECTION}):
        task, args, options = _enqueue_kwargs(bad)
        with pytest.raises(pgidem.InvalidInput):
            app.enqueue(task, args, **options)
    assert tasks_table_exists(conn)
    assert conn.execute("SELECT idempotency_key, args->>'note' FROM pgidem.tasks").fetchall() == [
        (INJECTION, INJECTION)
    ]


def test_registering_a_task_with_bad_defaults_is_refused(shared_app: pgidem.App) -> None:
    """@app.task refuses max_attempts and priority of the wrong type or range at once."""
    with pytest.raises(pgidem.InvalidInput) as exc:
        shared_app.task(max_attempts=0)
    assert exc.value.field == "max_attempts"
    with pytest.raises(pgidem.InvalidInput) as exc:
        shared_app.task(priority=1.5)  # type: ignore[arg-type]
    assert exc.value.field == "priority"
    with pytest.raises(pgidem.InvalidInput) as exc:
        shared_app.task(name="a\x00b")(lambda ctx: None)
    assert exc.value.field == "task_name"


def test_enqueue_many_bad_row_in_a_later_batch_writes_nothing(
    app: pgidem.App, conn: psycopg.Connection[Any]
) -> None:
    """A bad row in the third batch: the two batches before it are rolled back too (one
    transaction), and the message names the row's position in the whole call (1-based)."""
    rows: list[Any] = [{"n": i} for i in range(2500)]
    keys: list[str | None] = [None] * 2500
    keys[2200] = "k" * 300
    with pytest.raises(pgidem.InvalidInput, match=r"^row 2201: invalid idempotency key") as exc:
        app.enqueue_many("charge", rows, idempotency_keys=keys, batch_size=1000)
    assert exc.value.field == "idempotency_key"
    assert count_tasks(conn) == 0
    app.enqueue("charge", {"n": 0}, idempotency_key="taken")
    rows[1500], keys[2200] = {"n": -1}, None
    keys[1500] = "taken"
    with pytest.raises(pgidem.IdempotencyKeyMismatch, match=r"row 1501: existing task"):
        app.enqueue_many("charge", rows, idempotency_keys=keys, batch_size=1000)
    assert count_tasks(conn) == 1


def test_enqueue_many_python_side_checks(
    shared_app: pgidem.App, empty_conn: psycopg.Connection[Any]
) -> None:
    """Keys that do not match the args in number, and a batch size under 1, are refused."""
    with pytest.raises(pgidem.InvalidInput, match="2 keys for 3 args") as exc:
        shared_app.enqueue_many("charge", [{}, {}, {}], idempotency_keys=["a", "b"])
    assert exc.value.field == "idempotency_key"
    with pytest.raises(pgidem.InvalidInput, match="batch_size"):
        shared_app.enqueue_many("charge", [{}], batch_size=0)
    assert count_tasks(empty_conn) == 0


# (case id, SQL arguments after the task name, the column the error must name)
SQL_CASES: list[tuple[str, str, str]] = [
    ("args_array", "'charge', '[1, 2]'", "args"),
    ("args_string", "'charge', '\"s\"'", "args"),
    ("args_number", "'charge', '5'", "args"),
    ("args_json_null", "'charge', 'null'", "args"),
    ("args_sql_null", "'charge', NULL", "args"),
    ("key_empty", "'charge', idempotency_key => ''", "idempotency_key"),
    ("key_too_long", "'charge', idempotency_key => repeat('k', 256)", "idempotency_key"),
    ("queue_empty", "'charge', queue => ''", "queue"),
    ("queue_null", "'charge', queue => NULL", "queue"),
    ("queue_too_long", "'charge', queue => repeat('q', 65)", "queue"),
    ("queue_space", "'charge', queue => 'pay ments'", "queue"),
    ("task_empty", "''", "task_name"),
    ("task_null", "NULL", "task_name"),
    ("task_too_long", "repeat('t', 129)", "task_name"),
    ("task_injection", "'x''); DROP TABLE pgidem.tasks; --'", "task_name"),
    ("priority_high", "'charge', priority => 32768", "priority"),
    ("priority_null", "'charge', priority => NULL", "priority"),
    ("max_attempts_zero", "'charge', max_attempts => 0", "max_attempts"),
    ("max_attempts_high", "'charge', max_attempts => 1001", "max_attempts"),
    ("run_at_far", "'charge', run_at => now() + interval '400 days'", "run_at"),
    ("run_at_infinity", "'charge', run_at => 'infinity'", "run_at"),
]


@pytest.mark.parametrize(
    ("sql_args", "column"), [(a, c) for _, a, c in SQL_CASES], ids=[i for i, _, _ in SQL_CASES]
)
def test_sql_enqueue_rejects(
    empty_conn: psycopg.Connection[Any], sql_args: str, column: str
) -> None:
    """pgidem.enqueue raises SQLSTATE PI002 with the column named, and writes nothing."""
    with pytest.raises(psycopg.Error) as exc:
        empty_conn.execute(f"SELECT pgidem.enqueue({sql_args})")
    assert exc.value.sqlstate == "PI002"
    assert exc.value.diag.column_name == column
    assert count_tasks(empty_conn) == 0
    assert tasks_table_exists(empty_conn)


def test_sql_args_size_setting(conn: psycopg.Connection[Any]) -> None:
    """pgidem.max_args_bytes (here set for the session) is the limit pgidem.enqueue applies."""
    conn.execute("SET pgidem.max_args_bytes = 100")
    conn.execute("SELECT pgidem.enqueue('charge', jsonb_build_object('a', repeat('x', 80)))")
    with pytest.raises(psycopg.Error) as exc:
        conn.execute("SELECT pgidem.enqueue('charge', jsonb_build_object('a', repeat('x', 100)))")
    assert exc.value.sqlstate == "PI002" and exc.value.diag.column_name == "args"
    assert "over the limit of 100 bytes" in (exc.value.diag.message_primary or "")
    conn.execute("RESET pgidem.max_args_bytes")
    conn.execute("SELECT pgidem.enqueue('charge', jsonb_build_object('a', repeat('x', 1000)))")
    with pytest.raises(psycopg.Error) as exc:
        conn.execute(
            "SELECT pgidem.enqueue('charge', jsonb_build_object('a', repeat('x', 1024 * 1024)))"
        )
    assert "over the limit of 1048576 bytes" in (exc.value.diag.message_primary or "")
    assert count_tasks(conn) == 2


@pytest.mark.parametrize(
    ("literal", "sqlstate"),
    [
        ("'{\"a\": NaN}'", "22P02"),
        ("'{\"a\": Infinity}'", "22P02"),
        ('\'{"a": "\\u0000"}\'', "22P05"),
    ],
    ids=["nan", "infinity", "nul"],
)
def test_sql_jsonb_itself_refuses_nan_and_nul(
    empty_conn: psycopg.Connection[Any], literal: str, sqlstate: str
) -> None:
    """From SQL, NaN, Infinity and NUL never reach pgidem.enqueue: jsonb refuses them."""
    with pytest.raises(psycopg.Error) as exc:
        empty_conn.execute(f"SELECT pgidem.enqueue('charge', {literal}::jsonb)")
    assert exc.value.sqlstate == sqlstate
    assert count_tasks(empty_conn) == 0


@pytest.mark.parametrize(
    ("sql_args", "column", "row"),
    [
        ("ARRAY['{}', '[1]']::jsonb[]", "args", 2),
        ("ARRAY['{}', NULL]::jsonb[]", "args", 2),
        (
            "ARRAY['{}', '{}', '{}']::jsonb[], idempotency_keys => ARRAY['a', '', 'c']",
            "idempotency_key",
            2,
        ),
        (
            "ARRAY['{}', '{}']::jsonb[], idempotency_keys => ARRAY['a', repeat('k', 256)]",
            "idempotency_key",
            2,
        ),
        ("ARRAY['{}', '{}']::jsonb[], idempotency_keys => ARRAY['a']", "idempotency_key", None),
        ("ARRAY['{}']::jsonb[], queue => 'a b'", "queue", None),
        ("ARRAY['{}']::jsonb[], priority => 40000", "priority", None),
    ],
    ids=["args_array", "args_null", "key_empty", "key_long", "key_count", "queue", "priority"],
)
def test_sql_enqueue_many_rejects_the_whole_batch(
    empty_conn: psycopg.Connection[Any], sql_args: str, column: str, row: int | None
) -> None:
    """pgidem.enqueue_many raises PI002 for a bad row or option (naming the row), and writes
    none of the batch."""
    with pytest.raises(psycopg.Error) as exc:
        empty_conn.execute(f"SELECT * FROM pgidem.enqueue_many('charge', {sql_args})")
    assert exc.value.sqlstate == "PI002"
    assert exc.value.diag.column_name == column
    if row is not None:
        assert (exc.value.diag.message_primary or "").startswith(f"row {row}: ")
    assert count_tasks(empty_conn) == 0


@pytest.fixture
def cli() -> Iterator[CliRunner]:
    """Click's runner for in-process CLI calls; structlog is reset afterwards, since the CLI
    configures it to write to the runner's (then closed) stderr."""
    yield CliRunner()
    structlog.reset_defaults()


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--args", "[1, 2]"], 1, "invalid args: they must be a JSON object"),
        (["--args", '{"a": NaN}'], 1, "NaN and infinity are not JSON"),
        (["--args", "{order: 1}"], 2, "not valid JSON"),
        (["--key", ""], 1, "invalid idempotency key"),
        (["--queue", "a b"], 1, "invalid queue name"),
        (["--priority", "99999"], 1, "invalid priority 99999"),
        (["--priority", "high"], 2, "'high' is not a valid integer"),
        (["--max-attempts", "0"], 1, "invalid max_attempts 0"),
        (["--delay", "-5"], 1, "invalid delay"),
        (["--run-at", "2030-01-01T00:00:00"], 1, "naive datetime"),
        (["--run-at", "soon"], 2, "not an ISO 8601 time"),
        (["--run-at", "2030-01-01T00:00:00+00:00", "--delay", "5"], 1, "not both"),
    ],
    ids=[
        "args_list",
        "args_nan",
        "args_bad_json",
        "key_empty",
        "queue",
        "priority_range",
        "priority_type",
        "max_attempts",
        "delay",
        "run_at_naive",
        "run_at_garbage",
        "both",
    ],
)
def test_cli_enqueue_rejects(
    cli: CliRunner,
    shared_dsn: str,
    empty_conn: psycopg.Connection[Any],
    argv: list[str],
    code: int,
    message: str,
) -> None:
    """`pgidem enqueue` with bad input exits non-zero with a clear message, writing nothing."""
    result = cli.invoke(main, ["--log-json", "enqueue", "charge", "--dsn", shared_dsn, *argv])
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert count_tasks(empty_conn) == 0


def test_cli_enqueue_bad_args_in_a_real_process(
    shared_dsn: str, empty_conn: psycopg.Connection[Any]
) -> None:
    """The real command: bad --args JSON exits 2 with a one-line usage error, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "pgidem", "enqueue", "charge", "--args", "{not json"],
        env={**os.environ, "PGIDEM_DSN": shared_dsn, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "Invalid value for --args: not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert count_tasks(empty_conn) == 0


def test_enqueue_many_on_an_autocommit_conn_is_one_transaction(
    shared_app: pgidem.App, empty_conn: psycopg.Connection[Any]
) -> None:
    """With conn= an autocommit connection, a bad row in the third batch leaves nothing of
    the first two (regression: each batch used to commit on its own)."""
    rows = [{"n": i} for i in range(25)]
    keys: list[str | None] = [None] * 25
    keys[22] = "k" * 256  # the key rule is SQL's, so batches 1 and 2 ran before this one
    with pytest.raises(pgidem.InvalidInput, match=r"row 23: invalid idempotency key"):
        shared_app.enqueue_many(
            "charge", rows, idempotency_keys=keys, batch_size=10, conn=empty_conn
        )
    assert count_tasks(empty_conn) == 0


def test_enqueue_many_without_keys_names_row_7001_of_8000_as_the_function_does(
    shared_app: pgidem.App, shared_dsn: str, empty_conn: psycopg.Connection[Any]
) -> None:
    """Row 7,001 of 8,000 holds args of 12 bytes of compact JSON but 308 as jsonb text (1e300
    printed in full), over a limit of 100 set in the caller's session. The COPY path (no keys)
    checks the rule of the SQL function on the stored args: the same error as the function
    path (keys, batches of 5,000), naming the row in the whole call; the caller's transaction
    is aborted and nothing is written."""
    rows: list[dict[str, Any]] = [{"n": i} for i in range(8000)]
    rows[7000] = {"x": 1e300}
    errors = []
    for keys in (None, [None] * 8000):
        with psycopg.connect(shared_dsn) as mine:
            mine.execute("SET pgidem.max_args_bytes = 100")
            with pytest.raises(pgidem.InvalidInput) as exc:
                shared_app.enqueue_many("charge", rows, idempotency_keys=keys, conn=mine)
            assert mine.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
            mine.commit()  # an aborted transaction: PostgreSQL rolls it back
        errors.append(exc.value)
    copied, by_function = errors
    message = (
        "row 7001: invalid args: 308 bytes of JSON, over the limit of 100 bytes "
        "(setting pgidem.max_args_bytes)"
    )
    assert str(copied) == str(by_function) == message
    assert type(copied) is type(by_function) is pgidem.InvalidInput
    assert copied.field == by_function.field == "args"
    assert copied.__cause__ is not None
    assert copied.__cause__.sqlstate == "PI002"  # type: ignore[attr-defined]
    assert count_tasks(empty_conn) == 0


def test_enqueue_many_without_keys_bad_row_after_the_copy_leaves_nothing(
    app: pgidem.App, conn: psycopg.Connection[Any], dsn: str
) -> None:
    """The COPY path finds a bad row once the rows are written; under each transaction rule
    the call still leaves nothing: the pool (one transaction), an autocommit connection (one
    transaction of its own), the caller's transaction (aborted: its COMMIT commits nothing)."""
    rows: list[dict[str, Any]] = [{"n": i} for i in range(30)]
    rows[22] = {"blob": "x" * 40}  # 52 bytes as jsonb text
    bad = r"^row 23: invalid args: 52 bytes of JSON, over the limit of 30 bytes"
    conn.execute(f'ALTER DATABASE "{conn.info.dbname}" SET pgidem.max_args_bytes = 30')
    with pgidem.App(dsn) as fresh, pytest.raises(pgidem.InvalidInput, match=bad):
        fresh.enqueue_many("charge", rows)
    with psycopg.connect(dsn, autocommit=True) as auto:
        with pytest.raises(pgidem.InvalidInput, match=bad):
            app.enqueue_many("charge", rows, conn=auto)
        assert auto.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with psycopg.connect(dsn) as mine:
        app.enqueue("charge", {"n": -1}, conn=mine)
        with pytest.raises(pgidem.InvalidInput, match=bad):
            app.enqueue_many("charge", rows, conn=mine)
        mine.commit()
    assert count_tasks(conn) == 0
