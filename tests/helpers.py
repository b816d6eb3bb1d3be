"""Helpers for tests that run real worker processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.05, message: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def scalar(dsn: str, query: str, params: Any = None) -> Any:
    """Run a query on a new connection and return the first column of the first row."""
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute(query, params).fetchone()
        return None if row is None else row[0]


class WorkerProcess:
    """A `pgidem worker` in its own process (and process group), with its log in a file."""

    def __init__(
        self,
        dsn: str,
        app: str,
        log_dir: Path,
        *args: str,
        env: dict[str, str] | None = None,
        log_json: bool | None = True,
    ) -> None:
        self.dsn = dsn
        self.app = app
        self.args = args
        self.log_path = log_dir / f"worker-{time.monotonic_ns()}.log"
        self.extra_env = env or {}
        self.log_json = log_json
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        env = {**os.environ, "PGIDEM_DSN": self.dsn, "PYTHONPATH": str(ROOT), **self.extra_env}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        # log_json None: let the worker decide (its output is a file, not a terminal).
        fmt = [] if self.log_json is None else ["--log-json" if self.log_json else "--log-pretty"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgidem", *fmt, "worker", "--app", self.app, *self.args],
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.alive():
            self.signal(signal.SIGKILL)
            self.wait(10)
        elif self.proc is not None and not self._log.closed:
            self._log.close()

    def events(self) -> list[dict[str, Any]]:
        """The worker's log as parsed JSON lines (fails on a line that is not JSON)."""
        out = []
        for line in self.log().splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError as exc:
                    raise AssertionError(f"a log line that is not JSON: {line!r}") from exc
        return out

    def wait_for_event(self, event: str, timeout: float) -> dict[str, Any]:
        """Wait until the worker logged ``event``; return the first such line."""

        def find() -> dict[str, Any] | None:
            for line in self.log().splitlines():
                if f'"{event}"' in line:
                    parsed: dict[str, Any] = json.loads(line)
                    if parsed.get("event") == event:
                        return parsed
            return None

        found: dict[str, Any] = wait_until(find, timeout, 0.1, f"log event {event}")
        return found


def rows(dsn: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run a query on a new connection and return every row."""
    with psycopg.connect(dsn, autocommit=True) as c:
        return c.execute(query, params).fetchall()


def execute(dsn: str, query: str, params: Any = None) -> None:
    """Run a statement on a new autocommit connection."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(query, params)
