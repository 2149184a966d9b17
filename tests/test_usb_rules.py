"""The USB reconciler on libvirt's test driver: its demo host lists USB devices, and refuses
every attach (501), which shows that a rule that cannot be carried out is tried a bounded
number of times and reported once."""

from __future__ import annotations

from aiohttp.test_utils import TestClient

from tests.waiting import next_message, until
from webvirt.appkeys import USB_RECONCILER
from webvirt.usb_reconciler import ATTACH_ATTEMPTS


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
