"""Recorded steps (ctx.step): derived keys, recording, replay on retry, the trace of a call that
was never recorded, fenced records, and step errors; with the fake payment service on
loopback and real worker processes where a worker must die or stall."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

import pgidem
from examples.payments import app as payments
from pgidem import _steps
from pgidem.cli import main
from pgidem.errors import MAX_ERROR_MESSAGE
from pgidem.fakepay import FakePaymentService
from tests.apps import LONG_MESSAGE, effects_app
from tests.effects_support import (
    Faults,
    payment_service,
    rows,
    thread_worker,
    worker_pid,
    worker_processes,
)
from tests.helpers import scalar, wait_until

# -- keys ----------------------------------------------------------------------------------------


def test_step_key_is_documented_form_stable_and_distinct_per_task_and_step() -> None:
    """The key is `pgidem:<task>:key:<key>:<step>` (or `id:<id>`), the same for the same
    task and step, different for another step, task name or key."""
    key = _steps.step_key("charge", "order-1", 7, "psp")
    assert key == "pgidem:charge:key:order-1:psp"
    assert _steps.step_key("charge", "order-1", 8, "psp") == key  # the id plays no part
    assert _steps.step_key("charge", None, 7, "psp") == "pgidem:charge:id:7:psp"
    others = {
        _steps.step_key("charge", "order-1", 7, "refund"),
        _steps.step_key("charge", "order-2", 7, "psp"),
        _steps.step_key("charge2", "order-1", 7, "psp"),
        _steps.step_key("charge", None, 7, "psp"),
    }
    assert key not in others and len(others) == 4


def test_step_key_quotes_separators_so_different_triples_never_collide() -> None:
    """':' inside a part is quoted, so (a:b, c) and (a, b:c) give different keys."""
    one = _steps.step_key("t", "a:b", 1, "c")
    two = _steps.step_key("t", "a", 1, "b:c")
    assert one != two
    assert one == "pgidem:t:key:a%3Ab:c"
    assert _steps.step_key("t", "50%", 1, "s") == "pgidem:t:key:50%25:s"


def test_step_key_longer_than_255_characters_becomes_a_hash() -> None:
    """A derived key over 255 characters is replaced by a fixed-length hash, still stable."""
    key = _steps.step_key("t" * 128, "k" * 255, 1, "s" * 200)
    assert key.startswith("pgidem:sha256:") and len(key) == 78
    assert key == _steps.step_key("t" * 128, "k" * 255, 1, "s" * 200)
    assert key != _steps.step_key("t" * 128, "k" * 255, 1, "s" * 199)


@pytest.mark.parametrize("bad", ["", "x" * 201, "a\x00b", 5])
def test_bad_step_name_is_invalid_input(bad: Any) -> None:
    with pytest.raises(pgidem.InvalidInput, match="step name"):
        _steps.check_step_name(bad)


# -- steps in a worker ---------------------------------------------------------------------------


def test_steps_get_distinct_keys_and_a_recorded_step_replays_within_the_attempt(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    """Two steps get their own keys; calling a recorded step again returns the record (its fn
    is not called); each step has one record in pgidem.steps."""
    app = pgidem.App(dsn)
    handle = app.enqueue("two_steps", idempotency_key="k1")
    with thread_worker(effects_app.app, dsn):
        result = handle.result(timeout=30)
    app.close()
    assert result == {
        "first": "pgidem:two_steps:key:k1:first",
        "second": "pgidem:two_steps:key:k1:second",
        "again": "pgidem:two_steps:key:k1:first",
    }
    steps = rows(dsn, "SELECT name, step_key, attempt FROM pgidem.steps ORDER BY name")
    assert steps == [
        {"name": "first", "step_key": "pgidem:two_steps:key:k1:first", "attempt": 1},
        {"name": "second", "step_key": "pgidem:two_steps:key:k1:second", "attempt": 1},
    ]
    calls = rows(dsn, "SELECT step, status FROM pgidem.step_history ORDER BY call_id")
    assert [(c["step"], c["status"]) for c in calls] == [
        ("first", "recorded"),
        ("second", "recorded"),
        ("first", "replayed"),
    ]


def test_failing_step_keeps_its_error_on_the_attempt_and_retries(dsn: str) -> None:
    """fn raising fails the attempt with StepFailed naming the step (on the attempt row and the
    step call), nothing is recorded, and the next attempt calls fn again with the same key."""
    app = pgidem.App(dsn)
    handle = app.enqueue("flaky_step", {"fail_attempts": 1}, idempotency_key="r1")
    with thread_worker(effects_app.app, dsn):
        result = handle.result(timeout=30)
    app.close()
    assert result == {"key": "pgidem:flaky_step:key:r1:reserve", "attempt": 2}
    attempts = rows(
        dsn,
        "SELECT attempt, status, error_class, error_message FROM pgidem.attempts"
        " ORDER BY fencing_token",
    )
    assert [a["status"] for a in attempts] == ["failed", "succeeded"]
    assert attempts[0]["error_class"] == "pgidem.errors.StepFailed"
    assert "step 'reserve' failed: ConnectionError" in attempts[0]["error_message"]
    calls = rows(
        dsn,
        "SELECT attempt, status, step_key, error_class, error_message, summary"
        " FROM pgidem.step_history ORDER BY call_id",
    )
    assert [(c["attempt"], c["status"]) for c in calls] == [(1, "failed"), (2, "recorded")]
    assert calls[0]["error_class"] == "ConnectionError"
    assert calls[0]["step_key"] == calls[1]["step_key"]
    assert "failed: ConnectionError: downstream unreachable on attempt 1" in calls[0]["summary"]


def test_step_error_message_is_cut_to_the_documented_limit(dsn: str) -> None:
    """A step's fn raising a 10,000-character message: the step call keeps exactly its first
    2,000 characters (MAX_ERROR_MESSAGE), and so does the attempt's StepFailed message."""
    assert MAX_ERROR_MESSAGE == 2000
    app = pgidem.App(dsn)
    handle = app.enqueue("long_step_error", max_attempts=1)
    with thread_worker(effects_app.app, dsn), pytest.raises(pgidem.TaskFailed):
        handle.result(timeout=30)
    app.close()
    (call,) = rows(dsn, "SELECT status, error_class, error_message FROM pgidem.step_calls")
    assert (call["status"], call["error_class"]) == ("failed", "RuntimeError")
    assert call["error_message"] == LONG_MESSAGE[:2000]
    (attempt,) = rows(dsn, "SELECT error_class, error_message FROM pgidem.attempts")
    assert attempt["error_class"] == "pgidem.errors.StepFailed"
    assert attempt["error_message"] == f"step 'boom' failed: RuntimeError: {LONG_MESSAGE}"[:2000]


def test_non_retryable_from_a_step_fails_the_task_for_good(dsn: str) -> None:
    """NonRetryable raised by fn goes through StepFailed and still fails the task at once."""
    app = pgidem.App(dsn)
    handle = app.enqueue("hopeless_step")
    with thread_worker(effects_app.app, dsn), pytest.raises(pgidem.TaskFailed) as failed:
        handle.result(timeout=30)
    app.close()
    assert failed.value.error["class"] == "pgidem.errors.StepFailed"
    assert (
        "step 'charge' failed: NonRetryable: the card was declined" in failed.value.error["message"]
    )
    assert scalar(dsn, "SELECT count(*) FROM pgidem.attempts") == 1
    assert scalar(dsn, "SELECT count(*) FROM pgidem.steps") == 0


def test_step_result_that_is_not_json_is_a_clear_error_and_the_task_dies(dsn: str) -> None:
    """A result JSON cannot hold raises InvalidInput naming the step; nothing is recorded."""
    app = pgidem.App(dsn)
    handle = app.enqueue("non_json_step")
    with thread_worker(effects_app.app, dsn), pytest.raises(pgidem.TaskFailed) as failed:
        handle.result(timeout=30)
    app.close()
    assert failed.value.error["class"] == "pgidem.errors.InvalidInput"
    assert (
        "step 'odd' returned a value that cannot be recorded as JSON"
        in failed.value.error["message"]
    )
    assert scalar(dsn, "SELECT count(*) FROM pgidem.steps") == 0
    assert scalar(dsn, "SELECT status FROM pgidem.step_calls") == "failed"


# -- with the payment service and real worker processes --------------------------------------


def test_recorded_step_is_not_called_again_on_retry(
    dsn: str, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """Attempt 1 charges (recorded), writes the ledger, then fails: its ledger row rolls back.
    Attempt 2 gets the recorded charge without calling the service. One call, one charge, one
    ledger row, the task succeeded once."""
    conn.execute(effects_app.EFFECTS_DDL)
    with payment_service() as service:
        env = {"PAYMENTS_URL": service.url}
        app = pgidem.App(dsn)
        handle = app.enqueue("pay", {"amount": 250, "fail_on_attempt": 1}, idempotency_key="p1")
        with worker_processes(dsn, tmp_path, 1, "--lease", "5", "--poll-interval", "0.2", env=env):
            result = handle.result(timeout=60)
        app.close()
        stats = service.snapshot()["stats"]
    key = "pgidem:pay:key:p1:charge"
    assert stats["calls_per_key"] == {key: 1}
    assert stats["applied"] == 1
    assert result == {"charge_id": "ch_1", "attempt": 2}
    ledger = rows(dsn, "SELECT attempt, charge_id FROM effects_ledger")
    assert ledger == [{"attempt": 2, "charge_id": "ch_1"}]
    calls = rows(dsn, "SELECT attempt, status FROM pgidem.step_history ORDER BY call_id")
    assert [(c["attempt"], c["status"]) for c in calls] == [(1, "recorded"), (2, "replayed")]
    statuses = rows(dsn, "SELECT status FROM pgidem.attempts ORDER BY fencing_token")
    assert [s["status"] for s in statuses] == ["failed", "succeeded"]


def test_stale_workers_step_record_is_refused(
    dsn: str, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """Worker A is stopped (SIGSTOP) inside the step's call, past its lease; worker B rescues
    the task, calls with the same key (the service replays its charge), records the step and
    completes. A resumes (SIGCONT): its record is refused and nothing of its attempt commits."""
    conn.execute(effects_app.EFFECTS_DDL)
    faults = Faults(signal.SIGSTOP)
    with payment_service(after_apply=faults) as service:
        env = {"PAYMENTS_URL": service.url}
        app = pgidem.App(dsn)
        handle = app.enqueue("pay", {"amount": 100}, idempotency_key="stale-1")
        args = ("--lease", "1.5", "--poll-interval", "0.2", "--concurrency", "1")
        with worker_processes(dsn, tmp_path, 2, *args, env=env) as procs:
            assert faults.done.wait(60), "no worker called the payment service"
            stalled = next(p for p in procs if p.pid == faults.hit[0])
            result = handle.result(timeout=60)
            assert result["attempt"] == 2
            stalled.signal(signal.SIGCONT)
            wait_until(
                lambda: (
                    scalar(
                        dsn,
                        "SELECT status FROM pgidem.attempts WHERE attempt = 1",
                    )
                    == "fenced"
                ),
                timeout=30,
                message="the stalled attempt to be recorded as fenced",
            )
        app.close()
        stats = service.snapshot()["stats"]
    key = "pgidem:pay:key:stale-1:charge"
    assert stats["calls_per_key"] == {key: 2}
    assert stats["applied"] == 1 and stats["replayed"] == 1
    tokens = rows(dsn, "SELECT fencing_token FROM pgidem.attempts ORDER BY fencing_token")
    old, new = (t["fencing_token"] for t in tokens)
    steps = rows(dsn, "SELECT fencing_token, attempt FROM pgidem.steps")
    assert steps == [{"fencing_token": new, "attempt": 2}]
    ledger = rows(dsn, "SELECT token, attempt FROM effects_ledger")
    assert ledger == [{"token": new, "attempt": 2}]
    calls = rows(
        dsn, "SELECT fencing_token, status FROM pgidem.step_history ORDER BY fencing_token"
    )
    assert [(c["fencing_token"], c["status"]) for c in calls] == [
        (old, "refused"),
        (new, "recorded"),
    ]
    outcome = rows(dsn, "SELECT state, fencing_token FROM pgidem.outcomes")
    assert outcome == [{"state": "succeeded", "fencing_token": new}]


def test_payments_example_worker_killed_between_call_and_record(
    dsn: str, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """examples/payments: the worker is killed (SIGKILL) after the service applied the charge
    and before the step was recorded. After the rescue the service saw two calls with the
    step's key and applied the charge once; the task succeeded once with one ledger row; the
    history shows attempt 1's call as not recorded."""
    payments.create_ledger(conn)
    faults = Faults(signal.SIGKILL)
    with payment_service(after_apply=faults) as service:
        env = {"PAYMENTS_URL": service.url}
        app = pgidem.App(dsn)
        handle = app.enqueue(
            payments.charge_order, {"order_id": 42, "amount": 1999}, idempotency_key="order-42"
        )
        args = ("--lease", "1.5", "--poll-interval", "0.2", "--concurrency", "1")
        with worker_processes(dsn, tmp_path, 2, *args, app="examples.payments.app:app", env=env):
            assert faults.done.wait(60), "no worker called the payment service"
            result = handle.result(timeout=60)
        info = handle.refresh()
        app.close()
        stats = service.snapshot()
    key = "pgidem:charge_order:key:order-42:charge"
    assert stats["stats"]["calls_per_key"] == {key: 2}
    assert stats["stats"]["applied"] == 1
    assert [c["key"] for c in stats["charges"]] == [key]
    assert result == {"charge_id": "ch_1", "order_id": 42}
    assert info.state == "succeeded" and info.attempts == 2
    ledger = rows(dsn, "SELECT order_id, amount, charge_id FROM payments_ledger")
    assert ledger == [{"order_id": 42, "amount": 1999, "charge_id": "ch_1"}]
    attempts = rows(dsn, "SELECT status FROM pgidem.attempts ORDER BY fencing_token")
    assert [a["status"] for a in attempts] == ["lease_expired", "succeeded"]
    calls = rows(
        dsn, "SELECT attempt, effective_status, summary FROM pgidem.step_history ORDER BY call_id"
    )
    assert [(c["attempt"], c["effective_status"]) for c in calls] == [
        (1, "not_recorded"),
        (2, "recorded"),
    ]
    assert "called, not recorded" in calls[0]["summary"]
    shown = CliRunner().invoke(main, ["show", str(handle.id), "--dsn", dsn])
    assert shown.exit_code == 0, shown.output
    assert "step charge on attempt 1 (token 1): called, not recorded" in shown.output


class StaleTokenGate(FakePaymentService):
    """The payment service, holding back the first charge request it gets: its worker is
    stopped (SIGSTOP) until a newer claim's request for the same key has been applied, then
    resumed, and only then does the held request reach the service's logic, carrying the
    older fencing token after the newer one."""

    def __init__(self) -> None:
        super().__init__()
        self.held_pid: int | None = None
        self.newer_applied = threading.Event()
        self._gate = threading.Lock()

    def handle_charge(
        self, key: str, token: int | None, body: dict[str, Any], headers: Mapping[str, str]
    ) -> tuple[int, dict[str, Any], bool]:
        with self._gate:
            first = self.held_pid is None
            if first:
                self.held_pid = worker_pid(headers)
        if first:
            assert self.held_pid is not None
            os.kill(self.held_pid, signal.SIGSTOP)
            self.newer_applied.wait(60)
            os.kill(self.held_pid, signal.SIGCONT)
            return super().handle_charge(key, token, body, headers)
        answer = super().handle_charge(key, token, body, headers)
        if answer[0] == 201:
            self.newer_applied.set()
        return answer


STALE_TOKEN_APPS = {
    "effects_app": (
        "tests.apps.effects_app:app",
        "default",
        "pay",
        {"amount": 100},
        "pgidem:pay:key:stale-token:charge",
        "SELECT token AS fencing_token FROM effects_ledger",
    ),
    "payments_example": (
        "examples.payments.app:app",
        "payments",
        "charge_order",
        {"order_id": 7, "amount": 700},
        "pgidem:charge_order:key:stale-token:charge",
        "SELECT fencing_token FROM payments_ledger",
    ),
}


@pytest.mark.parametrize("which", sorted(STALE_TOKEN_APPS))
def test_stale_fencing_token_refused_by_the_service_fails_the_attempt_as_lease_lost(
    dsn: str, conn: psycopg.Connection[Any], tmp_path: Path, which: str
) -> None:
    """Worker A's charge request reaches the payment service only after worker B, which rescued
    the task from A (stopped past its lease), charged with a newer token. The service refuses
    A's older token (409 stale_token, nothing applied); A's handler turns that into LeaseLost,
    as examples/payments and tests/apps/effects_app do: A's attempt ends `fenced` with the
    LeaseLost error kept on its row, its step call `failed`, nothing of it committed; B's
    charge is the one applied, recorded and in the ledger, once."""
    app_path, queue, task_name, args, key, ledger_query = STALE_TOKEN_APPS[which]
    conn.execute(effects_app.EFFECTS_DDL)
    payments.create_ledger(conn)
    with StaleTokenGate() as service:
        env = {"PAYMENTS_URL": service.url}
        app = pgidem.App(dsn)
        handle = app.enqueue(task_name, args, queue=queue, idempotency_key="stale-token")
        worker_args = ("--lease", "1.5", "--poll-interval", "0.2", "--concurrency", "1")
        with worker_processes(dsn, tmp_path, 2, *worker_args, app=app_path, env=env):
            handle.result(timeout=60)
            wait_until(
                lambda: (
                    scalar(dsn, "SELECT status FROM pgidem.attempts WHERE attempt = 1") == "fenced"
                ),
                timeout=30,
                message="the stale attempt to be recorded as fenced",
            )
        app.close()
        snapshot = service.snapshot()
    stats = snapshot["stats"]
    assert stats["calls_per_key"] == {key: 2}
    assert (stats["applied"], stats["replayed"], stats["stale_refused"]) == (1, 0, 1)
    old, new = rows(
        dsn,
        "SELECT fencing_token, status, error_class, error_message FROM pgidem.attempts"
        " ORDER BY fencing_token",
    )
    assert [c["token"] for c in snapshot["charges"]] == [new["fencing_token"]]
    assert new["status"] == "succeeded"
    assert old["status"] == "fenced"
    assert old["error_class"] == "pgidem.errors.LeaseLost"
    assert "409" in old["error_message"] and "stale_token" in old["error_message"]
    calls = rows(
        dsn,
        "SELECT fencing_token, status, error_class FROM pgidem.step_calls ORDER BY fencing_token",
    )
    assert [(c["fencing_token"], c["status"], c["error_class"]) for c in calls] == [
        (old["fencing_token"], "failed", "pgidem.errors.LeaseLost"),
        (new["fencing_token"], "recorded", None),
    ]
    assert rows(dsn, "SELECT fencing_token FROM pgidem.steps") == [
        {"fencing_token": new["fencing_token"]}
    ]
    assert rows(dsn, ledger_query) == [{"fencing_token": new["fencing_token"]}]
    outcome = rows(dsn, "SELECT state, fencing_token FROM pgidem.outcomes")
    assert outcome == [{"state": "succeeded", "fencing_token": new["fencing_token"]}]
