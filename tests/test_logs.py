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


def percent_encoded(text: str) -> str:
    return "".join(f"%{byte:02X}" for byte in text.encode())


def test_no_token_reaches_the_log_in_any_case_or_error(tmp_path: Path) -> None:
    token = "real-token-4f1c9a"
    guesses = ["guess-upper-77", "guess-mixed-78", "guess-long-79", "guess-bearer-80",
               "guess-encoded-key-81", "guess-encoded-key-82", "guess-spaces-83",
               "guess-tab-84", "guess-case-tab-85", "guess-websocket-86"]
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
        with urllib.request.urlopen(f"{base}/version?token={percent_encoded(token)}",
                                    timeout=5) as answer:
            assert answer.status == 200  # the value percent-encoded
        # A request line over aiohttp's limit: its parser error quotes the start of the line
        # in aiohttp.server's traceback; so it does with the key percent-encoded, as the Guard
        # takes it, and with the value percent-encoded.
        for query in (f"token={token}", f"token={guesses[2]}", f"%74oken={token}",
                      f"%74oken={guesses[4]}", f"token={percent_encoded(token)}"):
            line = f"GET /api/0/version?{query}&pad={'x' * 9000} HTTP/1.1\r\n"
            assert send_raw(port, line.encode() + b"Host: 127.0.0.1\r\n\r\n") \
                == b"HTTP/1.0 400 Bad Request"
        # A malformed header: the parser error quotes the header line (a tab as \t), whatever
        # the case of Bearer and the blanks after it.
        for header in (f"Bearer {token}", f"Bearer {guesses[3]}", f"Bearer   {token}",
                       f"Bearer   {guesses[6]}", f"Bearer\t{token}", f"Bearer\t{guesses[7]}",
                       f"bEaReR \t {token}", f"bEaReR \t {guesses[8]}"):
            assert send_raw(port, f"GET /api/0/version HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                  f"Authorization: {header}\rX\r\n\r\n".encode()) \
                == b"HTTP/1.0 400 Bad Request"
        # A character the URL may not hold: the error quotes the whole request line.
        for query in (f"token={token}", f"T%6Fken={token}", f"T%6Fken={guesses[5]}"):
            assert send_raw(port, f"GET /api/0/version?{query}\x00 HTTP/1.1\r\n"
                                  "Host: 127.0.0.1\r\n\r\n".encode()) \
                == b"HTTP/1.0 400 Bad Request"
        # The event stream's WebSocket, which a browser can only give a token in its URL.
        for value, status in ((token, b"HTTP/1.1 101 Switching Protocols"),
                              (guesses[9], b"HTTP/1.1 401 Unauthorized")):
            assert send_raw(port, f"GET /api/0/events?token={value} HTTP/1.1\r\n"
                                  "Host: 127.0.0.1\r\nUpgrade: websocket\r\n"
                                  "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                                  .encode()) == status
    finally:
        log = log_of(process)
    for secret in (token, percent_encoded(token), *guesses):
        assert secret not in log, (secret, log)
    # The errors are logged, with what they quote but the token.
    assert "LineTooLong" in log and "Missing expected LF" in log
    assert "bytearray(b'/api/0/version?%74oken=***&pad=xxx" in log
    assert "b'Authorization: Bearer\\t***\\rX'" in log
    assert "b'Authorization: bEaReR \\t ***\\rX'" in log
    assert "b'GET /api/0/version?T%6Fken=***\\x00 HTTP/1.1'" in log
    assert '"GET /api/0/version?TOKEN=*** HTTP/1.1" 401' in log
    assert '"GET /api/0/events?token=*** HTTP/1.1" 101' in log
    assert '"GET /api/0/events?token=*** HTTP/1.1" 401' in log


def test_the_log_hides_a_token_only_where_it_is_a_credential(tmp_path: Path) -> None:
    """Anywhere else its text is left alone: hiding every occurrence garbled what happened to
    hold it (and a short token's occurrences in every line gave it away)."""
    token = "vms-9b2e6d41c07f"
    state_dir = tmp_path / token  # in the log, the token's text where it is no credential
    port = free_port()
    process = spawn_webvirt(DEMO_HOST_URI, port, "--token", token, state_dir=state_dir)
    try:
        base = f"http://127.0.0.1:{port}/api/0"
        wait_until_serving(f"{base}/version")  # refused: no token
        with urllib.request.urlopen(f"{base}/version?token={token}", timeout=5) as answer:
            assert answer.status == 200
    finally:
        log = log_of(process)
    assert f"state: {state_dir})" in log
    # webvirt's own placeholder in a refusal is no credential either.
    assert ("refused GET /api/0/version from 127.0.0.1: a valid token is required: "
            "Authorization: Bearer TOKEN or ?token=TOKEN\n") in log
    assert '"GET /api/0/version?token=*** HTTP/1.1" 200' in log
