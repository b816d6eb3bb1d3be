"""Shared pieces of the effects tests (steps, once keys, fences, replay, pruning): worker
processes, an in-process worker, the fake payment service with a fault hook, and queries."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
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
            if len(self.hit) >= self.times:
                self.done.set()


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
