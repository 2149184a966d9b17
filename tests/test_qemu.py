"""Against a real libvirtd running real QEMU guests (started by the suite, see conftest)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import libvirt
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import ClientFactory
from tests.libvirt_daemon import LibvirtDaemon, guest_xml
from tests.processes import free_port, spawn_webvirt, wait_until_serving
from tests.waiting import next_message, until
from webvirt.appkeys import HOST

pytestmark = pytest.mark.qemu


def tablets(dom: libvirt.virDomain) -> int:
    return dom.XMLDesc().count("<input type='tablet' bus='usb'>")


async def detach_and_wait(client: TestClient, dom: libvirt.virDomain, path: str) -> Any:
    """Device removal completes asynchronously in QEMU: wait for libvirt's event."""
    async with client.ws_connect(f"/api/0/events?domain={dom.name()}&type=device-removed") as ws:
        await next_message(ws, lambda m: m["type"] == "snapshot")
        response = await client.get(path)
        assert response.status == 200, await response.text()
        await next_message(ws, lambda m: m["type"] == "device-removed")
    assert tablets(dom) == 0
    return await response.json()


async def test_start_attach_detach_shutdown(qemu_client: TestClient,
                                            qemu_conn: libvirt.virConnect) -> None:
    dom = qemu_conn.defineXML(guest_xml("gamer"))

    response = await qemu_client.get("/api/0/start/gamer")
    assert response.status == 200
    assert await response.json() == "starting"
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert await (await qemu_client.get("/api/0/state/gamer")).json() == "running"

    response = await qemu_client.get("/api/0/attach/gamer/usb_tablet")
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["device"] == "attached"
    assert body["template"] == "usb_tablet"
    assert tablets(dom) == 1

    body = await detach_and_wait(qemu_client, dom, "/api/0/detach/gamer/usb_tablet")
    assert body["device"] == "detached"

    # The guest has no OS, so ACPI shutdown is accepted but the guest keeps running.
    response = await qemu_client.get("/api/0/shutdown/gamer")
    assert await response.json() == "shutting down"
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING


async def test_persistent_attach_to_a_shut_off_guest(qemu_client: TestClient,
                                                     qemu_conn: libvirt.virConnect) -> None:
    dom = qemu_conn.defineXML(guest_xml("cold"))
    response = await qemu_client.get("/api/0/attach/cold/usb_tablet")
    assert response.status == 409  # live change of a guest that does not run
    assert "not running" in (await response.json())["detail"]

    response = await qemu_client.get("/api/0/attach/cold/usb_tablet?live=0&persistent=1")
    assert response.status == 200, await response.text()
    assert tablets(dom) == 1
    assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF


async def test_missing_host_usb_device_is_refused_with_libvirts_reason(
        qemu_client: TestClient, qemu_conn: libvirt.virConnect) -> None:
    dom = qemu_conn.defineXML(guest_xml("nousb"))
    dom.create()
    response = await qemu_client.get("/api/0/attach/nousb/usb?vendor_id=dead&product_id=beef")
    assert response.status in (409, 422), await response.text()
    body = await response.json()
    assert "dead" in body["detail"].lower() or "usb" in body["detail"].lower()
    assert "<hostdev" not in dom.XMLDesc()  # nothing half-done


async def test_invalid_device_xml_is_422(qemu_client: TestClient, qemu_conn: libvirt.virConnect,
                                         devices_dir) -> None:
    (devices_dir / "nonsense.xml").write_text("<hostdev mode='$MODE' type='usb'/>")
    dom = qemu_conn.defineXML(guest_xml("strict"))
    dom.create()
    response = await qemu_client.get("/api/0/attach/strict/nonsense?mode=bogus")
    assert response.status == 422, await response.text()


async def next_json(ws: Any, seconds: float = 15) -> dict[str, Any]:
    async with asyncio.timeout(seconds):
        return json.loads((await ws.receive()).data)


async def next_event(ws: Any, kind: str, seconds: float = 15) -> dict[str, Any]:
    async with asyncio.timeout(seconds):
        while True:
            message = await next_json(ws)
            if message["type"] == kind:
                return message


async def test_hotplug_events(qemu_client: TestClient, qemu_conn: libvirt.virConnect) -> None:
    dom = qemu_conn.defineXML(guest_xml("hotplug"))
    dom.create()
    async with qemu_client.ws_connect("/api/0/events?domain=hotplug&type=device") as ws:
        snapshot = await next_event(ws, "snapshot")
        assert snapshot["domains"][0]["state"] == "running"

        assert (await qemu_client.get("/api/0/attach/hotplug/usb_tablet")).status == 200
        # libvirt's event comes during the call, webvirt's own after it: either order is fine.
        first, second = await next_json(ws), await next_json(ws)
        by_type = {first["type"]: first, second["type"]: second}
        ours, added = by_type["attach"], by_type["device-added"]
        assert (ours["template"], ours["result"]) == ("usb_tablet", "ok")
        assert added["domain"] == "hotplug"
        assert added["device"].startswith("input")

        assert (await qemu_client.get("/api/0/detach/hotplug/usb_tablet")).status == 200
        removed = await next_event(ws, "device-removed")
        assert removed["device"] == added["device"]


async def test_daemon_restart_is_survived(qemu_client: TestClient, qemu_conn: libvirt.virConnect,
                                          libvirt_daemon: LibvirtDaemon) -> None:
    dom = qemu_conn.defineXML(guest_xml("survivor"))
    dom.create()
    async with qemu_client.ws_connect("/api/0/events") as ws:
        await next_event(ws, "snapshot")

        libvirt_daemon.kill()
        lost = await next_event(ws, "connection")
        assert lost["state"] == "lost"
        response = await qemu_client.get("/api/0/state/survivor")
        assert response.status == 503
        assert (await response.json())["code"] == "libvirt_unavailable"

        libvirt_daemon.start()
        restored = await next_event(ws, "connection", seconds=30)
        assert restored["state"] == "restored"
        snapshot = await next_event(ws, "snapshot")
        assert snapshot["connected"] is True
        # The guest kept running while the daemon was away.
        assert {"name": "survivor", "state": "running"}.items() <= next(
            d for d in snapshot["domains"] if d["name"] == "survivor").items()

    response = await qemu_client.get("/api/0/state/survivor")
    assert response.status == 200
    assert await response.json() == "running"


async def test_shutdown_force_after_timeout(qemu_client: TestClient,
                                            qemu_conn: libvirt.virConnect) -> None:
    dom = qemu_conn.defineXML(guest_xml("stubborn"))
    dom.create()
    # The diskless guest ignores ACPI: waiting runs out, force turns it off.
    response = await qemu_client.get("/api/0/shutdown/stubborn?wait=1&timeout=0.5")
    assert await response.json() == "still running"
    assert dom.isActive()
    response = await qemu_client.post("/api/0/shutdown/stubborn?timeout=0.5&force=1")
    assert await response.json() == "forced off"
    assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF


async def test_toggle_and_device_listing(qemu_client: TestClient,
                                         qemu_conn: libvirt.virConnect) -> None:
    dom = qemu_conn.defineXML(guest_xml("toggler"))
    dom.create()
    response = await qemu_client.get("/api/0/toggle/toggler/usb_tablet")
    assert (await response.json())["device"] == "attached"
    assert tablets(dom) == 1
    body = await detach_and_wait(qemu_client, dom, "/api/0/toggle/toggler/usb_tablet")
    assert body["device"] == "detached"
    # No host devices passed through; the listing is a real (empty) answer.
    response = await qemu_client.get("/api/0/devices/toggler")
    assert response.status == 200
    assert await response.json() == []


async def test_reset_is_seen_as_a_reboot_event(qemu_client: TestClient,
                                               qemu_conn: libvirt.virConnect) -> None:
    dom = qemu_conn.defineXML(guest_xml("resetter"))
    dom.create()
    async with qemu_client.ws_connect("/api/0/events?domain=resetter&type=lifecycle") as ws:
        await next_event(ws, "snapshot")
        assert await (await qemu_client.post("/api/0/reset/resetter")).json() == "reset"
        event = await next_event(ws, "reboot")
        assert event["domain"] == "resetter"


async def test_host_inventory_from_the_real_node_device_driver(qemu_client: TestClient) -> None:
    response = await qemu_client.get("/api/0/host/devices")
    assert response.status == 200, await response.text()
    devices = await response.json()
    assert isinstance(devices, list)
    for device in devices:  # whatever this machine has, each entry is complete
        assert device["type"] in ("usb", "pci")
        assert device["held_by"] == []
        assert device["address"]


async def test_two_starts_at_once(qemu_client: TestClient, qemu_conn: libvirt.virConnect) -> None:
    qemu_conn.defineXML(guest_xml("racer"))
    first, second = await asyncio.gather(qemu_client.get("/api/0/start/racer"),
                                         qemu_client.get("/api/0/start/racer"))
    statuses = sorted([first.status, second.status])
    assert statuses == [200, 409], statuses
    loser = first if first.status == 409 else second
    assert (await loser.json())["code"] == "operation_in_progress"
    assert await (await qemu_client.get("/api/0/state/racer")).json() == "running"


async def test_a_frozen_daemon_gives_504_not_a_pile_up(
        make_client: Any, libvirt_daemon: LibvirtDaemon, qemu_conn: libvirt.virConnect) -> None:
    qemu_conn.defineXML(guest_xml("frozen"))
    client = await make_client(uri=libvirt_daemon.uri, call_timeout=0.5)
    connections = client.app[HOST].connection_count
    assert (await client.get("/api/0/domains")).status == 200

    async with client.ws_connect("/api/0/events?type=connection") as ws:
        await next_message(ws, lambda m: m["type"] == "snapshot")
        libvirt_daemon.signal(signal.SIGSTOP)
        try:
            # /api/0/state answers from the cache; listing asks libvirt every time.
            started = time.monotonic()
            responses = await asyncio.gather(*(client.get("/api/0/domains")
                                               for _ in range(40)))
            elapsed = time.monotonic() - started
            assert {r.status for r in responses} <= {503, 504}
            assert any(r.status == 504 for r in responses)
            assert elapsed < 5, elapsed  # the first timeout retires the session: 503s at once
            lost = await next_message(ws, lambda m: m["type"] == "connection")
            assert lost["state"] == "lost"
            # A hung call holds its connection's thread, and no call queues behind it: the
            # stuck session's threads and the next session's, waiting to open, and no more.
            assert sum(t.name.startswith("libvirt-") for t in threading.enumerate()) \
                <= 2 * connections
        finally:
            libvirt_daemon.signal(signal.SIGCONT)
        restored = await next_message(ws, lambda m: m["type"] == "connection", 30)
        assert restored["state"] == "restored"
    assert (await client.get("/api/0/domains")).status == 200


def test_ctrl_c_ends_webvirt_even_while_the_daemon_is_frozen(
        libvirt_daemon: LibvirtDaemon, tmp_path: Path) -> None:
    port = free_port()
    server = spawn_webvirt(libvirt_daemon.uri, port, "--call-timeout", "1", state_dir=tmp_path)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/api/0/version")
        libvirt_daemon.signal(signal.SIGSTOP)
        try:
            # A worker thread is now stuck in a call the daemon will not answer.
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/0/domains", timeout=10)
            refused.value.close()
            assert refused.value.code == 504
            started = time.monotonic()
            server.send_signal(signal.SIGINT)
            server.wait(60)
            elapsed = time.monotonic() - started
        finally:
            libvirt_daemon.signal(signal.SIGCONT)
    finally:
        if server.poll() is None:
            server.kill()
        _, log = server.communicate(timeout=10)
    assert server.returncode == 0, log
    assert elapsed < 10, f"shutdown took {elapsed:.1f} s:\n{log}"
    assert "shutting down" in log


async def test_a_waiting_shutdown_does_not_hold_up_webvirt_stopping(
        make_client: ClientFactory, libvirt_daemon: LibvirtDaemon,
        qemu_conn: libvirt.virConnect, caplog: pytest.LogCaptureFixture) -> None:
    """A request may wait an hour for a guest. webvirt stopping meanwhile answered it only when
    aiohttp gave up on it, a minute later; now it answers at once, says nothing was confirmed,
    and forces nothing off."""
    dom = qemu_conn.defineXML(guest_xml("lingering"))
    dom.create()  # diskless: it ignores ACPI
    client = await make_client(uri=libvirt_daemon.uri)
    caplog.set_level(logging.INFO, logger="webvirt.api_domains")
    asked = asyncio.create_task(
        client.get("/api/0/shutdown/lingering?wait=1&timeout=3600&force=1"))
    await until(lambda: "shutdown lingering: shutting down" in caplog.text, 10,
                "the shutdown asked")
    await asyncio.wait_for(client.server.close(), 10)
    assert await (await asked).json() == "shutting down"
    assert dom.isActive()
