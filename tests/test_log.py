"""A JSON log stays one object per line when structlog and stdlib logging share it in threads."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

_WRITER = textwrap.dedent(
    """
    import logging, sys, threading
    from pgidem import _log

    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    _log.configure(json=True)
    log = _log.get(worker_id="w")
    lib = logging.getLogger("psycopg.pool")
    start = threading.Barrier(8)

    def ours(n):
        start.wait()
        for i in range(2000):
            log.warning("slot_error", n=n, i=i, error="x" * 200)

    def theirs(n):
        start.wait()
        for i in range(2000):
            lib.warning("error connecting in %r: %s", n, "y" * 200)

    threads = [threading.Thread(target=f, args=(n,)) for n in range(4) for f in (ours, theirs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    """
)


def test_lines_from_structlog_and_stdlib_logging_in_many_threads_are_never_interleaved(
    tmp_path: Path,
) -> None:
    out = tmp_path / "log"
    with out.open("wb") as f:
        subprocess.run([sys.executable, "-c", _WRITER], stderr=f, check=True, timeout=120)
    lines = out.read_text().splitlines()
    assert len(lines) == 16_000
    events = [json.loads(line) for line in lines]  # a shared line is not one JSON object
    assert sum(e["event"] == "slot_error" for e in events) == 8_000
    assert sum(e.get("logger") == "psycopg.pool" for e in events) == 8_000
