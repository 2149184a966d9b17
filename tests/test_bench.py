"""A small smoke run of bench/run.py so the benchmarks keep working; the numbers are not
judged here (timing belongs in benchmarks, not tests)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_bench_smoke_run_prints_every_row() -> None:
    result = subprocess.run([sys.executable, "bench/run.py", "--quick"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode in (0, 1), result.stderr  # 1: a target missed on this machine
    for row in ("bare aiohttp handler (floor)", "GET /api/0/state/linux-dev",
                "GET /api/0/domains", "event fan-out, 50 WebSocket clients",
                "clients that got every event", "peak RSS, idle", "peak RSS with 50 clients",
                "state by libvirt RPC (real QEMU daemon)", "state from the event-fed cache"):
        assert row in result.stdout, (row, result.stdout, result.stderr)
    assert "50/50" in result.stdout  # no client lost, whatever the speed
