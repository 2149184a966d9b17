"""Run webvirt as a real process, and wait for a server to answer."""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, process: subprocess.Popen[str] | None = None) -> None:
    """Until the URL answers at all (any HTTP status counts); fails at once if process ends."""
    for _ in range(200):
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if process is not None and process.poll() is not None:
                _, log = process.communicate()
                raise AssertionError(
                    f"the server exited with {process.returncode}:\n{log}") from None
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer")


def spawn_webvirt(uri: str, port: int, *options: str, state_dir: Path,
                  env: Mapping[str, str] | None = None,
                  open_files: tuple[int, int] | None = None) -> subprocess.Popen[str]:
    """webvirt as a user runs it, on 127.0.0.1:port, with its log on stderr; `open_files`
    sets its (soft, hard) limit on open files. `state_dir` has no default: a test or a bench
    never keeps its rules in the user's state folder."""

    def limit_open_files() -> None:
        assert open_files is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, open_files)

    return subprocess.Popen(
        [sys.executable, "-m", "webvirt", "--connect", uri, "--port", str(port),
         "--state-dir", str(state_dir), *options],
        cwd=REPO, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=limit_open_files if open_files else None)


def status_number(pid: int, field: str) -> int:
    """A number from /proc/PID/status: a size in KiB (VmRSS, resident memory; VmHWM, its
    peak) or a count (Threads)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0])
    raise KeyError(field)
