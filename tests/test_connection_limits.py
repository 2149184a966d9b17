"""One client cannot lock the others out or take the memory: a real process, real sockets.

Clients come from other loopback addresses (127.0.0.2, ...) so that the server tells them
apart from the well-behaved client on 127.0.0.1.
"""

from __future__ import annotations

import re
import selectors
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from support.processes import free_port, spawn_webvirt, status_number, wait_until_serving
from tests.conftest import DEMO_HOST_URI
from tests.waiting import until_sync

REQUEST_START = b"GET /api/0/version HTTP/1.1\r\nHost: 127.0.0.1\r\n"
HEADER_8K = b"X-Fill: " + b"x" * 8000 + b"\r\n"


@contextmanager
def connections(port: int, sources: Iterable[str]) -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    try:
        for source in sources:
            sock = socket.socket()
            opened.append(sock)
            sock.settimeout(5)
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", port))
        yield opened
    finally:
        for sock in opened:
            sock.close()


def send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the server answered (400) or refused, and closed


def wait_until_closed(socks: list[socket.socket], count: int, seconds: float) -> int:
    """Until the server closed `count` of the sockets; how many it closed."""
    closed = 0
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + seconds
        while closed < count and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    if sock.recv(65536):
                        continue  # an answer (400); the close follows
                except OSError:
                    pass
                selector.unregister(sock)
                closed += 1
    return closed


def unread_bytes(port: int) -> int:
    """Bytes that arrived on the server's sockets and that it has not read yet."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                total += int(fields[4].split(":")[1], 16)
    return total


def stop(process: subprocess.Popen[str]) -> str:
    process.terminate()
    _, log = process.communicate(timeout=10)
    return log


def test_slow_headers_from_one_client_do_not_lock_the_others_out(tmp_path: Path) -> None:
    port = free_port()
    # 256 open files at most, and webvirt cannot raise it: 300 connections would use them up.
    process = spawn_webvirt(DEMO_HOST_URI, port, state_dir=tmp_path, open_files=(256, 256))
    try:
        url = f"http://127.0.0.1:{port}/api/0/state/win11"
        wait_until_serving(url)
        with connections(port, ["127.0.0.2"] * 300) as slow:
            for sock in slow:
                send(sock, REQUEST_START)  # half a request, never finished
            with urllib.request.urlopen(url, timeout=5) as answer:
                assert answer.read() == b'"shut off"'
            # Those over the limit are closed at once; the others wait for the header timeout.
            assert wait_until_closed(slow, 300 - 64, seconds=5) == 300 - 64
    finally:
        log = stop(process)
    refusals = [line for line in log.splitlines() if "connection(s) from 127.0.0.2" in line]
    assert len(refusals) == 1, log  # once, not once per connection
    assert "it already has 64 open" in refusals[0]


def test_unfinished_huge_headers_do_not_take_the_memory(tmp_path: Path) -> None:
    port = free_port()
    process = spawn_webvirt(DEMO_HOST_URI, port, state_dir=tmp_path)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/api/0/version")
        before = status_number(process.pid, "VmRSS")
        # The most one client may hold: an unfinished head just under the limit (64 KiB) on
        # as many connections as it may open.
        with connections(port, ["127.0.0.9"] * 100) as full:
            for sock in full:
                send(sock, REQUEST_START + HEADER_8K * 7)
            # Then 1 MB of headers on each of 200 connections from four other clients.
            sources = [f"127.0.0.{2 + n % 4}" for n in range(200)]
            with connections(port, sources) as huge:
                for sock in huge:
                    send(sock, REQUEST_START + HEADER_8K * 128)
                until_sync(lambda: unread_bytes(port) == 0, 10,
                           "webvirt has read all it was sent")
                grown_mib = (status_number(process.pid, "VmHWM") - before) / 1024
                assert grown_mib < 50, f"{grown_mib:.0f} MiB"
                # 1 MB of headers is over the limit: each was closed.
                assert wait_until_closed(huge, len(huge), seconds=5) == len(huge)
    finally:
        stop(process)


def test_raises_its_open_file_limit_to_the_hard_limit(tmp_path: Path) -> None:
    port = free_port()
    process = spawn_webvirt(DEMO_HOST_URI, port, state_dir=tmp_path, open_files=(256, 4096))
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/api/0/version")
        limits = Path(f"/proc/{process.pid}/limits").read_text()
    finally:
        stop(process)
    assert re.search(r"^Max open files\s+4096\s+4096\s", limits, re.M), limits
