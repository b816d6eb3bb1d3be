"""Shared pieces of the effects tests (steps, once keys, fences, replay, pruning): worker
processes, an in-process worker, the fake payment service with a fault hook, and queries."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

import pgidem
from pgidem.fakepay import FakePaymentService
from tests.helpers import WorkerProcess

EFFECTS_APP = "tests.apps.effects_app:app"


def rows(dsn: str, query: str, params: Any = None) -> list[dict[str, Any]]:
    """Every row of a query, as dicts, on a new connection."""
    with psycopg.connect(dsn, autocommit=True) as c, c.cursor(row_factory=dict_row) as cur:
        cur.execute(query, params)
        return cur.fetchall()


def worker_pid(headers: Mapping[str, str]) -> int:
    """The pid of the worker that sent a request (its id, ``host:pid:suffix``, rides in the
    ``X-Pgidem-Worker`` header)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    return int(lowered["x-pgidem-worker"].split(":")[1])


class Faults:
    """An ``after_apply`` hook for the fake payment service: sends ``sig`` to the calling
    worker on the first ``times`` charges applied, and remembers the pids it hit."""

    def __init__(self, sig: int, times: int = 1) -> None:
        self.sig = sig
        self.times = times
        self.hit: list[int] = []
        self.done = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, key: str, headers: Mapping[str, str]) -> None:
        with self._lock:
            if len(self.hit) >= self.times:
                return
            pid = worker_pid(headers)
            self.hit.append(pid)
            os.kill(pid, self.sig)
            if self.sig == signal.SIGSTOP:
                _wait_stopped(pid)
            if len(self.hit) >= self.times:
                self.done.set()


def _wait_stopped(pid: int, timeout: float = 10.0) -> None:
    """Wait until the kernel reports ``pid`` stopped (state T), so that the answer this hook
    precedes cannot reach a worker that is still running: under a full test run the stop was
    once seen to land only after the worker had read the answer and recorded it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                return
        time.sleep(0.001)
    raise AssertionError(f"worker {pid} did not stop within {timeout} s of SIGSTOP")


@contextlib.contextmanager
def payment_service(
    after_apply: Callable[[str, Mapping[str, str]], None] | None = None,
) -> Iterator[FakePaymentService]:
    """The fake payment service on a free loopback port, for the block."""
    service = FakePaymentService(after_apply=after_apply).start()
    try:
        yield service
    finally:
        service.stop()


@contextlib.contextmanager
def worker_processes(
    dsn: str,
    log_dir: Path,
    count: int,
    *args: str,
    app: str = EFFECTS_APP,
    env: dict[str, str] | None = None,
) -> Iterator[list[WorkerProcess]]:
    """``count`` real `pgidem worker` processes; killed at the end of the block (their logs are
    printed when the block failed)."""
    procs = [WorkerProcess(dsn, app, log_dir, *args, env=env).start() for _ in range(count)]
    try:
        yield procs
    except BaseException:
        for p in procs:
            with contextlib.suppress(Exception):
                print(f"--- worker {p.pid} log ---\n{p.log()[-6000:]}")
        raise
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.signal(signal.SIGCONT)
            p.stop()


@contextlib.contextmanager
def thread_worker(app: pgidem.App, dsn: str, **settings: Any) -> Iterator[pgidem.Worker]:
    """A worker on threads of this process, for an App on ``dsn`` with ``app``'s tasks."""
    local = pgidem.App(dsn)
    local.tasks.update(app.tasks)
    settings.setdefault("queues", sorted({t.queue for t in app.tasks.values()}))
    settings.setdefault("poll_interval", 0.1)
    settings.setdefault("grace_period", 5.0)
    worker = pgidem.Worker(local, **settings)
    thread = threading.Thread(target=worker.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(30)
        local.close()
        assert not thread.is_alive(), "the in-process worker did not stop"
