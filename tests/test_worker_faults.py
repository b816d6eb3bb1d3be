"""The worker under failure, with real processes on real PostgreSQL: SIGKILL (rescue after the
lease), SIGSTOP past the lease (fenced completion), terminated connections, server restarts and
a server down at start, SIGTERM (graceful) and a second signal (immediate), poison tasks."""

from __future__ import annotations

import contextlib
import signal
import time
from typing import Any

import psycopg
import pytest

import pgidem
from tests.apps.worker_app import LEDGER_DDL
from tests.helpers import execute, rows, scalar, wait_until
from tests.test_worker import attempts, states, task_row, wait_all


@pytest.fixture
def ledger(conn: psycopg.Connection[Any]) -> None:
    conn.execute(LEDGER_DDL)


def handlers_in_flight(dsn: str) -> int:
    """Backends of this database sitting in a task transaction after a ledger write, that is,
    handlers running right now."""
    n: int = scalar(
        dsn,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND state = 'idle in transaction' AND query LIKE 'INSERT INTO ledger%%'",
    )
    return n


def assert_once_per_task(dsn: str) -> None:
    """Every task succeeded, with exactly one ledger row, written by the winning claim."""
    assert set(states(dsn)) == {"succeeded"}, states(dsn)
    total = scalar(dsn, "SELECT count(*) FROM pgidem.tasks")
    assert scalar(dsn, "SELECT count(*) FROM ledger") == total
    assert (
        scalar(
            dsn,
            "SELECT count(*) FROM ledger l JOIN pgidem.outcomes o"
            " ON o.task_id = l.task_id AND o.fencing_token = l.token",
        )
        == total
    )
    assert scalar(dsn, "SELECT count(*) FROM pgidem.attempts WHERE status = 'succeeded'") == total


def listening(dsn: str) -> bool:
    return bool(
        scalar(
            dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND query = 'LISTEN pgidem'",
        )
    )


def test_sigkilled_worker_tasks_are_rescued_after_the_lease(
    dsn: str, ledger: None, app: pgidem.App, spawn_worker: Any
) -> None:
    """A worker SIGKILLed while its handlers run: after the lease another worker rescues its
    tasks (new tokens; the dead claims marked `lease_expired`) and completes them; the
    ledger keeps one row per task (the dead worker's uncommitted writes are gone)."""
    ids = app.enqueue_many("write", [{"n": i, "sleep": 0.5} for i in range(6)])
    victim = spawn_worker(dsn, "--concurrency", "2", "--batch-size", "3", "--lease", "1.5")
    wait_until(lambda: handlers_in_flight(dsn) == 2, 30, 0.02, "two handlers running")
    held = {r[0] for r in rows(dsn, "SELECT id FROM pgidem.tasks WHERE state = 'running'")}
    victim.kill()
    rescuer = spawn_worker(dsn, "--concurrency", "3", "--lease", "1.5", "--poll-interval", "0.2")
    wait_all(dsn, 6, timeout=60)

    assert_once_per_task(dsn)
    assert set(ids) >= held and len(held) >= 2
    for task_id in held:
        tries = attempts(dsn, task_id)
        assert tries[0]["status"] == "lease_expired", tries
        assert tries[0]["error_class"] == "LeaseExpired"
        assert tries[-1]["status"] == "succeeded"
        assert tries[-1]["fencing_token"] > tries[0]["fencing_token"]
        assert task_row(dsn, task_id)["o_token"] == tries[-1]["fencing_token"]
    assert rescuer.alive()


@pytest.mark.slow
def test_quick_writers_without_savepoints_write_once_through_failures_kills_and_cut_connections(
    dsn: str, ledger: None, app: pgidem.App, spawn_worker: Any, tmp_path: Any
) -> None:
    """Quick writing tasks with a clean record write without savepoints (a failure after a
    write rolls their shared transaction back and its earlier writers run again). Three
    workers drain 900 of them, one in 100 failing once after its write, while one worker is
    SIGKILLed and every connection of another is terminated: every task succeeds with exactly
    one ledger row, written by its winning claim, and transactions did roll back and run
    writers again along the way."""
    runs = str(tmp_path / "runs.txt")
    args = ["--concurrency", "2", "--lease", "2", "--poll-interval", "0.2", "--batch-size", "32"]
    workers = [spawn_worker(dsn, *args) for _ in range(3)]
    wait_until(lambda: scalar(dsn, "SELECT count(*) FROM pgidem.workers") == 3, 60, 0.1)
    # A clean record first, in every worker (more than _CLEAN_RUNS_UNGUARDED each).
    app.enqueue_many("tally", [{"n": -1, "runs": runs} for _ in range(600)])
    wait_all(dsn, 600, timeout=60)
    ids = app.enqueue_many(
        "tally", [{"n": i, "runs": runs, "fail": i % 100 == 50} for i in range(900)]
    )

    def written() -> int:
        n: int = scalar(dsn, "SELECT count(*) FROM ledger WHERE n >= 0")
        return n

    wait_until(lambda: written() >= 150, 60, 0.01, "150 writes")
    workers[0].kill()
    wait_until(lambda: written() >= 400, 60, 0.01, "400 writes")
    execute(
        dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name LIKE %s",
        (f"pgidem:%:{workers[1].pid}:%",),
    )
    workers.append(spawn_worker(dsn, *args))
    wait_all(dsn, 1500, timeout=120, finished=("succeeded",))

    assert_once_per_task(dsn)
    for i in range(50, 900, 100):
        # Each failing task failed once (or its first claim died with the killed worker: the
        # next one is its second attempt, which does not fail), then succeeded.
        tries = [a["status"] for a in attempts(dsn, ids[i])]
        assert tries[-1] == "succeeded", (i, tries)
        assert tries[0] in ("failed", "lease_expired") and len(tries) == 2, (i, tries)
    again = [e for w in workers for e in w.events() if e.get("event") == "tasks_run_again"]
    assert again, "no transaction was rolled back by a failure without savepoints"
    assert all(w.alive() for w in workers[1:])


def test_paused_worker_is_fenced_after_another_finished_its_task(
    dsn: str, ledger: None, app: pgidem.App, spawn_worker: Any
) -> None:
    """A worker SIGSTOPped mid-handler past its lease; another worker re-claims its tasks and
    finishes them; then SIGCONT: the paused worker's completion is refused, its ledger write
    rolled back, its attempt recorded `fenced`; the outcome carries the winner's token. The
    second task of its batch, which it had not started, it does not run at all."""
    handle = app.enqueue("write", {"n": 1, "sleep": 1.0})
    second = app.enqueue("write", {"n": 2, "sleep": 1.0})
    paused = spawn_worker(dsn, "--concurrency", "1", "--batch-size", "2", "--lease", "1")
    wait_until(lambda: handlers_in_flight(dsn) == 1, 30, 0.02, "the handler running")
    paused.signal(signal.SIGSTOP)
    loser = task_row(dsn, handle.id)["fencing_token"]
    unstarted = task_row(dsn, second.id)["fencing_token"]
    winner = spawn_worker(dsn, "--concurrency", "2", "--lease", "1", "--poll-interval", "0.2")
    handle.result(timeout=60)
    second.result(timeout=60)
    won = task_row(dsn, handle.id)
    assert won["o_token"] > loser
    paused.signal(signal.SIGCONT)

    def loser_status() -> str | None:
        found = rows(dsn, "SELECT status FROM pgidem.attempts WHERE fencing_token = %s", (loser,))
        return found[0][0] if found and found[0][0] == "fenced" else None

    wait_until(loser_status, 30, 0.1, "the paused attempt to be recorded fenced")
    paused.wait_for_event("task_fenced", 10)
    skipped = paused.wait_for_event("task_skipped", 10)
    assert (skipped["task_id"], skipped["fencing_token"]) == (second.id, unstarted)
    after = task_row(dsn, handle.id)
    assert (after["state"], after["o_token"], after["fencing_token"]) == (
        "succeeded",
        won["o_token"],
        won["o_token"],
    )
    assert [a["status"] for a in attempts(dsn, handle.id)] == ["fenced", "succeeded"]
    assert [a["status"] for a in attempts(dsn, second.id)] == ["lease_expired", "succeeded"]
    assert rows(dsn, "SELECT task_id, token FROM ledger ORDER BY task_id") == [
        (handle.id, won["o_token"]),
        (second.id, task_row(dsn, second.id)["o_token"]),
    ]
    assert paused.alive() and winner.alive()


def test_paused_worker_holding_rows_locked_ahead_loses_its_session_and_the_tasks_are_rescued(
    dsn: str, ledger: None, app: pgidem.App, spawn_worker: Any
) -> None:
    """A worker whose handlers are known to be quick locks the rows of a batch ahead (so that
    nothing can take them before its COMMIT) and limits its transaction's idle time to the
    lease. SIGSTOPped mid-handler with such locks, it cannot keep the tasks: the server ends
    its session after the lease, another worker rescues both tasks of the batch (the running
    one and its unstarted batch-mate) and completes them; woken, the paused worker's writes
    are gone with its session, its attempts stay `lease_expired`, and it carries on."""
    warm = app.enqueue_many("write", [{"n": i} for i in range(8)])
    paused = spawn_worker(dsn, "--concurrency", "1", "--batch-size", "4", "--lease", "1")
    wait_all(dsn, len(warm), timeout=60)  # "write" is now known to be quick
    # One transaction, so that one claim takes both (two enqueues could be claimed apart).
    handle, second = (
        app.handle(i) for i in app.enqueue_many("write", [{"n": 100, "sleep": 3.0}, {"n": 101}])
    )
    wait_until(lambda: handlers_in_flight(dsn) == 1, 30, 0.02, "the handler running")
    # Both rows are locked (the unstarted batch-mate's too): a rescue could not take them.
    with psycopg.connect(dsn) as probe:
        for task_id in (handle.id, second.id):
            with pytest.raises(psycopg.errors.LockNotAvailable), probe.transaction():
                probe.execute(
                    "SELECT 1 FROM pgidem.tasks WHERE id = %s FOR UPDATE NOWAIT", (task_id,)
                )
    paused.signal(signal.SIGSTOP)
    tokens = {t.id: task_row(dsn, t.id)["fencing_token"] for t in (handle, second)}
    rescuer = spawn_worker(dsn, "--concurrency", "2", "--lease", "1", "--poll-interval", "0.2")
    handle.result(timeout=60)
    second.result(timeout=60)
    paused.signal(signal.SIGCONT)
    paused.wait_for_event("task_rolled_back", 20)
    for task_id, stale in tokens.items():
        tries = attempts(dsn, task_id)
        assert [a["status"] for a in tries] == ["lease_expired", "succeeded"], tries
        assert tries[0]["fencing_token"] == stale
        assert task_row(dsn, task_id)["o_token"] == tries[-1]["fencing_token"] > stale
    assert rows(dsn, "SELECT task_id FROM ledger WHERE n >= 100 ORDER BY task_id") == [
        (handle.id,),
        (second.id,),
    ]
    assert_once_per_task(dsn)
    app.enqueue_many("write", [{"n": 200 + i} for i in range(4)])
    wait_all(dsn, len(warm) + 6, timeout=60)  # both workers go on
    assert paused.alive() and rescuer.alive()


def test_terminated_connections_are_survived(
    dsn: str, ledger: None, app: pgidem.App, spawn_worker: Any
) -> None:
    """pg_terminate_backend on every connection of the worker, twice, mid-run: every task still
    completes exactly once, the worker process keeps running and listens again."""
    app.enqueue_many("write", [{"n": i, "sleep": 0.05} for i in range(40)])
    worker = spawn_worker(dsn, "--concurrency", "2", "--lease", "2", "--poll-interval", "0.5")
    for _ in range(2):
        wait_until(lambda: handlers_in_flight(dsn) >= 1, 30, 0.01, "a handler running")
        execute(
            dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name LIKE 'pgidem:%%'",
        )
        time.sleep(0.3)
    wait_all(dsn, 40, timeout=90)
    assert_once_per_task(dsn)
    assert worker.alive()
    wait_until(lambda: listening(dsn), 15, 0.1, "the listener to LISTEN again")
    # A task enqueued now is picked up (the worker is fully back).
    app.enqueue("write", {"n": 100}).result(timeout=30)
    assert worker.alive()


@pytest.mark.slow
def test_server_restarts_and_outage_at_start_are_survived(
    own_server: Any, own_dsn: str, spawn_worker: Any
) -> None:
    """On a server of the test's own: a worker started while the server is down waits for it;
    `pg_ctl restart -m fast` and `-m immediate` mid-run cut every connection; every task still
    completes exactly once, the worker keeps running and re-listens."""
    dsn = own_dsn
    execute(dsn, LEDGER_DDL)
    with pgidem.App(dsn) as app:
        app.enqueue_many("write", [{"n": i, "sleep": 0.05} for i in range(10)])
        own_server.stop()
        worker = spawn_worker(dsn, "--concurrency", "2", "--lease", "2", "--poll-interval", "0.5")
        worker.wait_for_event("database_unreachable", 30)
        own_server.start()
        wait_until(lambda: scalar(dsn, "SELECT count(*) FROM ledger") >= 3, 60, 0.05, "progress")
        app.close()  # its pooled connections would die with the restart
        app.enqueue_many("write", [{"n": i, "sleep": 0.05} for i in range(10, 40)])
        for mode in ("fast", "immediate"):
            wait_until(lambda: handlers_in_flight(dsn) >= 1, 60, 0.01, "a handler running")
            own_server.restart(mode)
            assert worker.alive()
        wait_all(dsn, 40, timeout=120)
        assert_once_per_task(dsn)
        assert worker.alive()
        wait_until(lambda: listening(dsn), 15, 0.1, "the listener to LISTEN again")
        app.close()
        app.enqueue("write", {"n": 100}).result(timeout=30)
    events = {e["event"] for e in worker.events()}
    assert {"database_unreachable", "listener_reconnecting", "slot_error"} <= events


def test_sigterm_finishes_running_handlers_and_gives_back_the_rest(
    dsn: str, ledger: None, app: pgidem.App, spawn_worker: Any
) -> None:
    """SIGTERM mid-run: handlers already running finish and their writes commit; tasks claimed
    but not started go back to `queued` without an attempt counted (no attempt row); exit 0."""
    ids = app.enqueue_many("write", [{"n": i, "sleep": 1.5} for i in range(10)])
    worker = spawn_worker(dsn, "--concurrency", "2", "--batch-size", "3", "--grace-period", "20")
    wait_until(lambda: handlers_in_flight(dsn) == 2, 30, 0.02, "two handlers running")
    claimed = scalar(dsn, "SELECT count(*) FROM pgidem.tasks WHERE state = 'running'")
    assert claimed == 6  # two batches of three
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0

    assert states(dsn) == {"succeeded": 2, "queued": 8}
    done = [r[0] for r in rows(dsn, "SELECT id FROM pgidem.tasks WHERE state = 'succeeded'")]
    assert {r[0] for r in rows(dsn, "SELECT task_id FROM ledger")} == set(done)
    for task_id in set(ids) - set(done):
        row = task_row(dsn, task_id)
        assert (row["attempts"], row["lease_owner"], row["lease_expires_at"]) == (0, None, None)
        assert attempts(dsn, task_id) == []
    events = [e["event"] for e in worker.events()]
    assert "worker_stopping" in events and events[-1] == "worker_stopped"
    assert scalar(dsn, "SELECT count(*) FROM pgidem.workers") == 0


def test_second_signal_exits_at_once(
    dsn: str, ledger: None, app: pgidem.App, spawn_worker: Any
) -> None:
    """A second SIGTERM (or SIGINT) while the worker waits for a long handler exits at once
    with a non-zero code; the task's lease then expires like any crash."""
    handle = app.enqueue("write", {"n": 1, "sleep": 30})
    worker = spawn_worker(dsn, "--concurrency", "1", "--grace-period", "60")
    wait_until(lambda: handlers_in_flight(dsn) == 1, 30, 0.02, "the handler running")
    worker.signal(signal.SIGTERM)
    worker.wait_for_event("worker_stopping", 10)
    time.sleep(0.6)  # the same kill delivered twice at once counts once
    started = time.monotonic()
    worker.signal(signal.SIGINT)
    assert worker.wait(10) != 0
    assert time.monotonic() - started < 10
    assert handle.state == "running"  # left for the rescue
    assert scalar(dsn, "SELECT count(*) FROM ledger") == 0


@pytest.mark.slow
@pytest.mark.parametrize("how", ["exit", "kill"])
def test_poison_task_dies_through_rescue_instead_of_killing_workers_forever(
    dsn: str, ledger: None, app: pgidem.App, spawn_worker: Any, how: str
) -> None:
    """A handler that kills its own worker every time (os._exit, or SIGKILL to itself;
    max_attempts 2): two workers die, the third worker's claim finds no attempt left and moves
    the task to `dead` instead of running it; that worker lives and goes on with other work."""
    poison = app.enqueue("poison", {"how": how}, max_attempts=2)
    for _ in range(2):
        w = spawn_worker(dsn, "--concurrency", "1", "--lease", "1", "--poll-interval", "0.2")
        assert w.wait(60) != 0
    survivor = spawn_worker(dsn, "--concurrency", "1", "--lease", "1", "--poll-interval", "0.2")
    wait_until(lambda: poison.state == "dead", 60, 0.1, "the poison task to die")
    row = task_row(dsn, poison.id)
    assert row["attempts"] == 2 and row["o_state"] == "dead"
    assert row["error"]["class"] == "LeaseExpired"
    assert [a["status"] for a in attempts(dsn, poison.id)] == ["lease_expired", "lease_expired"]
    app.enqueue("write", {"n": 1}).result(timeout=30)
    assert survivor.alive()
    assert scalar(dsn, "SELECT count(*) FROM ledger") == 1


@pytest.mark.slow
def test_outage_longer_than_the_lease_tells_the_handler_and_rescues_the_task(
    own_server: Any, own_dsn: str, spawn_worker: Any
) -> None:
    """The server goes away for longer than the lease while a handler runs: the heartbeat
    cannot extend the lease, so once it has run out the handler is told (`lease_lost`,
    ctx.check_lease raises); when the server is back the task is rescued with a new token and
    completes once. Then SIGTERM while the server is down again still exits 0."""
    dsn = own_dsn
    execute(dsn, LEDGER_DDL)
    with pgidem.App(dsn) as app:
        handle = app.enqueue("long_running", {"seconds": 2.5}, max_attempts=3)
        app.close()
        worker = spawn_worker(dsn, "--concurrency", "1", "--lease", "1.5", "--poll-interval", "0.5")
        wait_until(lambda: handlers_in_flight(dsn) == 1, 60, 0.02, "the handler running")
        own_server.stop()
        try:
            lost = worker.wait_for_event("lease_lost", 30)
        finally:
            own_server.start()
        assert lost["reason"] == "not_extended_in_time" and lost["task_id"] == handle.id
        assert handle.result(timeout=60) == {"lease_lost": False}
        tries = attempts(dsn, handle.id)
        assert [a["status"] for a in tries] == ["lease_expired", "succeeded"]
        assert rows(dsn, "SELECT token FROM ledger") == [(tries[-1]["fencing_token"],)]
        assert worker.alive()
        app.close()

    own_server.stop()
    try:
        worker.signal(signal.SIGTERM)
        assert worker.wait(40) == 0
    finally:
        own_server.start()


def test_connection_dropped_during_commit_leaves_the_outcome_to_the_next_claim(
    dsn: str, ledger: None, app: pgidem.App, spawn_worker: Any
) -> None:
    """The connection dies in the middle of a batch's COMMIT (a deferred trigger, which runs at
    COMMIT, terminates its own backend, once): the worker cannot know whether it committed,
    logs `task_outcome_unknown` for each task of the batch and does not retry the COMMIT; the
    leases expire, the next claim finds the tasks still running (nothing committed), rescues
    and completes them: one ledger row per task, and the worker keeps going."""
    execute(
        dsn,
        """
        CREATE SEQUENCE commit_kills;
        CREATE FUNCTION kill_first_commit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('commit_kills') = 1 THEN
                PERFORM pg_terminate_backend(pg_backend_pid());
                PERFORM pg_sleep(5);  -- the termination lands here, inside COMMIT
            END IF;
            RETURN NULL;
        END $$;
        CREATE CONSTRAINT TRIGGER kill_first_commit AFTER INSERT ON ledger
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION kill_first_commit();
        """,
    )
    ids = app.enqueue_many("write", [{"n": i} for i in range(5)])
    worker = spawn_worker(dsn, "--concurrency", "1", "--lease", "1", "--poll-interval", "0.2")
    wait_all(dsn, 5, timeout=60)

    assert_once_per_task(dsn)
    # The tasks of the killed transaction (the batch may have been split into several
    # transactions by commit_interval; those not yet run were given back, uncounted).
    unknown = {e["task_id"] for e in worker.events() if e["event"] == "task_outcome_unknown"}
    assert unknown and unknown <= set(ids)
    for task_id in ids:
        expected = ["lease_expired", "succeeded"] if task_id in unknown else ["succeeded"]
        assert [a["status"] for a in attempts(dsn, task_id)] == expected, task_id
    assert worker.alive()


class CommitAckDropper:
    """A TCP proxy in front of PostgreSQL (reached over TCP or its Unix socket) that, the first
    time a client sends COMMIT, passes it on, lets the server commit, and then cuts the
    connection before the reply comes back: the client cannot know that its transaction
    committed."""

    def __init__(self, host: str, port: int) -> None:
        import socket
        import threading

        self.upstream = (host, port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.fired = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            host, port = self.upstream
            if host.startswith("/"):
                # A socket directory (the embedded test server listens on a Unix socket).
                upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                upstream.connect(f"{host}/.s.PGSQL.{port}")
            else:
                upstream = socket.create_connection(self.upstream)
            for src, dst, watch in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(
                    target=self._pump, args=(src, dst, watch, client, upstream), daemon=True
                ).start()

    def _pump(self, src: Any, dst: Any, watch: bool, client: Any, upstream: Any) -> None:
        try:
            while data := src.recv(65536):
                cut = False
                if watch and b"COMMIT\x00" in data:  # the statement itself, not a mention
                    with self._lock:
                        cut = not self.fired.is_set()
                        self.fired.set()
                if cut:
                    # Reply withheld: stop passing the server's bytes back, then hang up.
                    client.shutdown(2)
                    upstream.sendall(data)
                    time.sleep(0.5)  # the server commits meanwhile
                    upstream.close()
                    client.close()
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self.server.close()


def test_commit_whose_reply_is_lost_is_never_committed_twice(
    dsn: str, ledger: None, app: pgidem.App, spawn_worker: Any
) -> None:
    """The worker's COMMIT reaches the server and commits, but the reply is lost (the proxy
    cuts the connection): the worker logs `task_outcome_unknown` and does not run or commit
    those tasks again; their outcomes, ledger rows and attempts stand exactly once."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(dsn)
    proxy = CommitAckDropper(
        str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432)
    )
    try:
        proxied = make_conninfo(
            **{**params, "host": "127.0.0.1", "port": proxy.port, "sslmode": "disable"}
        )
        ids = app.enqueue_many("write", [{"n": i} for i in range(5)])
        worker = spawn_worker(proxied, "--concurrency", "1", "--lease", "1")
        wait_all(dsn, 5, timeout=60)
        assert proxy.fired.is_set()
        unknown = worker.wait_for_event("task_outcome_unknown", 10)
        assert unknown["task_id"] in ids
        time.sleep(2.5)  # past the lease: nothing may be rescued or run again
        assert_once_per_task(dsn)
        assert scalar(dsn, "SELECT count(*) FROM pgidem.attempts") == 5
        assert worker.alive()
    finally:
        proxy.close()
