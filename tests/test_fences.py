"""Fences: pgidem.fence_advance(resource, token) and ctx.fence(resource) accept a token not older
than the highest seen for the resource and refuse older ones; the highest never decreases, even
with many callers racing."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgidem
from pgidem import _store
from tests.apps import effects_app
from tests.effects_support import rows, worker_processes


def test_fence_accepts_new_equal_and_newer_tokens_and_refuses_older_ones(
    conn: psycopg.Connection[Any],
) -> None:
    calls = [("r", 10), ("r", 9), ("r", 10), ("r", 11), ("r", 3), ("other", 3)]
    answers = [_store.fence_advance(conn, resource=r, token=t) for r, t in calls]
    assert answers == [True, False, True, True, False, True]
    assert dict(conn.execute("SELECT resource, token FROM pgidem.fences").fetchall()) == {
        "r": 11,
        "other": 3,
    }


def test_fence_advance_in_a_rolled_back_transaction_does_not_stick(
    conn: psycopg.Connection[Any],
) -> None:
    assert _store.fence_advance(conn, resource="r", token=5)
    with pytest.raises(RuntimeError), conn.transaction():
        assert _store.fence_advance(conn, resource="r", token=50)
        raise RuntimeError("roll back")
    assert conn.execute("SELECT token FROM pgidem.fences").fetchone() == (5,)


def test_fence_advance_rejects_bad_input(conn: psycopg.Connection[Any]) -> None:
    """An empty or over-long resource, or a NULL token: SQLSTATE PI002 / InvalidInput."""
    for resource, token in [("", 1), ("x" * 256, 1), ("r", None)]:
        with pytest.raises(psycopg.Error) as raw:
            conn.execute("SELECT pgidem.fence_advance(%s, %s)", (resource, token))
        assert raw.value.sqlstate == "PI002"
        with pytest.raises(pgidem.InvalidInput, match="invalid fenc"):
            _store.fence_advance(conn, resource=resource, token=token)  # type: ignore[arg-type]
    assert conn.execute("SELECT count(*) FROM pgidem.fences").fetchone() == (0,)


def _check_fence_log(log: list[dict[str, Any]], final: int) -> tuple[int, int]:
    """Accepted calls, in the order they passed the fence, never go down; each refused call
    had a token below what the fence held; the fence holds the highest accepted token."""
    accepted = [e for e in log if e["accepted"]]
    refused = [e for e in log if not e["accepted"]]
    tokens = [e["token"] for e in sorted(accepted, key=lambda e: e["seq"])]
    assert tokens == sorted(tokens), "the highest token seen went down"
    for e in accepted:
        assert e["seen"] == e["token"]
    for e in refused:
        assert e["token"] < e["seen"], e
    assert final == max(tokens)
    return len(accepted), len(refused)


def test_fence_advance_raced_by_many_connections_never_goes_down(dsn: str) -> None:
    """8 connections pass one fence 40 times each with shuffled tokens, each in a transaction
    that logs what it saw while it holds the fence; the log proves the invariant."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(
            "CREATE SEQUENCE log_seq; CREATE TABLE log (seq bigint, token bigint,"
            " accepted boolean, seen bigint)"
        )
    tokens = list(range(1, 321))
    random.Random(4).shuffle(tokens)
    chunks = [tokens[i::8] for i in range(8)]
    errors: list[BaseException] = []

    def run(chunk: list[int]) -> None:
        try:
            with psycopg.connect(dsn) as c:
                for token in chunk:
                    with c.transaction():
                        ok = _store.fence_advance(c, resource="acct", token=token)
                        # Next statement, so the sequence is read while the fence is held
                        # (when accepted): the log's order is the order of passing the fence.
                        c.execute(
                            "INSERT INTO log SELECT nextval('log_seq'), %s, %s, token"
                            " FROM pgidem.fences WHERE resource = 'acct'",
                            (token, ok),
                        )
                c.commit()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(chunk,)) for chunk in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    log = rows(dsn, "SELECT seq, token, accepted, seen FROM log")
    assert len(log) == 320
    final = rows(dsn, "SELECT token FROM pgidem.fences WHERE resource = 'acct'")[0]["token"]
    accepted, refused = _check_fence_log(log, final)
    assert final == 320
    assert refused > 0 and accepted > 0


def test_ctx_fence_raced_by_worker_processes_refuses_stale_claims(
    dsn: str, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """30 tasks in 3 worker processes pass one fence with ctx.fence; tasks claimed earlier sleep
    longer, so claims with older tokens reach the fence after newer ones and are refused. The
    fence never goes down and holds the highest token that passed."""
    conn.execute(effects_app.EFFECTS_DDL)
    app = pgidem.App(dsn)
    n = 30
    ids = app.enqueue_many(
        "fenced_write", [{"resource": "acct-7", "sleep": 0.02 * (n - i)} for i in range(n)]
    )
    args = ("--concurrency", "2", "--batch-size", "1", "--poll-interval", "0.1", "--lease", "10")
    with worker_processes(dsn, tmp_path, 3, *args):
        results = [app.handle(i).result(timeout=90) for i in ids]
    app.close()
    log = rows(dsn, "SELECT seq, task_id, token, accepted, seen FROM fence_log")
    assert len(log) == n
    assert sorted(e["token"] for e in log) == sorted(r["token"] for r in results)
    final = rows(dsn, "SELECT token FROM pgidem.fences WHERE resource = 'acct-7'")[0]["token"]
    accepted, refused = _check_fence_log(log, final)
    assert refused >= 1, "older claims reaching the fence late must be refused"
    assert final == max(r["token"] for r in results)
    assert sum(r["accepted"] for r in results) == accepted
