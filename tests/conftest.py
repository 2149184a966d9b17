from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from aiohttp.test_utils import TestClient

from tests.libvirt_daemon import LibvirtDaemon
from tests.processes import REPO
from webvirt.app import create_app
from webvirt.config import Settings

DEMO_HOST_URI = f"test://{REPO / 'demo' / 'host.xml'}"

ClientFactory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def devices_dir(tmp_path: Path) -> Path:
    """A copy of the shipped templates, so a test may add hostile ones."""
    target = tmp_path / "devices"
    shutil.copytree(REPO / "devices", target)
    return target


@pytest.fixture
def make_client(aiohttp_client: Any, devices_dir: Path) -> ClientFactory:
    """Start the real app; defaults to a fresh copy of the demo host on libvirt's test driver."""

    async def make(**overrides: Any) -> TestClient:
        settings = Settings(**{"uri": DEMO_HOST_URI, "devices_dir": devices_dir, **overrides})
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
