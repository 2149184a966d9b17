"""A normal, non-editable `pip install` runs from any folder: the dashboard's and the docs'
files ship inside the package (static/ of the repository becomes webvirt/static)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

import pytest

from tests.processes import REPO, free_port, wait_until_serving
from tests.test_openapi import external_urls

pytestmark = pytest.mark.slow

# What a page loads from this server: scripts, styles, icons (and the pages it links to).
ASSET = re.compile(r"""(?:src|href)=["'](/[^"'#]*)""")

# What a build writes into its source, and what is no part of the source.
NOT_SOURCE = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info",
                                    "__pycache__", ".*_cache", ".schemathesis")


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with webvirt pip-installed (not editable) from a copy of the checkout.

    Its dependencies (and pip, and setuptools for the build) are this test venv's, reached by a
    .pth file, so nothing is downloaded; the copy keeps the build's files out of the checkout.
    """
    work = tmp_path_factory.mktemp("install")
    source = work / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    python = venv / "bin" / "python"
    target = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True).stdout.strip()
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (Path(target) / "test-venv.pth").write_text("".join(f"{path}\n" for path in sorted(ours)))
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", str(source)], check=True, timeout=300, env=clean_env())
    return venv


def clean_env() -> dict[str, str]:
    # Nothing may lead Python back to the checkout.
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def test_the_package_is_installed_not_linked(venv: Path, tmp_path: Path) -> None:
    show = "import webvirt, webvirt.config as c; print(webvirt.__file__, c.DEFAULT_STATIC_DIR)"
    found = subprocess.run(
        [venv / "bin" / "python", "-c", show], check=True, capture_output=True, text=True,
        cwd=tmp_path, env=clean_env()).stdout
    module, static = found.split()
    assert Path(module).is_relative_to(venv)
    assert Path(static).is_relative_to(venv)
    assert (Path(static) / "index.html").is_file()
    assert (Path(static) / "vendor" / "redoc.standalone.js").is_file()


def test_serves_dashboard_docs_and_api_from_any_folder(venv: Path, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [venv / "bin" / "webvirt", "--connect", "test:///default", "--port", str(port),
         "--state-dir", tmp_path / "state"],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True, env=clean_env())

    def get(path: str) -> bytes:
        with urllib.request.urlopen(base + path, timeout=10) as response:
            assert response.status == 200, path
            return response.read()

    try:
        wait_until_serving(base + "/api/0/version", server)
        assert get("/api/0/version") == b'"0.3.0"'
        for page in ("/", "/docs", "/redoc"):
            html = get(page).decode()
            assert external_urls(html) == [], page
            assets = ASSET.findall(html)
            assert assets, page
            for asset in assets:
                assert get(asset), asset
    finally:
        server.terminate()
        _, log = server.communicate(timeout=10)
    assert server.returncode == 0, log
    assert "Traceback" not in log
    # Started away from a devices/ folder: it says so.
    assert "device template folder devices does not exist" in log
