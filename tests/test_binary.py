"""The single-file executable: built with PyInstaller from webvirt.spec, then run as a user
would, from another folder, with devices/ next to it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests import time_limit
from tests.conftest import DEMO_HOST_URI, REPO
from tests.processes import free_port, wait_until_serving

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    time_limit.allow(600, "building the single-file executable (about a minute)")
    work = tmp_path_factory.mktemp("pyinstaller")
    pyinstaller = Path(sys.executable).parent / "pyinstaller"
    subprocess.run(
        [str(pyinstaller), "--noconfirm", "--clean", "--log-level", "WARN",
         "--distpath", str(work / "dist"), "--workpath", str(work / "build"), "webvirt.spec"],
        cwd=REPO, check=True, timeout=600)
    app = tmp_path_factory.mktemp("app")
    shutil.copy2(work / "dist" / "webvirt", app / "webvirt")
    shutil.copytree(REPO / "devices", app / "devices")
    return app / "webvirt"


def test_help(binary: Path) -> None:
    result = subprocess.run([str(binary), "-h"], capture_output=True, text=True, timeout=60,
                            cwd="/")
    assert result.returncode == 0
    assert "--connect" in result.stdout


def test_serves_api_docs_and_dashboard_from_bundled_files(binary: Path, tmp_path: Path) -> None:
    port = free_port()
    # Started from another folder: devices/ must be found next to the binary.
    server = subprocess.Popen([str(binary), "--connect", DEMO_HOST_URI, "--port", str(port),
                               "--state-dir", str(tmp_path / "state")],
                              cwd="/", stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"

    def get(path: str) -> bytes:
        with urllib.request.urlopen(base + path, timeout=5) as response:
            assert response.status == 200, path
            return response.read()

    try:
        wait_until_serving(base + "/api/0/version")
        assert get("/api/0/state/win11") == b'"shut off"'
        assert b'"usb_tablet"' in get("/api/0/templates")
        assert b"swagger-ui" in get("/docs")
        assert b"redoc.standalone.js" in get("/redoc")
        assert len(get("/static/vendor/redoc.standalone.js")) > 500_000
        assert len(get("/static/swagger/swagger-ui-bundle.js")) > 500_000
        assert b"/static/app.js" in get("/")
        assert b"webvirt" in get("/static/app.js")
        assert b"\nlibvirt_up 1.0\n" in get("/metrics")  # prometheus-client is bundled
    finally:
        server.terminate()
        _, log = server.communicate(timeout=10)
    assert server.returncode == 0, log
    assert "Traceback" not in log
