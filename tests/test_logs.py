"""What clients send cannot forge log lines or put a token in the log: a real process's stderr."""

from __future__ import annotations

import re
import socket
import subprocess
import urllib.request
from pathlib import Path

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


def test_control_characters_from_clients_cannot_start_a_log_line(tmp_path: Path) -> None:
    port = free_port()
    # No token: anyone can send these.
    process = spawn_webvirt(DEMO_HOST_URI, port, state_dir=tmp_path)
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


def test_no_token_reaches_the_log_in_any_case_or_error(tmp_path: Path) -> None:
    token = "real-token-4f1c9a"
    guesses = ["guess-upper-77", "guess-mixed-78", "guess-long-79", "guess-bearer-80"]
    port = free_port()
    process = spawn_webvirt(DEMO_HOST_URI, port, "--token", token, state_dir=tmp_path)
    try:
        base = f"http://127.0.0.1:{port}/api/0"
        wait_until_serving(f"{base}/version")
        # The Guard only takes a lowercase `token`; other spellings are refused, but are
        # somebody's secret all the same.
        for key, value in (("TOKEN", guesses[0]), ("Token", guesses[1])):
            assert send_raw(port, f"GET /api/0/version?{key}={value} HTTP/1.1\r\n"
                                  "Host: 127.0.0.1\r\n\r\n".encode()) \
                == b"HTTP/1.1 401 Unauthorized"
        with urllib.request.urlopen(f"{base}/version?%74oken={token}", timeout=5) as answer:
            assert answer.status == 200  # `token`, percent-encoded
        # A request line over aiohttp's limit: its parser error quotes the start of the line
        # in aiohttp.server's traceback.
        for value in (token, guesses[2]):
            line = f"GET /api/0/version?token={value}&pad={'x' * 9000} HTTP/1.1\r\n"
            assert send_raw(port, line.encode() + b"Host: 127.0.0.1\r\n\r\n") \
                == b"HTTP/1.0 400 Bad Request"
        # A malformed header: the parser error quotes the header line.
        for value in (token, guesses[3]):
            assert send_raw(port, f"GET /api/0/version HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                  f"Authorization: Bearer {value}\rX\r\n\r\n".encode()) \
                == b"HTTP/1.0 400 Bad Request"
        # A character the URL may not hold: the error quotes the whole request line.
        assert send_raw(port, f"GET /api/0/version?token={token}\x00 HTTP/1.1\r\n"
                              "Host: 127.0.0.1\r\n\r\n".encode()) == b"HTTP/1.0 400 Bad Request"
    finally:
        log = log_of(process)
    for secret in (token, *guesses):
        assert secret not in log, (secret, log)
    assert "LineTooLong" in log and "Missing expected LF" in log  # the errors are logged
    assert '"GET /api/0/version?TOKEN=*** HTTP/1.1" 401' in log
