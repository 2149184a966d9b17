"""A small smoke run of bench/run.py so the benchmarks keep working; the numbers are not
judged here (timing belongs in benchmarks, not tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

HTTP_ROWS = ("bare aiohttp handler (floor)", "GET /api/0/state/linux-dev", "GET /api/0/domains",
             "GET /api/0/state/linux-dev, defaults (access log on)")
FANOUT_ROWS = ("event fan-out, 50 WebSocket clients", "clients that got every event",
               "peak RSS, idle", "peak RSS with 50 clients")
STATS_ROWS = ("stats every 0.5 s to 50 clients: webvirt CPU",
              "stats message delay at 50 clients, 3 messages",
              "clients that got every stats message")
QEMU_ROWS = ("state by libvirt RPC (real QEMU daemon)", "state from the event-fed cache",
             *(f"GET {path}, {n} running domains (real daemon)"
               for n in (1, 3) for path in ("/metrics", "/api/0/domains")),
             "/metrics' read, libvirt only, 3 running", "domain list, libvirt only, 3 running",
             *(f"GET {path}, host b {how}" for path in ("/api/0/state/alpha",
                                                        "/api/0/status/alpha@a")
               for how in ("running", "frozen (and asked)")))


@pytest.mark.time_limit(300)  # its own timeout bounds it
@pytest.mark.skipif(shutil.which("wrk") is None, reason="bench/run.py needs wrk (apt-get "
                    "install wrk)")
def test_bench_smoke_run_prints_every_row() -> None:
    skip_qemu = os.environ.get("WEBVIRT_SKIP_QEMU") == "1"
    result = subprocess.run([sys.executable, "bench/run.py", "--quick",
                             *(["--no-qemu"] if skip_qemu else [])],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode in (0, 1), result.stderr  # 1: a target missed on this machine
    for row in HTTP_ROWS + FANOUT_ROWS + STATS_ROWS + (() if skip_qemu else QEMU_ROWS):
        assert row in result.stdout, (row, result.stdout, result.stderr)
    assert "50/50" in result.stdout  # no client lost, whatever the speed
    assert "requests logged" not in result.stdout  # the access log kept every line
    if skip_qemu:
        assert "QEMU" not in result.stdout
