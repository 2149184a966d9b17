"""Soak: webvirt against a real libvirtd with QEMU guests, under random faults.

    .venv/bin/python bench/soak.py --minutes 10

For the given time: random power actions on three diskless guests, event clients (WebSocket
and SSE) coming and going, and every so often the daemon killed (-9) and restarted, or frozen
(SIGSTOP) until webvirt notices, then resumed. At the end webvirt must be alive, its states
must agree with `virsh domstate`, and its memory, fds and threads must be flat. Not part of
the test run (it takes minutes); the README states the result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from support.libvirt_daemon import LibvirtDaemon, guest_xml  # noqa: E402
from support.processes import (  # noqa: E402
    free_port,
    spawn_webvirt,
    status_number,
    wait_until_serving,
)

GUESTS = ("soak-a", "soak-b", "soak-c")
ACTIONS = ("start", "destroy", "suspend", "resume", "reset", "shutdown", "reboot")
SEED_TEXT = {"running": "running", "paused": "paused by user", "shut off": "shut off"}


def fd_kinds(pid: int) -> dict[str, int]:
    """What the open files are: sockets, eventfds, pipes, files."""
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kind = target.split(":")[0] if ":" in target else "file"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def usage(pid: int) -> dict[str, int]:
    return {"rss_kib": status_number(pid, "VmRSS"), "threads": status_number(pid, "Threads"),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def virsh_state(uri: str, name: str) -> str:
    return subprocess.run(["virsh", "-c", uri, "domstate", name], capture_output=True,
                          text=True, timeout=30).stdout.strip()


class Soak:
    def __init__(self, base: str, daemon: LibvirtDaemon, chooser: random.Random):
        self.base = base
        self.daemon = daemon
        self.chooser = chooser
        self.counts: dict[str, int] = {}

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    async def actions(self, session: aiohttp.ClientSession, until: float) -> None:
        while time.monotonic() < until:
            action, guest = self.chooser.choice(ACTIONS), self.chooser.choice(GUESTS)
            try:
                async with session.post(f"{self.base}/api/0/{action}/{guest}?timeout=2",
                                        timeout=aiohttp.ClientTimeout(total=60)) as response:
                    self.count(f"HTTP {response.status}")
            except (aiohttp.ClientError, TimeoutError):
                self.count("HTTP error")

    async def clients(self, session: aiohttp.ClientSession, until: float) -> None:
        while time.monotonic() < until:
            try:
                if self.chooser.random() < 0.5:
                    async with session.ws_connect(f"{self.base}/api/0/events") as ws:
                        for _ in range(self.chooser.randint(1, 5)):
                            await ws.receive(timeout=5)
                else:
                    async with session.get(f"{self.base}/api/0/events",
                                           headers={"Accept": "text/event-stream"}) as sse:
                        await asyncio.wait_for(sse.content.readline(), 5)
                self.count("event client")
            except (aiohttp.ClientError, TimeoutError):
                self.count("event client error")

    async def faults(self, session: aiohttp.ClientSession, until: float) -> None:
        while time.monotonic() + 60 < until:
            await asyncio.sleep(self.chooser.uniform(20, 40))
            async with session.ws_connect(f"{self.base}/api/0/events?type=connection") as ws:
                snapshot = json.loads((await ws.receive(timeout=10)).data)
                if not snapshot["connected"]:
                    # Already reconnecting (a call timed out under load): let it finish first.
                    self.count("fault waited for a reconnect")
                    await self.connection_event(ws, "restored")
                if self.chooser.random() < 0.5:
                    self.daemon.kill()
                    self.count("daemon killed")
                    await self.connection_event(ws, "lost")
                    self.daemon.start()
                else:
                    self.daemon.signal(signal.SIGSTOP)
                    self.count("daemon frozen")
                    try:
                        await self.connection_event(ws, "lost")
                    finally:
                        self.daemon.signal(signal.SIGCONT)
                await self.connection_event(ws, "restored")

    async def connection_event(self, ws: aiohttp.ClientWebSocketResponse, state: str) -> None:
        async with asyncio.timeout(60):
            while True:
                message = json.loads((await ws.receive()).data)
                if message["type"] == "connection":
                    assert message["state"] == state, message
                    return


async def settled(pid: int, before: dict[str, int] | None) -> dict[str, int]:
    """Usage once the clients' connections are gone on the server's side too (bounded)."""
    deadline = time.monotonic() + 15
    while True:
        now = usage(pid)
        if (before is not None and now["fds"] <= before["fds"]) or time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.5)


async def run(minutes: float, seed: int) -> int:
    daemon = LibvirtDaemon()
    daemon.start()
    port = free_port()
    server = spawn_webvirt(daemon.uri, port, "--call-timeout", "10", "--log-level", "warning",
                           state_dir=daemon.base / "webvirt-state")
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(server.stderr or ()), daemon=True).start()
    try:
        import libvirt
        conn = libvirt.open(daemon.uri)
        for name in GUESTS:
            conn.defineXML(guest_xml(name)).create()
        conn.close()
        base = f"http://127.0.0.1:{port}"
        wait_until_serving(f"{base}/api/0/version")
        soak = Soak(base, daemon, random.Random(seed))
        async with aiohttp.ClientSession() as session:
            await soak.actions(session, time.monotonic() + 10)  # warm up
        before = await settled(server.pid, None)
        async with aiohttp.ClientSession() as session:
            until = time.monotonic() + minutes * 60
            await asyncio.gather(soak.actions(session, until), soak.actions(session, until),
                                 soak.clients(session, until), soak.faults(session, until))
            # Quiet: let the last events and re-reads land.
            async with asyncio.timeout(60):
                while True:
                    async with session.get(f"{base}/api/0/domains") as response:
                        if response.status == 200:
                            break
                    await asyncio.sleep(0.5)
            await asyncio.sleep(3)
            disagreements = []
            for name in GUESTS:
                async with session.get(f"{base}/api/0/state/{name}") as response:
                    cached = await response.json()
                truth = virsh_state(daemon.uri, name)
                if SEED_TEXT.get(truth, truth) != cached:
                    disagreements.append(f"{name}: webvirt {cached!r}, virsh {truth!r}")
        alive = server.poll() is None
        after = await settled(server.pid, before)
        after_kinds = fd_kinds(server.pid) if alive else {}
    finally:
        server.terminate()
        server.wait(30)
        daemon.cleanup()
    print(f"soak: {minutes:g} min, seed {seed}")
    print("  " + ", ".join(f"{k}: {v}" for k, v in sorted(soak.counts.items())))
    print(f"  webvirt alive: {alive}" + ("" if alive else "\n" + "".join(log[-30:])))
    reasons: dict[str, int] = {}
    for line in log:
        if "lost the libvirt connection (" in line:
            reason = line.split("lost the libvirt connection (", 1)[1].split(")", 1)[0]
            reasons[reason] = reasons.get(reason, 0) + 1
    print("  connection lost: " + ", ".join(f"{n} x {r}" for r, n in sorted(reasons.items())))
    if "Traceback" in "".join(log):
        print("  tracebacks in the log:\n" + "".join(log[-40:]))
    print(f"  states agree with virsh: {not disagreements} {disagreements or ''}")
    for key in ("rss_kib", "fds", "threads"):
        print(f"  {key}: {before[key]} -> {after[key]}")
    print(f"  open files at the end: {after_kinds}")
    flat = (after["fds"] <= before["fds"] + 2 and after["threads"] <= before["threads"]
            and after["rss_kib"] < before["rss_kib"] * 1.25 + 4096)
    print(f"  resources flat: {flat}")
    return 0 if alive and not disagreements and flat else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10, help="how long (default 10)")
    parser.add_argument("--seed", type=int, default=int(time.time()),
                        help="random seed, to repeat a run")
    args = parser.parse_args()
    return asyncio.run(run(args.minutes, args.seed))


if __name__ == "__main__":
    raise SystemExit(main())
