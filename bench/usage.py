"""Benchmarks of /metrics, /api/0/domains and live stats, for bench/run.py.

- Against a real libvirtd with 1, 10 and 50 running QEMU guests (TCG, each with a disk and
  the default balloon): latency of GET /metrics and GET /api/0/domains, one request at a
  time, and what each costs in libvirt alone against how it was read before (one bulk call
  of six stats groups; three calls per domain).
- On the demo host: webvirt's CPU while 1000 WebSocket clients follow `stats` messages, and
  how late each message reaches them.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def percentiles(seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"p50 {statistics.median(ms):.1f} ms  p99 {p99:.1f} ms"


def timed(fn: Callable[[], Any], times: int) -> list[float]:
    fn()  # warm: libvirt's first CPU statistics of a daemon take seconds
    spent = []
    for _ in range(times):
        started = time.perf_counter()
        fn()
        spent.append(time.perf_counter() - started)
    return spent


def fetch(url: str) -> Callable[[], None]:
    def get() -> None:
        with urllib.request.urlopen(url, timeout=60) as response:
            response.read()
    return get


def call_by_call(conn: Any) -> list[tuple[Any, ...]]:
    """/api/0/domains as libvirt was asked before: three calls per domain."""
    return [(d.info(), d.autostart(), d.isPersistent()) for d in conn.listAllDomains()]


# How /metrics read libvirt before: all six groups of every domain in one bulk call.
ONE_CALL_GROUPS = ("STATE", "CPU_TOTAL", "BALLOON", "VCPU", "INTERFACE", "BLOCK")


def one_call(conn: Any) -> Any:
    import libvirt

    groups = 0
    for name in ONE_CALL_GROUPS:
        groups |= getattr(libvirt, f"VIR_DOMAIN_STATS_{name}")
    return conn.getAllDomainStats(groups, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT)


def disked_guest(daemon: Any, name: str) -> str:
    """A guest as most are: a disk (1 MiB, empty) and the default memory balloon. Its block
    stats cost a QEMU monitor round trip, whoever asks."""
    import os
    import pwd

    from support.libvirt_daemon import guest_xml

    image = daemon.base / f"{name}.img"
    with open(image, "wb") as disk:
        disk.truncate(1 << 20)
    if daemon.user:
        entry = pwd.getpwnam(daemon.user)
        os.chown(image, entry.pw_uid, entry.pw_gid)
    return guest_xml(name).replace(
        "<controller", f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
        f"<source file='{image}'/><target dev='vda' bus='virtio'/></disk><controller", 1)


def real_daemon_rows(row: Callable[..., Any], start_webvirt: Callable[..., Any],
                     free_port: Callable[[], int], counts: tuple[int, ...],
                     requests: int) -> list[Any]:
    import libvirt

    from support.libvirt_daemon import LibvirtDaemon
    from webvirt import domain_stats

    rows = []
    daemon = LibvirtDaemon()
    daemon.start()
    conn = libvirt.open(daemon.uri)
    port = free_port()
    server = start_webvirt(port, uri=daemon.uri)
    try:
        running = 0
        for count in counts:
            while running < count:
                conn.defineXML(disked_guest(daemon, f"bench{running}")).create()
                running += 1
            for path in ("/metrics", "/api/0/domains"):
                spent = timed(fetch(f"http://127.0.0.1:{port}{path}"), requests)
                target = "p50 < 100 ms" if path == "/metrics" and count >= 50 else ""
                ok = statistics.median(spent) < 0.1 if target else None
                rows.append(row(f"GET {path}, {count} running domains (real daemon)",
                                percentiles(spent), target, ok))
            now = timed(lambda: domain_stats.read(conn), requests)
            before = timed(lambda: one_call(conn), requests)
            rows.append(row(f"/metrics' read, libvirt only, {count} running",
                            f"{percentiles(now)}  (one call, six groups: "
                            f"{percentiles(before)})"))
            bulk = timed(lambda: domain_stats.list_summaries(conn), requests)
            before = timed(lambda: call_by_call(conn), requests)
            rows.append(row(f"domain list, libvirt only, {count} running",
                            f"{percentiles(bulk)}  (3 calls per domain: {percentiles(before)})"))
    finally:
        server.terminate()
        server.wait()
        conn.close()
        daemon.cleanup()
    return rows


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime, stime in clock ticks (USER_HZ)


def stats_rows(row: Callable[..., Any], start_webvirt: Callable[..., Any],
               free_port: Callable[[], int], clients: int, messages: int,
               interval: float) -> list[Any]:
    port = free_port()
    server = start_webvirt(port, "--max-connections-per-client", "0",
                           "--stats-interval", str(interval))
    try:
        idle_started, idle_cpu = time.monotonic(), cpu_seconds(server.pid)
        time.sleep(messages * interval)  # the same time with nobody listening
        idle = (cpu_seconds(server.pid) - idle_cpu) / (time.monotonic() - idle_started)
        fleet = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "fanout_clients.py"),
             f"ws://127.0.0.1:{port}/api/0/events?type=stats", str(clients), str(messages),
             str(messages * interval + 120), "stats"], stdout=subprocess.PIPE, text=True)
        assert fleet.stdout is not None
        json.loads(fleet.stdout.readline())  # every client has its snapshot
        started, cpu = time.monotonic(), cpu_seconds(server.pid)
        result = json.loads(fleet.stdout.readline())
        busy = (cpu_seconds(server.pid) - cpu) / (time.monotonic() - started)
        fleet.wait()
    finally:
        server.terminate()
        server.wait()
    complete = result["complete_clients"]
    return [
        row(f"stats every {interval:g} s to {clients} clients: webvirt CPU",
            f"{busy:.1%} of a core (idle, nobody listening: {idle:.1%})"),
        row(f"stats message delay at {clients} clients, {messages} messages",
            percentiles(result["delays"]), "p99 < 50 ms",
            sorted(result["delays"])[int(len(result["delays"]) * 0.99)] < 0.05),
        row("clients that got every stats message", f"{complete}/{clients}", "all",
            complete == clients),
    ]
