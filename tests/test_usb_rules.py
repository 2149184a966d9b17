"""The USB reconciler on libvirt's test driver: its demo host lists USB devices, and refuses
every attach (501), which shows that a rule that cannot be carried out is tried a bounded
number of times and reported once."""

from __future__ import annotations

import libvirt
from aiohttp.test_utils import TestClient

from tests.conftest import DEMO_HOST_URI
from tests.waiting import next_message, until
from webvirt.appkeys import USB_RECONCILER
from webvirt.usb_reconciler import ATTACH_ATTEMPTS, Holder, read_usb_world


async def test_a_rule_that_cannot_be_carried_out_is_tried_a_few_times_and_reported_once(
        client: TestClient) -> None:
    assert (await client.get("/api/0/start/win11")).status == 200
    reconciler = client.app[USB_RECONCILER]
    await until(lambda: reconciler.idle, 10, "the passes after webvirt's start and win11's")
    before = reconciler.passes
    async with client.ws_connect("/api/0/events?type=device") as ws:
        await next_message(ws, lambda m: m["type"] == "snapshot")
        response = await client.post("/api/0/rules", json={
            "domain": "win11", "match": {"vendor_id": "046d", "product_id": "c52b"}})
        assert response.status == 201, await response.text()
        rule = await response.json()
        event = await next_message(ws, lambda m: m["type"] == "rule")
        assert event == {**event, "rule": rule["id"], "domain": "win11", "device": "usb_1_4",
                         "product": "Unifying Receiver", "action": "attach", "result": "error"}
        assert "support" in event["error"]
        assert reconciler.passes - before <= ATTACH_ATTEMPTS
        await until(lambda: reconciler.idle, 10, "the reconciler gives up")
        # Given up: a later pass neither tries again nor repeats the report. The next device
        # message is the one this test causes.
        passes = reconciler.passes
        reconciler.wake()
        await until(lambda: reconciler.idle and reconciler.passes > passes, 10, "one more")
        await client.post("/api/0/rules", json={"domain": "linux-dev",
                                                "match": {"port": "9-9"}})
        following = await next_message(ws, lambda m: m["type"] in ("rule", "rule-changed"))
        assert following["type"] == "rule-changed", following


def hostdev(ids: str, address: str) -> str:
    vendor, product = ids.split(":")
    bus, number = address.split(":")
    return (f"<hostdev mode='subsystem' type='usb'><source><vendor id='0x{vendor}'/>"
            f"<product id='0x{product}'/><address bus='{bus}' device='{number}'/></source>"
            f"<alias name='ua-hostdev{number}'/></hostdev>")


def test_an_entry_whose_address_another_device_got_is_stale_not_a_holder() -> None:
    """Device numbers wrap: the address of a device unplugged while webvirt was away may come
    to another device (on the demo host, 1:5 is a SteelSeries keyboard, 1038:0024)."""
    conn = libvirt.open(DEMO_HOST_URI)
    try:
        conn.defineXML(f"""<domain type='test'><name>gamer</name><memory>1024</memory>
            <os><type>hvm</type></os><devices>{hostdev("0627:0001", "1:5")}
            {hostdev("046d:c52b", "1:4")}</devices></domain>""").create()
        world = read_usb_world(conn, local=False)
    finally:
        conn.close()
    gamer = [uuid for uuid, name in world.running.items() if name == "gamer"]
    assert world.held == {"1:4": Holder(gamer[0], "gamer")}
    assert [(s.domain, s.hostdev["vendor_id"], s.hostdev["address"]) for s in world.stale] == [
        ("gamer", "0627", "1:5")]
