"""Key retention: a finished task's idempotency key keeps deduping until the task is pruned,
after the retention (the setting pgidem.key_retention, 7 days by default)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

import pgidem


def finish(conn: psycopg.Connection[Any], task_id: int, ago: str = "0 seconds") -> None:
    """Mark a task succeeded with an outcome, as a worker would, finished `ago`."""
    conn.execute(
        "UPDATE pgidem.tasks SET state = 'succeeded', finished_at = now() - %s::interval "
        "WHERE id = %s",
        (ago, task_id),
    )
    conn.execute(
        "INSERT INTO pgidem.outcomes (task_id, fencing_token, state, result) "
        "VALUES (%s, 1, 'succeeded', '{\"ok\": true}')",
        (task_id,),
    )


def test_default_retention_is_7_days(conn: psycopg.Connection[Any]) -> None:
    """Unset, pgidem.key_retention() is 7 days; the setting changes it."""
    assert conn.execute("SELECT pgidem.key_retention()::text").fetchone() == ("7 days",)
    conn.execute("SET pgidem.key_retention = '30 days'")
    assert conn.execute("SELECT pgidem.key_retention()::text").fetchone() == ("30 days",)


def test_finished_task_key_still_dedupes(app: pgidem.App, conn: psycopg.Connection[Any]) -> None:
    """After the task succeeded, the same key returns the same task and its stored outcome;
    other args still raise the mismatch."""
    first = app.enqueue("charge", {"order": 1}, idempotency_key="order-1")
    finish(conn, first.id)
    again = app.enqueue("charge", {"order": 1}, idempotency_key="order-1")
    assert again.id == first.id
    assert again.result(timeout=5) == {"ok": True}
    with pytest.raises(pgidem.IdempotencyKeyMismatch):
        app.enqueue("charge", {"order": 2}, idempotency_key="order-1")
    assert conn.execute("SELECT count(*) FROM pgidem.tasks").fetchone() == (1,)


def test_default_prune_keeps_keys_within_the_retention(
    app: pgidem.App, conn: psycopg.Connection[Any]
) -> None:
    """pgidem.prune() with the default retention removes a task finished 8 days ago and keeps
    one finished 6 days ago (whose key still dedupes); the pruned key makes a new task."""
    old = app.enqueue("charge", {"order": 1}, idempotency_key="old")
    recent = app.enqueue("charge", {"order": 2}, idempotency_key="recent")
    finish(conn, old.id, "8 days")
    finish(conn, recent.id, "6 days")
    assert conn.execute("SELECT pgidem.prune()").fetchone() == (1,)
    assert app.enqueue("charge", {"order": 2}, idempotency_key="recent").id == recent.id
    reborn = app.enqueue("charge", {"order": 1}, idempotency_key="old")
    assert reborn.id != old.id and reborn.state == "queued"


def test_key_is_reusable_after_prune_older_than_zero(
    app: pgidem.App, conn: psycopg.Connection[Any]
) -> None:
    """pgidem.prune(older_than => '0') removes every finished task (with its outcome and
    attempts); its key then makes a new task, even with other args. Unfinished tasks stay."""
    done = app.enqueue("charge", {"order": 1}, idempotency_key="order-1")
    waiting = app.enqueue("charge", {"order": 9}, idempotency_key="order-9")
    finish(conn, done.id)
    assert conn.execute("SELECT pgidem.prune(older_than => '0')").fetchone() == (1,)
    assert conn.execute("SELECT count(*) FROM pgidem.outcomes").fetchone() == (0,)
    fresh = app.enqueue("charge", {"order": 2}, idempotency_key="order-1")
    assert fresh.id != done.id
    assert app.enqueue("charge", {"order": 9}, idempotency_key="order-9").id == waiting.id
    rows = conn.execute("SELECT id, args FROM pgidem.tasks ORDER BY id").fetchall()
    assert rows == [(waiting.id, {"order": 9}), (fresh.id, {"order": 2})]


def test_key_retention_setting_is_what_prune_uses(
    app: pgidem.App, conn: psycopg.Connection[Any], dsn: str
) -> None:
    """ALTER DATABASE ... SET pgidem.key_retention = '1 hour': a task finished two hours ago
    is pruned by the default call, one finished ten minutes ago is kept."""
    two_hours = app.enqueue("charge", {}, idempotency_key="a")
    ten_minutes = app.enqueue("charge", {}, idempotency_key="b")
    finish(conn, two_hours.id, "2 hours")
    finish(conn, ten_minutes.id, "10 minutes")
    conn.execute(f"ALTER DATABASE \"{conn.info.dbname}\" SET pgidem.key_retention = '1 hour'")
    with psycopg.connect(dsn, autocommit=True) as fresh:
        assert fresh.execute("SELECT pgidem.prune()").fetchone() == (1,)
        assert fresh.execute("SELECT id FROM pgidem.tasks").fetchall() == [(ten_minutes.id,)]


def test_prune_rejects_bad_arguments(conn: psycopg.Connection[Any]) -> None:
    """A negative older_than or a batch size out of 1..100000 raise PI002."""
    for call in ("pgidem.prune(older_than => '-1 day')", "pgidem.prune(batch_size => 0)"):
        with pytest.raises(psycopg.Error) as exc:
            conn.execute(f"SELECT {call}")
        assert exc.value.sqlstate == "PI002"
