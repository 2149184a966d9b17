"""Benchmark rows for several hosts: requests for host A while host B runs, then while B's
libvirtd is frozen (SIGSTOP) and a client keeps asking B. Two private session daemons with a
real QEMU guest each; one webvirt with --connect a=... --connect b=...

    .venv/bin/python bench/hosts.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from support.libvirt_daemon import LibvirtDaemon, guest_xml  # noqa: E402

CALL_TIMEOUT_S = 10
# The paths asked of host A: from the cache, and one libvirt call (the live XML) each.
PATHS = ("/api/0/state/alpha", "/api/0/status/alpha@a")


def ask_forever(url: str, stop: threading.Event) -> None:
    """A client of host B: while B is frozen, each request waits (then fails)."""
    while not stop.is_set():
        try:
            urllib.request.urlopen(url, timeout=CALL_TIMEOUT_S + 5).close()
        except (urllib.error.URLError, OSError):
            pass
        stop.wait(0.1)  # a client retrying, not a flood of fast 503s


@contextmanager
def two_daemons() -> Iterator[tuple[LibvirtDaemon, LibvirtDaemon]]:
    import libvirt

    daemons = (LibvirtDaemon(), LibvirtDaemon())
    try:
        for daemon, name in zip(daemons, ("alpha", "beta"), strict=True):
            daemon.start()
            conn = libvirt.open(daemon.uri)
            conn.defineXML(guest_xml(name)).create()
            conn.close()
        yield daemons
    finally:
        for daemon in daemons:
            if daemon.process is not None:
                daemon.signal(signal.SIGCONT)
            daemon.cleanup()


def frozen_host_rows(row: Callable[..., Any], start_webvirt: Callable[..., Any],
                     free_port: Callable[[], int],
                     wrk: Callable[[str, float], tuple[float, float, float, int]],
                     seconds: float) -> list[Any]:
    rows = []
    with two_daemons() as (a, b):
        port = free_port()
        server: subprocess.Popen[bytes] = start_webvirt(
            port, "--connect", f"b={b.uri}", "--call-timeout", str(CALL_TIMEOUT_S),
            uri=f"a={a.uri}")
        stop = threading.Event()
        try:
            for path in PATHS:
                url = f"http://127.0.0.1:{port}{path}"
                rate, p50, p99, _ = wrk(url, seconds)
                rows.append(row(f"GET {path}, host b running",
                                f"{rate:,.0f} req/s  p50 {p50:.2f} ms  p99 {p99:.2f} ms"))
                b.signal(signal.SIGSTOP)
                asking_b = threading.Thread(
                    target=ask_forever,
                    args=(f"http://127.0.0.1:{port}/api/0/status/beta@b", stop), daemon=True)
                asking_b.start()
                try:
                    frozen, f50, f99, _ = wrk(url, seconds)
                finally:
                    b.signal(signal.SIGCONT)
                    stop.set()
                    asking_b.join(CALL_TIMEOUT_S + 10)
                    stop.clear()
                rows.append(row(f"GET {path}, host b frozen (and asked)",
                                f"{frozen:,.0f} req/s  p50 {f50:.2f} ms  p99 {f99:.2f} ms",
                                f"p99 < {CALL_TIMEOUT_S * 100} ms",
                                f99 < CALL_TIMEOUT_S * 100))
                # b reconnects before the next round.
                wait_connected(port, "b")
        finally:
            server.terminate()
            server.wait()
    return rows


def wait_connected(port: int, name: str, seconds: float = 30) -> None:
    import json
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/0/hosts") as response:
            if any(h["name"] == name and h["connected"] for h in json.load(response)):
                return
        time.sleep(0.1)
    raise RuntimeError(f"host {name} did not reconnect within {seconds:g} s")


def main() -> int:
    from bench.run import Row, print_table, start_webvirt, wrk
    from support.processes import free_port

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    rows = frozen_host_rows(Row, start_webvirt, free_port, wrk, args.seconds)
    print_table(rows)
    return 0 if all(r.ok is not False for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
