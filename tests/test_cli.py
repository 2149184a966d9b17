"""The command line, run as a user runs it: a real process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from itertools import pairwise
from pathlib import Path

import pytest

from tests.conftest import DEMO_HOST_URI, REPO
from tests.processes import free_port, spawn_webvirt, wait_until_serving
from webvirt.cli import default_state_dir


def webvirt(*args: str, state_dir: Path, timeout: float = 20,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "webvirt", "--state-dir", str(state_dir), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def test_help_names_every_option(tmp_path: Path) -> None:
    result = webvirt("-h", state_dir=tmp_path)
    assert result.returncode == 0
    for option in ("--address", "--port", "--connect", "--devices", "--state-dir",
                   "--log-level"):
        assert option in result.stdout
    assert "127.0.0.1" in result.stdout
    assert "5000" in result.stdout
    help_text = " ".join(result.stdout.split())  # as argparse wrapped it, on one line
    assert help_text.count("at least 16 characters") == 2  # --token and --read-token


def test_unreachable_libvirt_is_a_one_line_error(tmp_path: Path) -> None:
    result = webvirt("--connect", "qemu+unix:///system?socket=/nonexistent/sock",
                     "--port", str(free_port()), state_dir=tmp_path)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("webvirt: error")]
    assert len(errors) == 1
    assert "cannot connect to libvirt" in errors[0]
    assert "Traceback" not in result.stderr


def test_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = webvirt("--connect", DEMO_HOST_URI, "--port", str(port), state_dir=tmp_path)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("environ", "euid", "expected"), [
    ({}, 1000, "/home/ann/.local/state/webvirt"),
    ({"XDG_STATE_HOME": "/data/state"}, 1000, "/data/state/webvirt"),
    ({"XDG_STATE_HOME": "state"}, 1000, "/home/ann/.local/state/webvirt"),  # not absolute
    ({"XDG_STATE_HOME": ""}, 1000, "/home/ann/.local/state/webvirt"),
    ({}, 0, "/var/lib/webvirt"),
    ({"XDG_STATE_HOME": "/root/.state"}, 0, "/var/lib/webvirt"),  # a daemon's, as root
])
def test_the_default_state_folder(environ: dict[str, str], euid: int, expected: str) -> None:
    assert default_state_dir(environ, euid, Path("/home/ann")) == Path(expected)


@pytest.mark.parametrize(("where", "reason"), [
    ("file/state", "cannot create the state folder {}: Not a directory"),
    ("file", "the state folder {} is a file"),
    ("/proc", "cannot open /proc/rules.sqlite3: unable to open database file"),  # even as root
])
def test_a_state_folder_that_cannot_be_used_is_a_one_line_error(
        tmp_path: Path, where: str, reason: str) -> None:
    (tmp_path / "file").write_text("")
    state = tmp_path / where
    result = webvirt("--connect", DEMO_HOST_URI, "--port", str(free_port()), state_dir=state)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"webvirt: error: {reason.format(state)}")


def test_a_second_webvirt_on_the_same_state_folder_says_which_process_has_it(
        tmp_path: Path) -> None:
    port = free_port()
    first = spawn_webvirt(DEMO_HOST_URI, port, state_dir=tmp_path)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/api/0/version", first)
        result = webvirt("--connect", DEMO_HOST_URI, "--port", str(free_port()),
                         state_dir=tmp_path)
    finally:
        first.terminate()
        first.communicate(timeout=10)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"webvirt: error: the state folder {tmp_path} is in use by another webvirt (process "
        f"{first.pid}); give each webvirt a --state-dir of its own"]


def test_serves_the_demo_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    process = spawn_webvirt(DEMO_HOST_URI, port, state_dir=tmp_path / "state")
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
    assert (tmp_path / "state" / "rules.sqlite3").is_file()  # --state-dir, made at start


def test_token_from_the_environment_and_lan_warning(tmp_path: Path) -> None:
    port = free_port()
    token = "4f1c9a7e2b3d8c60"  # 16 characters: the shortest token webvirt takes
    env = {**os.environ, "WEBVIRT_TOKEN": token}
    process = spawn_webvirt(DEMO_HOST_URI, port, state_dir=tmp_path, env=env)
    try:
        url = f"http://127.0.0.1:{port}/api/0/version"
        wait_until_serving(url)
        try:
            urllib.request.urlopen(url, timeout=2)
            raise AssertionError("answered without the token")
        except urllib.error.HTTPError as err:
            assert err.code == 401
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=2) as response:
            assert response.status == 200
        with urllib.request.urlopen(url + f"?token={token}&x=1", timeout=2) as response:
            assert response.status == 200
    finally:
        process.terminate()
        _, log = process.communicate(timeout=10)
    assert "refused GET /api/0/version from 127.0.0.1: a valid token is required" in log
    assert '"GET /api/0/version?token=***&x=1 HTTP/1.1" 200' in log
    assert token not in log

    result = webvirt("--connect", "qemu+unix:///system?socket=/nonexistent/sock",
                     "--address", "0.0.0.0", "--port", str(free_port()), state_dir=tmp_path)
    assert "without --token" in result.stderr


GOOD_TOKEN = "0123456789abcdef0123"
SHORT = "too-short-token"  # 15 characters
# What a token must be, and the start of the one-line error that says so.
TOO_SHORT = "use at least 16 characters (a short token is guessed"
UNSENDABLE = "use only letters, digits and - . _ ~ + /"


@pytest.mark.parametrize(("options", "environ", "error"), [
    (["--token", "T"], {}, f"--token (or $WEBVIRT_TOKEN): {TOO_SHORT}"),
    (["--token", SHORT], {}, f"--token (or $WEBVIRT_TOKEN): {TOO_SHORT}"),
    (["--token", ""], {}, f"--token (or $WEBVIRT_TOKEN): {TOO_SHORT}"),  # an unset $VARIABLE
    ([], {"WEBVIRT_TOKEN": SHORT}, f"--token (or $WEBVIRT_TOKEN): {TOO_SHORT}"),
    (["--token", GOOD_TOKEN, "--read-token", SHORT], {},
     f"--read-token (or $WEBVIRT_READ_TOKEN): {TOO_SHORT}"),
    (["--token", GOOD_TOKEN], {"WEBVIRT_READ_TOKEN": f"{GOOD_TOKEN}-read,view"},
     f"--read-token (or $WEBVIRT_READ_TOKEN): {TOO_SHORT}"),
    # Whitespace, and characters outside a Bearer token's (RFC 6750): a header or a URL does
    # not carry them as they are, and the log could hide only part of such a token.
    (["--token", " " * 20], {}, f"--token (or $WEBVIRT_TOKEN): {UNSENDABLE}"),
    (["--token", "correct horse battery staple"], {},
     f"--token (or $WEBVIRT_TOKEN): {UNSENDABLE}"),
    (["--token", f"{GOOD_TOKEN}&x"], {}, f"--token (or $WEBVIRT_TOKEN): {UNSENDABLE}"),
    (["--token", f"{GOOD_TOKEN}\"x"], {}, f"--token (or $WEBVIRT_TOKEN): {UNSENDABLE}"),
    (["--token", f"{GOOD_TOKEN}é"], {}, f"--token (or $WEBVIRT_TOKEN): {UNSENDABLE}"),
    (["--token", f"{GOOD_TOKEN}\t"], {}, f"--token (or $WEBVIRT_TOKEN): {UNSENDABLE}"),
    (["--token", f"={GOOD_TOKEN}"], {}, f"--token (or $WEBVIRT_TOKEN): {UNSENDABLE}"),
    (["--token", "a" + "=" * 15], {}, f"--token (or $WEBVIRT_TOKEN): {TOO_SHORT}"),  # padding
    (["--token", GOOD_TOKEN, "--read-token", f"{GOOD_TOKEN}#x"], {},
     f"--read-token (or $WEBVIRT_READ_TOKEN): {UNSENDABLE}"),
], ids=["one-letter", "15-letters", "empty", "environment", "read-token",
        "read-token-environment", "blank", "spaces", "ampersand", "quote", "non-ascii", "tab",
        "equals-first", "padding", "read-token-hash"])
def test_a_short_or_unsendable_token_is_refused_at_start(
        tmp_path: Path, options: list[str], environ: dict[str, str], error: str) -> None:
    env = {key: value for key, value in os.environ.items()
           if key not in ("WEBVIRT_TOKEN", "WEBVIRT_READ_TOKEN")} | environ
    # Were the token taken, webvirt would go on, and exit 1 at this libvirt.
    result = webvirt("--connect", "qemu+unix:///system?socket=/nonexistent/sock",
                     "--port", str(free_port()), *options, state_dir=tmp_path, env=env)
    assert result.returncode == 2, result.stderr  # argparse's usage error
    lines = result.stderr.splitlines()
    assert lines[0].startswith("usage: webvirt"), result.stderr
    assert lines[-1].startswith(f"webvirt: error: {error}"), result.stderr
    assert "openssl rand -hex 16" in lines[-1]
    assert "cannot connect" not in result.stderr
    given = [value for option, value in pairwise(options) if option.endswith("token")]
    for token in given:  # the refused token is not repeated back ("T" is in the usage line)
        if token != GOOD_TOKEN and len(token.strip()) > 1:
            assert token not in result.stderr


def test_a_token_of_the_allowed_characters_is_taken(tmp_path: Path) -> None:
    token = "aZ09-._~+/" * 2 + "=="  # every character RFC 6750 allows in a Bearer token
    result = webvirt("--connect", "qemu+unix:///system?socket=/nonexistent/sock",
                     "--port", str(free_port()), "--token", token, "--read-token", GOOD_TOKEN,
                     state_dir=tmp_path)
    assert result.returncode == 1  # refused later, by libvirt: the tokens were taken
    assert "cannot connect to libvirt" in result.stderr
