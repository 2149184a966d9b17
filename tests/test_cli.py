"""The command line, run as a user runs it: a real process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.conftest import DEMO_HOST_URI, REPO
from tests.processes import free_port, spawn_webvirt, wait_until_serving


def webvirt(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "webvirt", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def test_help_names_every_option() -> None:
    result = webvirt("-h")
    assert result.returncode == 0
    for option in ("--address", "--port", "--connect", "--devices", "--log-level"):
        assert option in result.stdout
    assert "127.0.0.1" in result.stdout
    assert "5000" in result.stdout


def test_unreachable_libvirt_is_a_one_line_error() -> None:
    result = webvirt("--connect", "qemu+unix:///system?socket=/nonexistent/sock",
                     "--port", str(free_port()))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("webvirt: error")]
    assert len(errors) == 1
    assert "cannot connect to libvirt" in errors[0]
    assert "Traceback" not in result.stderr


def test_port_in_use_is_a_one_line_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = webvirt("--connect", DEMO_HOST_URI, "--port", str(port))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_serves_the_demo_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    process = spawn_webvirt(DEMO_HOST_URI, port)
    try:
        url = f"http://127.0.0.1:{port}/api/0/state/win11"
        wait_until_serving(url)
        with urllib.request.urlopen(url, timeout=2) as response:
            assert response.read() == b'"shut off"'
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0
    assert "serving http://127.0.0.1" in stderr
    assert "GET /api/0/state/win11" in stderr  # the access log
    assert "Traceback" not in stderr


def test_token_from_the_environment_and_lan_warning() -> None:
    port = free_port()
    env = {**os.environ, "WEBVIRT_TOKEN": "abc-not-in-logs"}
    process = spawn_webvirt(DEMO_HOST_URI, port, env=env)
    try:
        url = f"http://127.0.0.1:{port}/api/0/version"
        wait_until_serving(url)
        try:
            urllib.request.urlopen(url, timeout=2)
            raise AssertionError("answered without the token")
        except urllib.error.HTTPError as err:
            assert err.code == 401
        request = urllib.request.Request(url, headers={"Authorization": "Bearer abc-not-in-logs"})
        with urllib.request.urlopen(request, timeout=2) as response:
            assert response.status == 200
        with urllib.request.urlopen(url + "?token=abc-not-in-logs&x=1", timeout=2) as response:
            assert response.status == 200
    finally:
        process.terminate()
        _, log = process.communicate(timeout=10)
    assert "refused GET /api/0/version from 127.0.0.1: a valid token is required" in log
    assert '"GET /api/0/version?token=***&x=1 HTTP/1.1" 200' in log
    assert "abc-not-in-logs" not in log

    result = webvirt("--connect", "qemu+unix:///system?socket=/nonexistent/sock",
                     "--address", "0.0.0.0", "--port", str(free_port()))
    assert "without --token" in result.stderr
