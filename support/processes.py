"""Run webvirt as a real process, and wait for a server to answer."""

from __future__ import annotations

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


def wait_until_serving(url: str) -> None:
    """Until the URL answers at all (any HTTP status counts)."""
    for _ in range(200):
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer")


def spawn_webvirt(uri: str, port: int, *options: str,
                  env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    """webvirt as a user runs it, on 127.0.0.1:port, with its log on stderr."""
    return subprocess.Popen(
        [sys.executable, "-m", "webvirt", "--connect", uri, "--port", str(port), *options],
        cwd=REPO, stderr=subprocess.PIPE, text=True, env=env)
