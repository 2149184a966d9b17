"""USB on a real USB bus: the lab host (support/usb_lab.py), whose libvirtd webvirt reaches over
libvirt's remote protocol, gets emulated USB devices plugged in and out over QMP: its kernel,
udev and node-device driver see a real plug, and its guest lab-guest gets real hostdevs."""

from __future__ import annotations

import asyncio
import contextlib
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import libvirt
import pytest
from aiohttp.test_utils import TestClient

from support.usb_lab import GUEST_NAME, Lab
from tests.waiting import next_message, until
from webvirt.host_devices import read_node_devices

pytestmark = pytest.mark.usb_lab

WACOM = {"vendor_id": "056a", "product_id": "0000", "vendor": "Wacom Co., Ltd",
         "product": "PenPartner"}
WACOM_QUERY = "vendor_id=056a&product_id=0000"
# What an event's envelope adds; the rest of a node-device event is the device's facts.
ENVELOPE = ("id", "seq", "time", "type")


@contextlib.asynccontextmanager
async def event_stream(client: TestClient, types: str
                       ) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """A WebSocket on the event stream, past its snapshot."""
    async with client.ws_connect(f"/api/0/events?type={types}") as ws:
        await next_message(ws, lambda m: m["type"] == "snapshot")
        yield ws


def is_node_device_event(message: dict[str, Any]) -> bool:
    return message["type"] in ("node-device-added", "node-device-removed")


async def plugged(ws: aiohttp.ClientWebSocketResponse, lab: Lab, kind: str,
                  port: str | None = None) -> dict[str, Any]:
    """Plugs a device; its node-device-added event."""
    lab.plug(kind, port=port)
    event = await next_message(ws, is_node_device_event)
    assert event["type"] == "node-device-added", event
    return event


async def unplugged(ws: aiohttp.ClientWebSocketResponse, lab: Lab, device_id: str
                    ) -> dict[str, Any]:
    await asyncio.to_thread(lab.unplug, device_id)
    event = await next_message(ws, is_node_device_event)
    assert event["type"] == "node-device-removed", event
    return event


async def host_device(client: TestClient, name: str) -> dict[str, Any]:
    response = await client.get("/api/0/host/devices")
    assert response.status == 200, await response.text()
    found = [d for d in await response.json() if d["name"] == name]
    assert len(found) == 1, found
    return found[0]


async def guest_devices(client: TestClient) -> list[dict[str, Any]]:
    response = await client.get(f"/api/0/devices/{GUEST_NAME}")
    assert response.status == 200, await response.text()
    devices: list[dict[str, Any]] = await response.json()
    return devices


def live_hostdevs(conn: libvirt.virConnect) -> list[ET.Element]:
    xml = conn.lookupByName(GUEST_NAME).XMLDesc()
    return list(ET.fromstring(xml).iterfind("devices/hostdev"))


async def test_a_plug_and_an_unplug_are_one_event_each_with_the_device_facts(
        usb_lab: Lab, make_client: Any) -> None:
    client = await make_client(uri=usb_lab.uri)
    async with event_stream(client, "host") as ws:
        added = await plugged(ws, usb_lab, "wacom", port="3")
        assert added["device_type"] == "usb"
        assert {k: added[k] for k in WACOM} == WACOM
        assert added["port"] == "1-3"
        assert added["address"].startswith("1:")
        # The next node-device event is the removal: the device's interface (usb_1_3_1_0)
        # came and went without an event of its own.
        removed = await unplugged(ws, usb_lab, "wacom1")
        facts = {k: v for k, v in added.items() if k not in ENVELOPE}
        assert {k: v for k, v in removed.items() if k not in ENVELOPE} == facts


async def test_host_devices_list_a_plugged_device_with_names_and_port(
        usb_lab: Lab, make_client: Any) -> None:
    client = await make_client(uri=usb_lab.uri)
    async with event_stream(client, "host") as ws:
        added = await plugged(ws, usb_lab, "smartcard", port="5")
    device = await host_device(client, added["device"])
    assert device == {
        "name": added["device"], "type": "usb", "vendor_id": "08e6", "product_id": "4433",
        "vendor": "Gemalto (was Gemplus)", "product": "GemPC433-Swap",
        "address": added["address"], "port": "1-5", "held_by": [], "configured_in": [],
        "serial": None}  # libvirt does not report it, and the lab host's sysfs is not ours
    # A root hub is a USB device too, but it has no port.
    root_hubs = [d for d in (await (await client.get("/api/0/host/devices")).json())
                 if d["vendor_id"] == "1d6b"]
    assert root_hubs and all(d["port"] is None for d in root_hubs)


async def test_attach_and_detach_by_template_into_the_inner_guest(
        usb_lab: Lab, make_client: Any, lab_conn: libvirt.virConnect) -> None:
    client = await make_client(uri=usb_lab.uri)
    async with event_stream(client, "host,device") as ws:
        added = await plugged(ws, usb_lab, "wacom")
        response = await client.get(f"/api/0/attach/{GUEST_NAME}/usb?{WACOM_QUERY}")
        assert response.status == 200, await response.text()
        await next_message(ws, lambda m: m["type"] == "device-added")

    held = await guest_devices(client)
    assert [(d["type"], d["vendor_id"], d["product_id"], d["address"]) for d in held] == [
        ("usb", "056a", "0000", added["address"])]
    assert len(live_hostdevs(lab_conn)) == 1
    device = await host_device(client, added["device"])
    assert device["held_by"] == [GUEST_NAME]
    assert device["configured_in"] == []  # attached live only

    response = await client.get(f"/api/0/detach/{GUEST_NAME}/usb?{WACOM_QUERY}")
    assert response.status == 200, await response.text()
    assert await guest_devices(client) == []
    assert live_hostdevs(lab_conn) == []
    assert (await host_device(client, added["device"]))["held_by"] == []


async def test_an_unplugged_device_leaves_no_stale_hostdev_and_a_replug_attaches_again(
        usb_lab: Lab, make_client: Any, lab_conn: libvirt.virConnect) -> None:
    client = await make_client(uri=usb_lab.uri)
    async with event_stream(client, "host,device") as ws:
        first = await plugged(ws, usb_lab, "wacom", port="2")
        response = await client.get(f"/api/0/attach/{GUEST_NAME}/usb?{WACOM_QUERY}")
        assert response.status == 200, await response.text()
        [alias] = [d["alias"] for d in await guest_devices(client)]

        # libvirt leaves the hostdev behind, pointing at the old address; webvirt detaches
        # it and says why.
        await unplugged(ws, usb_lab, "wacom1")
        event = await next_message(ws, lambda m: m["type"] == "detach")
        assert event == {**event, "domain": GUEST_NAME, "device": alias, "reason": "unplugged",
                         "address": first["address"], "vendor_id": "056a",
                         "product_id": "0000", "result": "ok"}
        assert await guest_devices(client) == []
        assert live_hostdevs(lab_conn) == []

        # Replugged, the device has a new address, and nothing holds it yet.
        second = await plugged(ws, usb_lab, "wacom", port="2")
        assert second["address"] != first["address"]
        assert (await host_device(client, second["device"]))["held_by"] == []
        response = await client.get(f"/api/0/attach/{GUEST_NAME}/usb?{WACOM_QUERY}")
        assert response.status == 200, await response.text()
        held = await guest_devices(client)
        assert [d["address"] for d in held] == [second["address"]]
        assert (await host_device(client, second["device"]))["held_by"] == [GUEST_NAME]

        # A toggle's first press detaches the device itself.
        toggled = await client.get(f"/api/0/toggle/{GUEST_NAME}/usb?{WACOM_QUERY}")
        assert (await toggled.json())["device"] == "detached"
        assert await guest_devices(client) == []


async def test_a_held_by_follows_the_address_not_the_ids(
        usb_lab: Lab, make_client: Any, lab_conn: libvirt.virConnect) -> None:
    """Before webvirt cleans up (here: no webvirt runs), a replugged device is not held by the
    stale entry that names its vendor and product."""
    guest = lab_conn.lookupByName(GUEST_NAME)

    def wacoms() -> list[str]:
        flags = libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_USB_DEV
        return [d["name"] for d in read_node_devices(lab_conn, flags)  # skips the vanished
                if d["vendor_id"] == "056a"]

    usb_lab.plug("wacom")
    await until(lambda: len(wacoms()) == 1, 10, "the wacom is listed")
    guest.attachDeviceFlags(
        "<hostdev mode='subsystem' type='usb'><source><vendor id='0x056a'/>"
        "<product id='0x0000'/></source></hostdev>", libvirt.VIR_DOMAIN_AFFECT_LIVE)
    await asyncio.to_thread(usb_lab.unplug, "wacom1")
    await until(lambda: wacoms() == [], 10, "the wacom is gone")
    usb_lab.plug("wacom")
    await until(lambda: len(wacoms()) == 1, 10, "the wacom is back")
    assert len(live_hostdevs(lab_conn)) == 1  # the stale entry

    # webvirt starts with the stale entry there: it finds the replugged device held by
    # nobody, and removes the stale entry on its own.
    client = await make_client(uri=usb_lab.uri)
    response = await client.get("/api/0/host/devices")
    wacom = [d for d in await response.json() if d["vendor_id"] == "056a"]
    assert [d["held_by"] for d in wacom] == [[]]
    await until(lambda: live_hostdevs(lab_conn) == [], 10, "the stale entry is detached")
