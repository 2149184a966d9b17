"""webvirt benchmarks, in one run on one machine; prints a table.

    .venv/bin/python bench/run.py            # full run (about ten minutes)
    .venv/bin/python bench/run.py --quick    # smoke run (the test suite uses it)

Needs wrk (apt-get install wrk) for the HTTP rows, and for the last rows the real libvirtd and
QEMU that scripts/install --test installs. The rows of /metrics and live stats are made in
bench/usage.py, those of two hosts (one frozen) in bench/hosts.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import hosts, usage  # noqa: E402
from support.processes import free_port, status_number, wait_until_serving  # noqa: E402

DEMO_URI = f"test://{REPO / 'demo' / 'host.xml'}"
# The servers of a run keep their (empty) rules here, never in the user's state folder;
# removed when the run ends.
STATE_DIR = tempfile.TemporaryDirectory(prefix="webvirt-bench-")


@dataclass
class Row:
    name: str
    value: str
    target: str = ""
    ok: bool | None = None


def start(command: list[str], probe: str, log: IO[bytes] | None = None) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=log or subprocess.DEVNULL)
    wait_until_serving(probe)
    return process


def start_webvirt(port: int, *options: str, uri: str = DEMO_URI,
                  log: IO[bytes] | None = None) -> subprocess.Popen[bytes]:
    """Without `log`, the access log is off, as in the floor: the numbers are about the
    server. With it, webvirt runs at its defaults and logs there."""
    quiet = [] if log else ["--log-level", "warning"]
    return start([sys.executable, "-m", "webvirt", "--connect", uri, "--port", str(port),
                  "--state-dir", STATE_DIR.name, *quiet, *options],
                 f"http://127.0.0.1:{port}/api/0/version", log)


def rss_mib(pid: int) -> tuple[float, float]:
    """Current and peak resident memory of a process."""
    return status_number(pid, "VmRSS") / 1024, status_number(pid, "VmHWM") / 1024


def wrk(url: str, seconds: float, connections: int = 50) -> tuple[float, float, float, int]:
    """Requests/s, p50 and p99 latency in ms and the number of requests, from wrk with one
    thread."""
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", url],
                         capture_output=True, text=True, check=True).stdout

    def latency(percent: str) -> float:
        value, unit = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]

    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{url}: {errors.group(1)} error responses")
    return rate, latency("50"), latency("99"), requests


def http_rows(seconds: float) -> list[Row]:
    rows = []
    bare_port, port = free_port(), free_port()
    bare = start([sys.executable, str(REPO / "bench" / "bare_server.py"), str(bare_port)],
                 f"http://127.0.0.1:{bare_port}/api/0/state/x")
    server = start_webvirt(port)
    try:
        floor, b50, b99, _ = wrk(f"http://127.0.0.1:{bare_port}/api/0/state/linux-dev", seconds)
        rows.append(Row("bare aiohttp handler (floor)",
                        f"{floor:,.0f} req/s  p50 {b50:.2f} ms  p99 {b99:.2f} ms"))
        for path in ("/api/0/state/linux-dev", "/api/0/domains"):
            rate, p50, p99, _ = wrk(f"http://127.0.0.1:{port}{path}", seconds)
            rows.append(http_row(f"GET {path}", rate, p50, p99, floor,
                                 targeted="state" in path))
    finally:
        bare.terminate()
        server.terminate()
        bare.wait()
        server.wait()
    return [*rows, defaults_row(seconds, floor)]


def defaults_row(seconds: float, floor: float) -> Row:
    """webvirt as users run it: the access log on, written to a file."""
    port = free_port()
    with tempfile.TemporaryFile() as log:
        server = start_webvirt(port, log=log)
        try:
            rate, p50, p99, requests = wrk(f"http://127.0.0.1:{port}/api/0/state/linux-dev",
                                           seconds)
        finally:
            server.terminate()
            server.wait()
        log.seek(0)
        logged = sum(b"aiohttp.access" in line for line in log)
    row = http_row("GET /api/0/state/linux-dev, defaults (access log on)", rate, p50, p99,
                   floor, targeted=True)
    if logged < requests:  # the speed must not come from dropping log lines
        row.value += f"  only {logged:,} of {requests:,} requests logged"
        row.ok = False
    return row


def http_row(name: str, rate: float, p50: float, p99: float, floor: float,
             targeted: bool) -> Row:
    share = rate / floor
    return Row(name, f"{rate:,.0f} req/s  p50 {p50:.2f} ms  p99 {p99:.2f} ms  "
               f"({share:.0%} of floor)", ">= 60% of floor" if targeted else "",
               share >= 0.6 if targeted else None)


def fanout_rows(clients: int, changes: int) -> list[Row]:
    port = free_port()
    # Every client comes from 127.0.0.1 here, unlike clients on a LAN.
    server = start_webvirt(port, "--max-connections-per-client", "0")
    try:
        _, idle_peak = rss_mib(server.pid)
        fleet = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "fanout_clients.py"),
             f"ws://127.0.0.1:{port}/api/0/events?type=lifecycle", str(clients), str(changes),
             "120"], stdout=subprocess.PIPE, text=True)
        assert fleet.stdout is not None
        json.loads(fleet.stdout.readline())  # every client has its snapshot
        for n in range(changes):
            action = "start" if n % 2 == 0 else "destroy"
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/0/{action}/win11").close()
            time.sleep(0.25)  # one change at a time: latency, not a burst
        result = json.loads(fleet.stdout.readline())
        fleet.wait()
        _, peak = rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait()
    delays = sorted(d * 1000 for d in result["delays"])
    p50 = statistics.median(delays)
    p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
    complete = result["complete_clients"]
    return [
        Row(f"event fan-out, {clients} WebSocket clients x {changes} changes",
            f"p50 {p50:.1f} ms  p99 {p99:.1f} ms", "p99 < 50 ms", p99 < 50),
        Row("clients that got every event", f"{complete}/{clients}", "all", complete == clients),
        Row("peak RSS, idle", f"{idle_peak:.1f} MiB"),
        Row(f"peak RSS with {clients} clients", f"{peak:.1f} MiB", "< 150 MiB", peak < 150),
    ]


async def last_event(port: int) -> tuple[str, int]:
    """The id and seq of the latest event, from a new client's snapshot."""
    import aiohttp

    async with aiohttp.ClientSession() as session, \
            session.ws_connect(f"ws://127.0.0.1:{port}/api/0/events") as ws:
        snapshot = json.loads((await ws.receive(timeout=10)).data)
    return snapshot["id"], snapshot["seq"]


def resume_rows(clients: int, burst: int) -> list[Row]:
    """Clients that were away during a burst of events all come back at once and resume."""
    port = free_port()
    server = start_webvirt(port, "--replay-buffer", str(2 * burst),
                           "--max-connections-per-client", "0")
    try:
        before, first_seq = asyncio.run(last_event(port))
        for _ in range(burst // 2):  # each pair: a started and a stopped event
            for action in ("start", "destroy"):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/0/{action}/win11").close()
        missed = 0
        while missed < burst:  # the last events may still be on their way to the hub
            missed = asyncio.run(last_event(port))[1] - first_seq
        fleet = subprocess.run(
            [sys.executable, str(REPO / "bench" / "fanout_clients.py"), "--resume",
             f"ws://127.0.0.1:{port}/api/0/events?last_event_id={before}", str(clients),
             str(missed), "120"], stdout=subprocess.PIPE, text=True, check=True)
        result = json.loads(fleet.stdout)
    finally:
        server.terminate()
        server.wait()
    complete, seconds = result["complete_clients"], result["seconds"]
    return [
        Row(f"resume: {clients} clients at once, each {missed} missed events",
            f"{seconds:.2f} s ({clients * missed / seconds:,.0f} events/s)"),
        Row("resumed clients that got exactly what they missed", f"{complete}/{clients}",
            "all, no resync", complete == clients and result["resynced"] == 0),
    ]


async def cache_vs_rpc(uri: str, name: str, calls: int) -> tuple[float, float]:
    """Seconds per state lookup: a libvirt RPC on a connection's thread vs the cache."""
    from webvirt.host import Host, read_domain
    from webvirt.hub import EventHub

    host = Host(uri, EventHub())
    await host.open()
    try:
        started = time.perf_counter()
        for _ in range(calls):
            await host.call(partial(read_domain, ref=name))
        rpc = (time.perf_counter() - started) / calls
        started = time.perf_counter()
        for _ in range(calls):
            assert (await host.resolve(name)).state == "running"
        cached = (time.perf_counter() - started) / calls
    finally:
        await host.close()
    return rpc, cached


def qemu_rows(calls: int) -> list[Row]:
    import libvirt

    from support.libvirt_daemon import LibvirtDaemon, guest_xml

    daemon = LibvirtDaemon()
    daemon.start()
    try:
        conn = libvirt.open(daemon.uri)
        conn.defineXML(guest_xml("bench")).create()
        conn.close()
        rpc, cached = asyncio.run(cache_vs_rpc(daemon.uri, "bench", calls))
    finally:
        daemon.cleanup()
    return [
        Row("state by libvirt RPC (real QEMU daemon)",
            f"{rpc * 1e6:,.0f} us/lookup ({1 / rpc:,.0f}/s)"),
        Row("state from the event-fed cache", f"{cached * 1e6:,.2f} us/lookup "
            f"({rpc / cached:,.0f}x faster)"),
    ]


def print_table(rows: list[Row]) -> None:
    width = max(len(r.name) for r in rows)
    value_width = max(len(r.value) for r in rows)
    for row in rows:
        verdict = "" if row.ok is None else ("PASS" if row.ok else "MISS")
        target = f"  target {row.target}" if row.target else ""
        print(f"{row.name:<{width}}  {row.value:<{value_width}}{target:<22} {verdict}".rstrip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--no-qemu", action="store_true", help="skip the real-QEMU rows")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("bench: wrk not found (apt-get install wrk)", file=sys.stderr)
        return 2
    seconds, clients, changes, calls, burst = ((1, 50, 4, 50, 100) if args.quick
                                               else (10, 1000, 20, 2000, 1000))
    rows = http_rows(seconds) + fanout_rows(clients, changes) + resume_rows(clients, burst)
    # Live stats: clients, messages, seconds apart.
    rows += usage.stats_rows(Row, start_webvirt, free_port, clients,
                             *((3, 0.5) if args.quick else (10, 2.0)))
    if not args.no_qemu:
        rows += qemu_rows(calls)
        # Running guests, requests each.
        rows += usage.real_daemon_rows(Row, start_webvirt, free_port,
                                       *(((1, 3), 5) if args.quick else ((1, 10, 50), 30)))
        # Host a's requests while host b runs, then while b is frozen.
        rows += hosts.frozen_host_rows(Row, start_webvirt, free_port, wrk,
                                       1 if args.quick else 10)
    print_table(rows)
    return 0 if all(r.ok is not False for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
