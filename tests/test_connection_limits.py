"""One client cannot lock the others out or take the memory: a real process, real sockets.

Clients come from other loopback addresses (127.0.0.2, ...) so that the server tells them
apart from the well-behaved client on 127.0.0.1.
"""

from __future__ import annotations

import json
import re
import selectors
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from support.processes import free_port, spawn_webvirt, status_number, wait_until_serving
from tests.conftest import DEMO_HOST_URI
from tests.waiting import until_sync
from webvirt.connection_limits import HEAD_TOO_LARGE, MAX_HEAD_BYTES, _HeadBytes

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


def post_rule(port: int, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/0/rules", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def read_answer(sock: socket.socket) -> bytes:
    """One whole HTTP answer (head and Content-Length body), or what came before the close."""
    answer = b""
    while (end := answer.find(b"\r\n\r\n")) < 0 or len(answer) < end + 4 + int(
            (re.search(rb"(?i)\r\ncontent-length: *(\d+)", answer) or [0, b"0"])[1]):
        if not (chunk := sock.recv(65536)):
            break
        answer += chunk
    return answer


def test_a_body_has_a_limit_of_its_own_and_the_head_limit_counts_heads(tmp_path: Path) -> None:
    port = free_port()
    process = spawn_webvirt(DEMO_HOST_URI, port, state_dir=tmp_path)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/api/0/version")
        rule = {"domain": "win11", "match": {"vendor_id": "046d", "product_id": "c52b"}}
        # 60 KiB of body after a head: read and judged, not taken for a head that is too large.
        padded = json.dumps({**rule, "note": "x" * 60_000}).encode()
        status, answer = post_rule(port, padded)
        assert (status, answer["code"]) == (400, "bad_rule"), answer
        status, answer = post_rule(port, json.dumps({**rule, "note": "x" * 100_000}).encode())
        assert (status, answer["code"]) == (413, "request_entity_too_large"), answer
        assert "65536" in answer["detail"], answer
        # One connection, bodies between heads (90 KiB in all): each head is counted alone.
        with connections(port, ["127.0.0.1"]) as (sock,):
            body = json.dumps({**rule, "note": "x" * 30_000}).encode()
            for _ in range(3):
                sock.sendall(b"POST /api/0/rules HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                             b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
                assert read_answer(sock).startswith(b"HTTP/1.1 400 Bad Request\r\n")
            sock.sendall(REQUEST_START + b"\r\n")
            assert read_answer(sock).startswith(b"HTTP/1.1 200 OK\r\n")
            sock.sendall(REQUEST_START + HEADER_8K * 9)  # a head of 72 KiB is still too large
            assert read_answer(sock) == HEAD_TOO_LARGE
    finally:
        stop(process)


def test_a_client_that_hangs_up_mid_body_is_no_error(tmp_path: Path) -> None:
    port = free_port()
    process = spawn_webvirt(DEMO_HOST_URI, port, "--log-level", "debug", state_dir=tmp_path)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/api/0/version")
        for _ in range(5):
            with connections(port, ["127.0.0.1"]) as (sock,):
                sock.sendall(b"POST /api/0/rules HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                             b"application/json\r\nContent-Length: 100\r\n\r\n{\"domain\": ")
        # The server read and ended them all: a request after them is answered.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/0/version", timeout=5):
            pass
        until_sync(lambda: unread_bytes(port) == 0, 5, "webvirt has read all it was sent")
    finally:
        log = stop(process)
    assert "ERROR" not in log and "Traceback" not in log, log
    assert log.count("POST /api/0/rules: the client hung up before its request was read "
                     "whole") == 5, log
    assert '"POST /api/0/rules HTTP/1.1" 500' not in log


def test_the_head_count_holds_for_tiny_reads_and_after_a_chunked_body() -> None:
    """Reads of three bytes were never counted, and a chunked body left the next 64 KiB
    uncounted: either way a client could send heads as large as it liked."""
    head = REQUEST_START + HEADER_8K * 9  # 72 KiB
    tiny = _HeadBytes()
    assert max(tiny.add(head[i:i + 3]) for i in range(0, len(head), 3)) > MAX_HEAD_BYTES
    after_chunked = _HeadBytes()
    assert after_chunked.add(b"POST /api/0/rules HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n") == 0
    assert after_chunked.add(head) > MAX_HEAD_BYTES
    # A body its Content-Length announces is not a head, whatever it holds.
    with_body = _HeadBytes()
    body = b"\r\n\r\n".join([b"x" * 30_000] * 3)
    assert with_body.add(b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)) == 0
    assert with_body.add(body) == 0 and with_body.add(REQUEST_START) == len(REQUEST_START)


def test_a_chunked_body_is_read(tmp_path: Path) -> None:
    port = free_port()
    process = spawn_webvirt(DEMO_HOST_URI, port, state_dir=tmp_path)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/api/0/version")
        with connections(port, ["127.0.0.1"]) as (sock,):
            body = json.dumps({"domain": "win11", "match": {"vendor_id": "046d",
                                                            "product_id": "c52b"}}).encode()
            sock.sendall(b"POST /api/0/rules HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                         b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
            assert read_answer(sock).startswith(b"HTTP/1.1 201 Created\r\n")
            sock.sendall(REQUEST_START + HEADER_8K * 9)  # and the next head is counted
            assert read_answer(sock) == HEAD_TOO_LARGE
    finally:
        stop(process)
