"""Fuzz the whole API with schemathesis against the server's own OpenAPI spec: once for the
API itself, and once for the headers the guard (webvirt/security.py) reads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DEMO_HOST_URI
from tests.processes import free_port, spawn_webvirt, wait_until_serving

# Browsers set these, so the spec leaves them out; the fuzzer is told about them here.
# Origins mostly start like a URL, so that the part after the scheme gets parsed.
GUARD_HEADERS = [
    {"name": "Origin", "schema": {"type": "string", "pattern": "^https?://"}},
    {"name": "Sec-Fetch-Site", "schema": {"type": "string"}},
    {"name": "Host", "schema": {"type": "string"}},
]


def declare_guard_headers(spec: dict[str, Any]) -> None:
    for path_item in spec["paths"].values():
        for operation in path_item.values():
            operation.setdefault("parameters", []).extend(
                {"in": "header", "required": False, **header} for header in GUARD_HEADERS)


@pytest.mark.parametrize("headers", [False, True], ids=["api", "headers"])
def test_schemathesis_finds_no_500s_and_no_spec_violations(tmp_path: Path, headers: bool) -> None:
    port = free_port()
    # For headers: a token, so that the spec requires one and schemathesis generates
    # Authorization headers (and ?token=); every refusal is a warning, so log errors only.
    options = ["--token", "fuzz-token-4b8e1d27c9", "--log-level", "error"] if headers else \
        ["--log-level", "warning"]
    server = spawn_webvirt(DEMO_HOST_URI, port, *options, state_dir=tmp_path / "state")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base + "/api/0/openapi.json", server)
        with urllib.request.urlopen(base + "/api/0/openapi.json", timeout=10) as response:
            spec = json.load(response)
        if headers:
            declare_guard_headers(spec)
        (tmp_path / "openapi.json").write_text(json.dumps(spec))
        st = shutil.which("st", path=os.path.dirname(sys.executable)) or "st"
        result = subprocess.run(
            [st, "run", "openapi.json", "--url", base,
             "--checks", "all",
             # The event stream never ends, so a fuzzer cannot judge it; tests/test_events.py
             # covers it.
             "--exclude-path", "/api/0/events",
             "--max-examples", os.environ.get("WEBVIRT_FUZZ_EXAMPLES", "25"),
             "--seed", os.environ.get("WEBVIRT_FUZZ_SEED", "20261124"),
             "--request-timeout", "10", "--no-color"],
            # Its cache of earlier runs stays out of the checkout: every run starts equal.
            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    finally:
        server.terminate()
        _, server_log = server.communicate(timeout=10)
    assert result.returncode == 0, result.stdout[-6000:]
    assert "Fuzzing" in result.stdout
    # Our own handlers never failed (aiohttp's parser may log refused malformed headers).
    assert "unhandled error" not in server_log, server_log[-4000:]
