"""The pruner: deletes finished tasks older than the retention, with their attempts, outcomes,
steps and step calls, and once keys older than it, in batches of short transactions.

A maintenance service in the manner of River's cleaner: a config, a loop (``run``), and
``run_once`` that returns what it did. ``pgidem prune`` calls ``run_once``; a worker started
with ``prune_interval`` (``pgidem worker --prune-interval``) runs the loop on a thread of its
own. Each batch is one call of ``pgidem.prune_batch`` in autocommit: oldest first, at most
``batch_size`` rows, ``FOR UPDATE SKIP LOCKED`` (so it never waits for a row that a claim or an
enqueue holds, and claims never wait for it longer than one batch), and the claim path's
indexes only hold queued and running rows, so claiming does not slow down while it runs. After
a task is pruned its idempotency key can be used again (a new task).
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import psycopg

from pgidem import _log, _store
from pgidem.errors import InvalidInput, PgidemError

#: Rows (tasks, and once keys) per batch unless configured.
DEFAULT_BATCH_SIZE = 1000
#: Seconds between runs of a worker's pruner unless configured.
DEFAULT_INTERVAL = 300.0

ConnectionFactory = Callable[[], AbstractContextManager[psycopg.Connection[Any]]]

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``12h``, ``7d`` or ``2w``.

    Raises:
        InvalidInput: anything else.
    """
    match = _DURATION.match(text)
    if not match:
        raise InvalidInput(
            f"invalid duration {text!r}: give a number of seconds, or a number with s, m, h, d "
            "or w (90s, 15m, 12h, 7d, 2w)"
        )
    return float(match[1]) * _UNITS[match[2].lower()]


@dataclass
class PrunerConfig:
    """How the pruner runs.

    Attributes:
        interval: seconds between runs of the loop.
        older_than: the retention in seconds; None uses the database setting
            ``pgidem.key_retention`` (7 days when unset).
        batch_size: most tasks (and most once keys) deleted per batch, 1 to 100000.
        max_batches: most batches per run; None runs until nothing old is left.
        pause: seconds to sleep between batches (gives the server's IO to the claims).
    """

    interval: float = DEFAULT_INTERVAL
    older_than: float | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    max_batches: int | None = None
    pause: float = 0.0

    def validate(self) -> None:
        """Raise InvalidInput on a setting out of range."""
        checks = [
            (0.1 <= self.interval <= 7 * 86400, "interval must be 0.1 s to 7 days"),
            (self.older_than is None or self.older_than >= 0, "older_than must not be negative"),
            (1 <= self.batch_size <= 100000, "batch_size must be 1 to 100000"),
            (self.max_batches is None or self.max_batches >= 1, "max_batches must be at least 1"),
            (0 <= self.pause <= 60, "pause must be 0 to 60 seconds"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidInput(f"invalid pruner setting: {message}")


@dataclass(frozen=True)
class PruneResult:
    """What one run did.

    Attributes:
        tasks: finished tasks deleted (their attempts, outcomes, steps and step calls too).
        once_keys: once keys deleted.
        batches: batches (transactions) it took.
        seconds: how long it ran.
        complete: False when it stopped (max_batches, or asked to stop) with more left.
    """

    tasks: int
    once_keys: int
    batches: int
    seconds: float
    complete: bool


class Pruner:
    """Deletes old finished tasks and once keys in batches.

    Args:
        connection: returns a context manager giving an autocommit connection (a pool's
            ``connection``); one is taken per batch.
        config: settings.
        log: a structlog logger (pgidem's by default).
    """

    def __init__(
        self,
        connection: ConnectionFactory,
        config: PrunerConfig | None = None,
        log: Any = None,
    ) -> None:
        self.config = config or PrunerConfig()
        self.config.validate()
        self._connection = connection
        self.log = log if log is not None else _log.get()

    def run_once(self, stop: threading.Event | None = None) -> PruneResult:
        """Delete batches until none is full (or ``max_batches``, or ``stop`` is set).

        Returns:
            The counts of what went.

        Raises:
            DatabaseError, InvalidInput: from the database; batches done before stay done.
        """
        cfg = self.config
        started = time.monotonic()
        tasks = keys = batches = 0
        complete = False
        while True:
            with self._connection() as conn:
                t, k = _store.prune_batch(
                    conn, older_than_s=cfg.older_than, batch_size=cfg.batch_size
                )
            tasks += t
            keys += k
            batches += 1
            if t < cfg.batch_size and k < cfg.batch_size:
                complete = True
                break
            if cfg.max_batches is not None and batches >= cfg.max_batches:
                break
            if stop is not None and stop.is_set():
                break
            if cfg.pause:
                if stop is not None:
                    if stop.wait(cfg.pause):
                        break
                else:
                    time.sleep(cfg.pause)
        return PruneResult(tasks, keys, batches, time.monotonic() - started, complete)

    def run(self, stop: threading.Event) -> None:
        """Run ``run_once`` every ``interval`` seconds until ``stop`` is set (the first run
        comes after a random part of the interval, so that workers started together do not
        prune together). Errors are logged and the loop goes on."""
        wait = self.config.interval * random.uniform(0.1, 1.0)
        while not stop.wait(wait):
            wait = self.config.interval
            try:
                result = self.run_once(stop)
            except (psycopg.Error, PgidemError, OSError) as exc:
                if stop.is_set():
                    return
                self.log.warning("prune_failed", error=f"{type(exc).__name__}: {exc}")
                continue
            except Exception as exc:  # a bug in pgidem: keep the loop alive, say so loudly
                self.log.exception("prune_crashed", error=repr(exc))
                continue
            level = "info" if result.tasks or result.once_keys else "debug"
            getattr(self.log, level)(
                "prune_finished",
                tasks=result.tasks,
                once_keys=result.once_keys,
                batches=result.batches,
                duration_ms=round(result.seconds * 1000, 1),
                complete=result.complete,
            )
