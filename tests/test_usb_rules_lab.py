"""USB rules end to end on the USB lab: devices plugged into the lab host end up in its running
guest with no call, leave it when unplugged, come back when replugged; a port rule follows
whatever is plugged into its port."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import libvirt
import pytest
from aiohttp.test_utils import TestClient

from support.usb_lab import GUEST_NAME, GUEST_XML, Lab
from tests.test_usb_lab import event_stream, guest_devices, plugged
from tests.waiting import next_message, until
from webvirt.appkeys import SETTINGS, USB_RECONCILER

pytestmark = pytest.mark.usb_lab

WACOM_RULE = {"domain": GUEST_NAME, "match": {"vendor_id": "056a", "product_id": "0000"}}
SECOND_GUEST = "lab-guest-2"
# The promise: a plugged device is in the running guest within this, with no call.
FOLLOW_S = 3.0


async def add_rule(client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/api/0/rules", json=body)
    assert response.status == 201, await response.text()
    created: dict[str, Any] = await response.json()
    return created


async def held_ids(client: TestClient, domain: str = GUEST_NAME) -> list[str]:
    response = await client.get(f"/api/0/devices/{domain}")
    assert response.status == 200, await response.text()
    return [f"{d['vendor_id']}:{d['product_id']}" for d in await response.json()]


async def follows(client: TestClient, ids: str, domain: str = GUEST_NAME) -> float:
    """Seconds until the domain holds a device with these ids (fails after FOLLOW_S)."""
    began = time.monotonic()

    async def held() -> bool:
        return ids in await held_ids(client, domain)

    await until(held, FOLLOW_S, f"{domain} holds {ids}")
    return time.monotonic() - began


@pytest.fixture
async def lab_client(usb_lab: Lab, make_client: Any) -> AsyncIterator[TestClient]:
    yield await make_client(uri=usb_lab.uri)


@pytest.fixture
def second_guest(lab_conn: libvirt.virConnect) -> Iterator[str]:
    guest = lab_conn.defineXML(GUEST_XML.replace(GUEST_NAME, SECOND_GUEST))
    guest.create()
    yield SECOND_GUEST
    if guest.isActive():
        guest.destroy()
    guest.undefine()


async def test_a_rule_gives_a_plugged_device_to_the_running_guest_again_after_a_replug(
        usb_lab: Lab, lab_client: TestClient) -> None:
    rule = await add_rule(lab_client, WACOM_RULE)
    async with event_stream(lab_client, "device") as ws:
        usb_lab.plug("wacom")
        seconds = await follows(lab_client, "056a:0000")
        event = await next_message(ws, lambda m: m["type"] == "rule")
        assert event == {**event, "rule": rule["id"], "domain": GUEST_NAME, "action": "attach",
                         "result": "ok", "vendor": "Wacom Co., Ltd", "product": "PenPartner"}
        print(f"plug to attached: {seconds:.2f} s")

        await unplugged_quietly(usb_lab, "wacom1")
        await until(lambda: no_devices(lab_client), FOLLOW_S, "the guest lets go of it")

        usb_lab.plug("wacom")
        await follows(lab_client, "056a:0000")
        assert await held_ids(lab_client) == ["056a:0000"]  # once, not with a stale twin


async def unplugged_quietly(lab: Lab, device_id: str) -> None:
    await asyncio.to_thread(lab.unplug, device_id)


async def no_devices(client: TestClient) -> bool:
    return await guest_devices(client) == []


async def test_a_port_rule_follows_a_different_device_plugged_into_that_port(
        usb_lab: Lab, lab_client: TestClient) -> None:
    await add_rule(lab_client, {"domain": GUEST_NAME, "match": {"port": "1-3"}})
    usb_lab.plug("wacom", port="3")
    await follows(lab_client, "056a:0000")
    await unplugged_quietly(usb_lab, "wacom1")
    await until(lambda: no_devices(lab_client), FOLLOW_S, "the guest lets go of the wacom")
    usb_lab.plug("smartcard", port="3")
    await follows(lab_client, "08e6:4433")
    # Another port is not the rule's: after the pass that the plug caused, still one device.
    reconciler = lab_client.app[USB_RECONCILER]
    async with event_stream(lab_client, "host") as ws:
        passes = reconciler.passes
        usb_lab.plug("wacom", port="4")
        await next_message(ws, lambda m: m["type"] == "node-device-added")
    await until(lambda: reconciler.passes > passes and reconciler.idle, 10, "the pass")
    assert await held_ids(lab_client) == ["08e6:4433"]


async def test_a_device_plugged_while_the_guest_is_off_is_given_when_it_starts(
        usb_lab: Lab, lab_client: TestClient) -> None:
    assert (await lab_client.get(f"/api/0/destroy/{GUEST_NAME}")).status == 200
    await add_rule(lab_client, WACOM_RULE)
    async with event_stream(lab_client, "host") as ws:
        await plugged(ws, usb_lab, "wacom")
    assert (await lab_client.get(f"/api/0/start/{GUEST_NAME}")).status == 200
    await follows(lab_client, "056a:0000")


async def test_of_two_running_guests_that_want_one_device_the_older_rule_wins(
        usb_lab: Lab, lab_client: TestClient, second_guest: str) -> None:
    older = await add_rule(lab_client, {**WACOM_RULE, "domain": second_guest})
    younger = await add_rule(lab_client, WACOM_RULE)
    async with event_stream(lab_client, "device") as ws:
        usb_lab.plug("wacom")
        await follows(lab_client, "056a:0000", second_guest)
        results = {}
        while len(results) < 2:
            event = await next_message(ws, lambda m: m["type"] == "rule")
            results[event["rule"]] = (event["result"], event.get("error"))
    assert results[older["id"]] == ("ok", None)
    assert results[younger["id"]][0] == "error"
    assert second_guest in results[younger["id"]][1]
    assert await held_ids(lab_client) == []


async def test_deleting_a_rule_detaches_nothing_and_a_restart_attaches_nothing_twice(
        usb_lab: Lab, lab_client: TestClient, make_client: Any) -> None:
    rule = await add_rule(lab_client, WACOM_RULE)
    usb_lab.plug("wacom")
    await follows(lab_client, "056a:0000")

    # webvirt again (restarted: the same state, the same rules), while the guest holds it.
    state = lab_client.app[SETTINGS].state_dir
    await lab_client.close()
    again = await make_client(uri=usb_lab.uri, state_dir=state)
    reconciler = again.app[USB_RECONCILER]
    await until(lambda: reconciler.passes >= 1 and reconciler.idle, 10, "its first pass")
    assert await held_ids(again) == ["056a:0000"]

    passes = reconciler.passes
    assert (await again.delete(f"/api/0/rules/{rule['id']}")).status == 204
    await until(lambda: reconciler.passes > passes and reconciler.idle, 10, "a pass after")
    assert await held_ids(again) == ["056a:0000"]


async def test_a_plug_while_the_lab_host_was_frozen_is_given_after_the_reconnect(
        usb_lab: Lab, lab_client: TestClient) -> None:
    await add_rule(lab_client, WACOM_RULE)
    async with event_stream(lab_client, "connection") as ws:
        usb_lab.qmp("stop")  # the whole lab host, its libvirtd with it, stands still
        try:
            await next_message(ws, lambda m: m.get("state") == "lost", 30)
            usb_lab.plug("wacom")
        finally:
            usb_lab.qmp("cont")
        await next_message(ws, lambda m: m.get("state") == "restored", 30)
    await follows(lab_client, "056a:0000")



async def test_two_alike_devices_are_both_given(usb_lab: Lab, lab_client: TestClient) -> None:
    """The keyboard and the mouse share 0627:0001: libvirt refuses an attach by ids alone
    ("Multiple USB devices"); the rule attaches each by its address too."""
    await add_rule(lab_client, {"domain": GUEST_NAME,
                                "match": {"vendor_id": "0627", "product_id": "0001"}})
    usb_lab.plug("keyboard")
    usb_lab.plug("mouse")

    async def both() -> bool:
        return await held_ids(lab_client) == ["0627:0001", "0627:0001"]

    await until(both, 10, "both alike devices are held")


async def test_an_older_rule_takes_the_device_from_a_younger_rules_guest_when_it_starts(
        usb_lab: Lab, lab_client: TestClient, second_guest: str) -> None:
    older = await add_rule(lab_client, {**WACOM_RULE, "domain": second_guest})
    younger = await add_rule(lab_client, WACOM_RULE)
    assert (await lab_client.get(f"/api/0/destroy/{second_guest}")).status == 200
    async with event_stream(lab_client, "device") as ws:
        usb_lab.plug("wacom")
        first = await next_message(ws, lambda m: m["type"] == "rule")  # only its guest runs
        assert (first["action"], first["domain"], first["result"]) == (
            "attach", GUEST_NAME, "ok")
        assert (await lab_client.get(f"/api/0/start/{second_guest}")).status == 200
        # The younger rule hears of its loss before or after the hand-over: before it when
        # the older rule's attach waits for the start still holding its guest (a retry).
        events = [await next_message(ws, lambda m: m["type"] == "rule") for _ in range(3)]
    seen = [(e["rule"], e["action"], e["domain"], e["result"]) for e in events]
    hand_over = [s for s in seen if s[0] == older["id"]]
    assert hand_over == [(older["id"], "detach", GUEST_NAME, "ok"),
                         (older["id"], "attach", second_guest, "ok")]
    assert (younger["id"], "attach", GUEST_NAME, "error") in seen
    assert await held_ids(lab_client, second_guest) == ["056a:0000"]
    assert await held_ids(lab_client) == []


# libvirtd and its sockets in the lab host (socket-activated: with a socket left listening, the
# next connection would start it again at once).
LIBVIRTD_SOCKETS = ("libvirtd-tcp.socket", "libvirtd.socket", "libvirtd-ro.socket",
                    "libvirtd-admin.socket")


async def test_a_plug_while_libvirtd_was_stopped_is_given_after_it_restarts(
        usb_lab: Lab, lab_client: TestClient) -> None:
    await add_rule(lab_client, WACOM_RULE)
    async with event_stream(lab_client, "connection") as ws:
        await asyncio.to_thread(usb_lab.run, "systemctl", "stop", "libvirtd.service",
                                *LIBVIRTD_SOCKETS)
        try:
            await next_message(ws, lambda m: m.get("state") == "lost", 30)
            usb_lab.plug("wacom")
        finally:
            await asyncio.to_thread(usb_lab.run, "systemctl", "start", *LIBVIRTD_SOCKETS)
        await next_message(ws, lambda m: m.get("state") == "restored", 60)
    await follows(lab_client, "056a:0000")
