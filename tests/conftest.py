from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
import re
import shutil
import threading
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from aiohttp import web_app
from aiohttp.test_utils import TestClient
from playwright.async_api import Browser, Page, async_playwright

from support.usb_lab import GUEST_NAME, Lab, LabError
from tests.libvirt_daemon import LibvirtDaemon
from tests.processes import REPO
from tests.streamdeck_app import FakeStreamDeck
from tests.waiting import until_sync
from webvirt.app import create_app
from webvirt.config import Settings

# pytester: tests/test_time_limit.py runs small suites of its own.
pytest_plugins = ["pytester", "tests.time_limit"]

DEMO_HOST_URI = f"test://{REPO / 'demo' / 'host.xml'}"

ClientFactory = Callable[..., Awaitable[TestClient]]
DeckFactory = Callable[..., Awaitable[FakeStreamDeck]]

CHROMIUM = os.environ.get("WEBVIRT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="module", autouse=True)
def frozen_heap() -> None:
    """What lives when a module starts (imported libraries, session fixtures) is left out of
    later collections. webvirt collects garbage as each app closes (Host.close, so libvirt
    objects go while their loop runs): over a heap of schemathesis, playwright and hypothesis
    that took 0.1-0.3 s per test, a third of the suite's time."""
    gc.collect()
    gc.freeze()


_session_loop: list[asyncio.AbstractEventLoop] = []


@pytest.fixture(scope="session", autouse=True)
async def session_loop() -> None:
    _session_loop.append(asyncio.get_running_loop())


def stale_watches(loop: asyncio.AbstractEventLoop) -> list[int]:
    """fds asyncio watches that epoll no longer does: their file was closed behind asyncio's
    back (epoll forgets a closed file), and the next file on the number cannot be watched."""
    selector = loop._selector  # type: ignore[attr-defined]  # private: what it watches
    info = Path(f"/proc/self/fdinfo/{selector.fileno()}").read_text()
    in_epoll = {int(fd) for fd in re.findall(r"^tfd:\s*(\d+)", info, re.M)}
    return sorted(set(selector.get_map()) - in_epoll)


@pytest.fixture(autouse=True)
def no_stale_watches() -> Iterator[None]:
    """The test that leaves asyncio watching a closed file fails, not a later one that gets
    the number (a connect that fails with ENOENT, a request that is never read)."""
    yield
    if _session_loop and not _session_loop[0].is_closed():
        stale = stale_watches(_session_loop[0])
        assert not stale, f"asyncio still watches closed fds {stale}"


@pytest.fixture(autouse=True)
def forget_closed_apps() -> None:
    """aiohttp caches each app's middleware chain (up to 1024 apps), which keeps every app a
    test made, and all it holds, alive for the rest of the run."""
    cache = getattr(web_app, "_cached_build_middleware", None)  # private: may go away
    if cache is not None:
        cache.cache_clear()


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
    and a state folder of its own (one webvirt per state folder: a test that restarts webvirt
    on the same rules says which)."""
    made = itertools.count()

    async def make(**overrides: Any) -> TestClient:
        n = next(made)
        settings = Settings(**{"uri": DEMO_HOST_URI, "devices_dir": devices_dir,
                               "state_dir": tmp_path / ("state" if n == 0 else f"state-{n}"),
                               **overrides})
        return await aiohttp_client(create_app(settings))

    return make


@pytest.fixture
async def make_deck() -> AsyncIterator[DeckFactory]:
    """The Stream Deck app, as tests/streamdeck_app.py plays it, with the built plugin
    following webvirt at `server`."""
    decks: list[FakeStreamDeck] = []

    async def make(server: str, token: str = "") -> FakeStreamDeck:
        deck = await FakeStreamDeck({"server": server, "token": token}).start()
        decks.append(deck)
        return deck

    yield make
    for deck in decks:
        await deck.stop()


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
    if libvirt_daemon.process is None or libvirt_daemon.process.poll() is not None:
        # Stopped by a test, or dead: libvirtd 9.0 itself has segfaulted (rarely) after a
        # SIGSTOP/SIGCONT with clients gone meanwhile; the next test gets a daemon again.
        libvirt_daemon.start()
    conn = libvirt.open(libvirt_daemon.uri)
    yield conn
    try:
        remove_guests(conn)
        conn.close()
    except libvirt.libvirtError:
        pass  # the test restarted the daemon; the next test reconnects


def remove_guests(conn: libvirt.virConnect) -> None:
    """Every guest stopped and undefined: the daemon as the next test expects it."""
    for dom in conn.listAllDomains():
        # Each on its own: a transient domain is gone once destroyed, and asking it anything
        # more fails, which must not leave the others behind for the next test.
        with contextlib.suppress(libvirt.libvirtError):
            persistent = dom.isPersistent()
            if dom.isActive():
                dom.destroy()
            if persistent:
                dom.undefine()


@pytest.fixture
async def qemu_client(make_client: ClientFactory, libvirt_daemon: LibvirtDaemon,
                      qemu_conn: libvirt.virConnect) -> AsyncIterator[TestClient]:
    yield await make_client(uri=libvirt_daemon.uri)


# --- The USB lab (support/usb_lab.py): a nested lab host with a real USB bus -------------

def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The lab host keeps a CPU busy while it runs: its tests run last, together, and it stops
    # with the session, right after them.
    items.sort(key=lambda item: item.get_closest_marker("usb_lab") is not None)


@pytest.fixture(scope="session")
def usb_lab_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """One lab host for the run: the cached image is built first if needed (about 90 s, once
    per machine), then it boots (about 35 s)."""
    if os.environ.get("WEBVIRT_SKIP_USB_LAB") == "1":
        pytest.skip("WEBVIRT_SKIP_USB_LAB=1")
    from tests import time_limit  # a plugin of this file's: imported once pytest has loaded it

    # Each step is bounded by the lab itself (the build by its tools, the boot by BOOT_SECONDS).
    time_limit.allow(600, "building the USB lab's image (once per machine) and booting it")
    try:
        lab = Lab.up(tmp_path_factory.mktemp("usb-lab"), tied=True)
    except LabError as err:
        pytest.fail(f"USB lab: {err}", pytrace=False)
    yield lab
    lab.down()


@pytest.fixture
def usb_lab(usb_lab_host: Lab) -> Iterator[Lab]:
    """The lab as every test finds it: nothing plugged, lab-guest running and holding no
    host device."""
    yield usb_lab_host
    # Bounded (a frozen lab host must not hang the run): in a thread of its own, given 60 s.
    errors: list[BaseException] = []

    def reset() -> None:
        try:
            reset_lab(usb_lab_host)
        except BaseException as err:
            errors.append(err)

    resetter = threading.Thread(target=reset, daemon=True)
    resetter.start()
    resetter.join(60)
    if resetter.is_alive():
        pytest.fail("the USB lab did not come back to its start within 60 s", pytrace=False)
    if errors:
        raise errors[0]


def reset_lab(lab: Lab) -> None:
    for device_id in list(lab.state.plugged):
        lab.unplug(device_id)
    conn = libvirt.open(lab.uri)
    try:
        guest = conn.lookupByName(GUEST_NAME)
        if not guest.isActive():
            guest.create()
        for hostdev in ET.fromstring(guest.XMLDesc()).iterfind("devices/hostdev"):
            guest.detachDeviceFlags(ET.tostring(hostdev, encoding="unicode"),
                                    libvirt.VIR_DOMAIN_AFFECT_LIVE)
        # The next test starts when libvirt, too, lists no unplugged device any more.
        until_sync(lambda: all(d.name().startswith("usb_usb") for d in conn.listAllDevices(
            libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_USB_DEV)), 10, "the lab is unplugged")
    finally:
        conn.close()


@pytest.fixture
def lab_conn(usb_lab: Lab) -> Iterator[libvirt.virConnect]:
    """A plain connection to the lab host's libvirtd, to set up and inspect directly."""
    conn = libvirt.open(usb_lab.uri)
    yield conn
    conn.close()
