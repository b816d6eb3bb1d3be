"""The benchmark suite still runs end to end (``bench/run.py --smoke``): every section produces
figures, every drain finished and verified its tasks, and the scratch databases are dropped.

It checks that the instrument works, never how fast anything is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent


def _existing(server_dsn: str, names: list[str]) -> list[str]:
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname = ANY(%s)", (names,)
        ).fetchall()
    return [r[0] for r in rows]


def test_bench_smoke_runs_every_section_and_drops_its_databases(
    server_dsn: str, tmp_path: Path
) -> None:
    """`bench/run.py --smoke --no-pgbench` exits 0 and writes a JSON result whose sections all
    hold figures; the write_row drain wrote exactly one row per task; no scratch database is
    left behind."""
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--smoke",
            "--no-pgbench",
            "--dsn",
            server_dsn,
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    p = result["pgidem"]
    assert p["bulk_enqueue"]["jobs_per_s"] > 0
    assert p["one_enqueue"]["jobs_per_s"] > 0
    assert p["one_enqueue"]["round_trips_per_call"] > 0
    assert {d["task"] for d in p["drains"]} == {"noop", "write_row"}
    for drain in p["drains"]:
        assert drain["verified"] == drain["tasks"] > 0
        assert drain["commits"] > 0
    assert p["latency"]["samples"] == result["sizes"]["latency"]
    assert p["history"]["with_history"]["verified"] == p["history"]["with_history"]["tasks"]
    assert p["rss"]["end_kib"] > 0
    assert [t["target"] for t in result["targets"]]
    assert "| figure | pgidem |" in proc.stdout
    created = result["scratch_databases"]
    assert created and all(name.startswith("pgidem_bench_") for name in created)
    assert _existing(server_dsn, created) == []
