"""What clients send cannot forge log lines: a real process's stderr."""

from __future__ import annotations

import re
import socket
import subprocess

from support.processes import free_port, spawn_webvirt, wait_until_serving
from tests.conftest import DEMO_HOST_URI

RECORD_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


def send_raw(port: int, request: bytes) -> bytes:
    """One request exactly as given; the status line of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        return sock.recv(65536).split(b"\r\n", 1)[0]


def log_of(process: subprocess.Popen[str]) -> str:
    process.terminate()
    _, log = process.communicate(timeout=10)
    assert process.returncode == 0, log
    return log


def test_control_characters_from_clients_cannot_start_a_log_line() -> None:
    port = free_port()
    process = spawn_webvirt(DEMO_HOST_URI, port)  # no token: anyone can send these
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/api/0/version")
        status = send_raw(port, b"GET /api/0/state/x%0d%0aFAKE%20LINE%1b[2K HTTP/1.1\r\n"
                                b"Host: 127.0.0.1\r\n\r\n")
        assert status == b"HTTP/1.1 404 Not Found"
        # aiohttp refuses a raw CR or LF in a header, but takes the line separators that are
        # not ASCII (NEL, U+2028); the cross-site refusal logs the Origin.
        for separator in ("\x85", "\u2028"):
            origin = f"http://a{separator}FAKE ORIGIN".encode()
            status = send_raw(port, b"GET /api/0/state/x HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                    b"Origin: " + origin + b"\r\n\r\n")
            assert status == b"HTTP/1.1 403 Forbidden"
    finally:
        log = log_of(process)
    for line in log.splitlines():
        # Every line is a record of its own or an indented traceback line.
        assert RECORD_START.match(line) or line.startswith("    "), (line, log)
    assert "no domain named 'x\\r\\nFAKE LINE\\x1b[2K'" in log
    assert "Origin http://a\\x85FAKE ORIGIN is not this server" in log
    assert "Origin http://a\\u2028FAKE ORIGIN is not this server" in log
