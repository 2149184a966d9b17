from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from aiohttp.test_utils import TestClient
from playwright.async_api import Browser, Page, async_playwright

from tests.libvirt_daemon import LibvirtDaemon
from tests.processes import REPO
from webvirt.app import create_app
from webvirt.config import Settings

DEMO_HOST_URI = f"test://{REPO / 'demo' / 'host.xml'}"

ClientFactory = Callable[..., Awaitable[TestClient]]

CHROMIUM = os.environ.get("WEBVIRT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    """Real headless Chromium (Debian's chromium, driven by Playwright), for the pages."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} not found: scripts/install --test installs Debian's chromium")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                   args=CHROMIUM_FLAGS)
        yield browser
        await browser.close()


# Every page records what its Content-Security-Policy blocked, for blocked_by_csp().
RECORD_CSP_VIOLATIONS = """
window.cspViolations = [];
document.addEventListener("securitypolicyviolation",
    (e) => window.cspViolations.push(`${e.effectiveDirective} ${e.blockedURI}`));
"""


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context()
    await context.add_init_script(RECORD_CSP_VIOLATIONS)
    page = await context.new_page()
    yield page
    await context.close()


async def blocked_by_csp(page: Page) -> list[str]:
    """What the page's policy blocked, except files from the internet (never loaded anyway)."""
    violations: list[str] = await page.evaluate("window.cspViolations")
    return [v for v in violations if not v.split(" ", 1)[1].startswith("https://")]


def open_connections(client: TestClient) -> list[Any]:
    """The test server's open connections (aiohttp's request handlers)."""
    assert client.server.runner is not None and client.server.runner.server is not None
    return client.server.runner.server.connections


def drop_all_connections(client: TestClient) -> None:
    """The server hangs up on every client, as after a network blip."""
    for connection in open_connections(client):
        connection.force_close()


@pytest.fixture
def devices_dir(tmp_path: Path) -> Path:
    """A copy of the shipped templates, so a test may add hostile ones."""
    target = tmp_path / "devices"
    shutil.copytree(REPO / "devices", target)
    return target


@pytest.fixture
def make_client(aiohttp_client: Any, devices_dir: Path, tmp_path: Path) -> ClientFactory:
    """Start the real app; defaults to a fresh copy of the demo host on libvirt's test driver,
    and a state folder of the test's own."""

    async def make(**overrides: Any) -> TestClient:
        settings = Settings(**{"uri": DEMO_HOST_URI, "devices_dir": devices_dir,
                               "state_dir": tmp_path / "state", **overrides})
        return await aiohttp_client(create_app(settings))

    return make


@pytest.fixture
async def client(make_client: ClientFactory) -> TestClient:
    return await make_client()


@pytest.fixture(scope="session")
def libvirt_daemon() -> Iterator[LibvirtDaemon]:
    """One real libvirtd for the whole run; tests that restart it start it again."""
    if os.environ.get("WEBVIRT_SKIP_QEMU") == "1":
        pytest.skip("WEBVIRT_SKIP_QEMU=1")
    daemon = LibvirtDaemon()
    daemon.start()
    yield daemon
    daemon.cleanup()


@pytest.fixture
def qemu_conn(libvirt_daemon: LibvirtDaemon) -> Iterator[libvirt.virConnect]:
    """A plain libvirt connection for a test to set up and inspect guests directly."""
    if libvirt_daemon.process is None:
        libvirt_daemon.start()
    conn = libvirt.open(libvirt_daemon.uri)
    yield conn
    try:
        for dom in conn.listAllDomains():
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                dom.undefine()
        conn.close()
    except libvirt.libvirtError:
        pass  # the test restarted the daemon; the next test reconnects


@pytest.fixture
async def qemu_client(make_client: ClientFactory, libvirt_daemon: LibvirtDaemon,
                      qemu_conn: libvirt.virConnect) -> AsyncIterator[TestClient]:
    yield await make_client(uri=libvirt_daemon.uri)
