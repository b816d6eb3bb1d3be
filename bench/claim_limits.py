"""What queue limits cost the claim: claims per second with limits off and on, side by side.

    .venv/bin/python bench/claim_limits.py [--dsn ADMIN_DSN] [--tasks N] [--seconds S]

For each variant it creates a scratch database (``pgidem_bench_claimlim_*``, dropped after),
migrates it, enqueues ``--tasks`` tasks, and then claims for ``--seconds`` seconds with the
worker's own claim path (pgidem._store, as pgidem/worker.py calls it), from 1 and from 4
threads, with batches of 1 and of 16. Each claimed batch is then marked succeeded by a cheap
statement outside the timed part, so the running set stays as small as a real worker's.

Variants:
  * ``off``: the queue has no limits row: one statement, no lock (the default).
  * ``max_running``: a limit too high to bind (1 000 000): BEGIN, the limit row's lock, the
    claim counting running tasks, COMMIT; claims of the queue take turns on the lock.
  * ``rate``: a rate limit too high to bind, as above plus summing and writing the starts log.
  * ``keys``: every task has its own concurrency key (max_per_key 1): as above plus a running
    count per candidate's key.

Printed: claim calls per second, tasks claimed per second, and the median and 95th percentile
latency of one claim call, in milliseconds. The server is shared and the machine noisy: compare
rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from benchlib import scratch_db

from pgidem import _migrate, _store

QUEUE = "bench"
TASK = "claimed"


def setup(dsn: str, variant: str, tasks: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        _migrate.migrate(conn)
        if variant == "keys":
            conn.execute(
                "SELECT pgidem.enqueue_keyed(%s, '{}', %s, concurrency_key => 'k' || g::text)"
                "  FROM generate_series(1, %s) g",
                (TASK, QUEUE, tasks),
            )
        else:
            conn.execute(
                "SELECT count(*) FROM pgidem.enqueue_many(%s, array_fill('{}'::jsonb, ARRAY[%s]),"
                " %s)",
                (TASK, tasks, QUEUE),
            )
        if variant == "max_running":
            conn.execute("SELECT pgidem.set_queue_limit(%s, 1000000)", (QUEUE,))
        elif variant == "rate":
            conn.execute("SELECT pgidem.set_queue_limit(%s, NULL, 1000000, '1 second')", (QUEUE,))
        conn.execute("VACUUM ANALYZE pgidem.tasks")


def claimer(dsn: str, limited: bool, batch: int) -> Callable[[psycopg.Connection[Any]], list[int]]:
    def claim(conn: psycopg.Connection[Any]) -> list[int]:
        args: dict[str, Any] = dict(
            worker_id="bench", queues=[QUEUE], task_names=[TASK], limit=batch, lease_s=30.0
        )
        if not limited:
            rows = _store.task_claim(conn, **args)
        else:
            _store.claim_begin(conn)
            try:
                rows = _store.task_claim(
                    conn, locked=_store.queue_limits_lock(conn, [QUEUE]), **args
                )
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
        return [int(r["id"]) for r in rows]

    return claim


def run(dsn: str, variant: str, threads: int, batch: int, seconds: float) -> dict[str, float]:
    claim = claimer(dsn, variant != "off", batch)
    latencies: list[float] = []
    claimed = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def loop() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            mine: list[float] = []
            count = 0
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                ids = claim(conn)
                mine.append(time.perf_counter() - started)
                if not ids:
                    break
                count += len(ids)
                conn.execute(
                    "UPDATE pgidem.tasks SET state = 'succeeded', finished_at = now(),"
                    " lease_owner = NULL, lease_expires_at = NULL WHERE id = ANY(%s)",
                    (ids,),
                )
            with lock:
                latencies.extend(mine)
                claimed[0] += count

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    began = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.monotonic() - began
    latencies.sort()
    return {
        "calls_per_s": len(latencies) / elapsed,
        "tasks_per_s": claimed[0] / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": latencies[int(len(latencies) * 0.95) - 1] * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default="host=127.0.0.1 port=5432 user=postgres dbname=postgres")
    parser.add_argument("--tasks", type=int, default=50000)
    parser.add_argument("--seconds", type=float, default=3.0)
    opts = parser.parse_args()
    print(
        f"{'variant':<12} {'threads':>7} {'batch':>5} {'calls/s':>9} {'tasks/s':>9}"
        f" {'p50 ms':>8} {'p95 ms':>8}"
    )
    for variant in ("off", "max_running", "rate", "keys"):
        for threads, batch in ((1, 1), (1, 16), (4, 1), (4, 16)):
            with scratch_db(opts.dsn, "claimlim") as dsn:
                setup(dsn, variant, opts.tasks)
                r = run(dsn, variant, threads, batch, opts.seconds)
            print(
                f"{variant:<12} {threads:>7} {batch:>5} {r['calls_per_s']:>9.0f}"
                f" {r['tasks_per_s']:>9.0f} {r['p50_ms']:>8.2f} {r['p95_ms']:>8.2f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
