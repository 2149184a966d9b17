"""The dashboard on the USB lab (support/usb_lab.py): a device plugged into the lab host shows
in the picker, goes to lab-guest with "Attach now" or by a rule, and leaves it with the VM
card's Detach; a rule that loses its device to another VM says so."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

import libvirt
import pytest
from playwright.async_api import Page, expect

from support.usb_lab import GUEST_NAME, Lab
from tests.test_dashboard import card, open_dashboard
from tests.test_dashboard_devices import picked, rule_items
from tests.test_usb_lab import guest_devices
from tests.test_usb_rules_lab import (
    SECOND_GUEST,
    WACOM_RULE,
    add_rule,
    held_ids,
    second_guest,  # noqa: F401 (a fixture)
)

pytestmark = pytest.mark.usb_lab

# libvirt in the lab host is slow under load: a plug reaches the page in about a second.
LAB_MS = 20_000


def usb_hostdevs(conn: libvirt.virConnect, name: str = GUEST_NAME) -> list[tuple[str, str]]:
    """The (vendor, product) of each USB hostdev in the domain's live definition."""
    ids = []
    root = ET.fromstring(conn.lookupByName(name).XMLDesc())
    for source in root.iterfind("devices/hostdev[@type='usb']/source"):
        vendor, product = source.find("vendor"), source.find("product")
        assert vendor is not None and product is not None, ET.tostring(source)
        ids.append((vendor.get("id", ""), product.get("id", "")))
    return ids


async def test_attach_now_gives_a_plugged_device_and_the_card_detaches_it(
        usb_lab: Lab, lab_conn: libvirt.virConnect, make_client: Any, page: Page) -> None:
    client = await make_client(uri=usb_lab.uri)
    await open_dashboard(page, client)
    await expect(card(page, GUEST_NAME).locator(".state")).to_have_text("running")
    usb_lab.plug("wacom", port="3")
    # The page learns of the plug from the event stream.
    wacom = page.locator("#usb-devices > li", has_text="PenPartner")
    await expect(wacom).to_contain_text("Wacom Co., Ltd · 056a:0000 · port 1-3", timeout=LAB_MS)
    await expect(wacom).to_contain_text("free")

    await picked(page, "PenPartner").check()
    await page.select_option("#picker-domain", GUEST_NAME)
    await page.get_by_role("button", name="Attach now").click()
    await expect(page.locator("#picker-message")).to_have_text(
        f"{GUEST_NAME}: attached PenPartner", timeout=LAB_MS)
    assert await held_ids(client) == ["056a:0000"]
    assert usb_hostdevs(lab_conn) == [("0x056a", "0x0000")]

    held = card(page, GUEST_NAME).locator(".hostdev")
    await expect(held).to_have_count(1, timeout=LAB_MS)
    await expect(held).to_contain_text("PenPartner")
    await expect(held).to_contain_text("USB · 056a:0000")
    await expect(wacom).to_contain_text(f"held by {GUEST_NAME}")

    await held.get_by_role("button", name="Detach").click()
    await expect(held).to_have_count(0, timeout=LAB_MS)
    await expect(wacom).to_contain_text("free")
    assert await guest_devices(client) == []
    assert usb_hostdevs(lab_conn) == []
    await expect(card(page, GUEST_NAME).locator(".card-message")).to_be_hidden()


async def test_always_give_a_port_makes_a_rule_that_gives_the_device(
        usb_lab: Lab, lab_conn: libvirt.virConnect, make_client: Any, page: Page) -> None:
    client = await make_client(uri=usb_lab.uri)
    await open_dashboard(page, client)
    usb_lab.plug("wacom", port="4")
    await picked(page, "PenPartner").check(timeout=LAB_MS)
    await page.select_option("#picker-domain", GUEST_NAME)
    await page.get_by_role("button", name="Always give port 1-4 to this VM").click()

    await expect(rule_items(page).locator(".rule-what")).to_have_text(
        [f"{GUEST_NAME} always gets port 1-4 (now PenPartner)"])
    rules = await (await client.get("/api/0/rules")).json()
    assert [(r["domain"], r["match"]) for r in rules] == [(GUEST_NAME, {"port": "1-4"})]
    # The rule, not a call, puts it into the running guest; the card follows.
    held = card(page, GUEST_NAME).locator(".hostdev")
    await expect(held).to_contain_text("PenPartner", timeout=LAB_MS)
    assert await held_ids(client) == ["056a:0000"]
    assert usb_hostdevs(lab_conn) == [("0x056a", "0x0000")]


@pytest.mark.usefixtures("second_guest")
async def test_a_rule_that_loses_its_device_to_another_vm_says_so(
        usb_lab: Lab, make_client: Any, page: Page) -> None:
    client = await make_client(uri=usb_lab.uri)
    await add_rule(client, {**WACOM_RULE, "domain": SECOND_GUEST})  # older: it wins
    younger = await add_rule(client, WACOM_RULE)
    await open_dashboard(page, client)
    await expect(rule_items(page)).to_have_count(2)
    usb_lab.plug("wacom")

    loser = page.locator(f'#rules > li[data-rule="{younger["id"]}"]')
    await expect(loser.locator(".rule-error")).to_have_text(re.compile(
        rf"^Could not attach PenPartner: usb_[0-9_]+ (is held by {SECOND_GUEST}|goes to "
        rf"{SECOND_GUEST} by rule [0-9]+, which is older)$"), timeout=LAB_MS)
    await expect(card(page, SECOND_GUEST).locator(".hostdev")).to_contain_text("PenPartner")
    await expect(card(page, GUEST_NAME).locator(".hostdev")).to_have_count(0)
    await expect(page.locator("#rules > li .rule-error")).to_have_count(1)  # only the loser


def usb_hostdev_addresses(conn: libvirt.virConnect, name: str = GUEST_NAME) -> list[str]:
    """The host address ("BUS:DEVICE") of each USB hostdev in the domain's live definition."""
    root = ET.fromstring(conn.lookupByName(name).XMLDesc())
    return [f"{int(a.get('bus', '0'), 0)}:{int(a.get('device', '0'), 0)}"
            for a in root.iterfind("devices/hostdev[@type='usb']/source/address")]


async def test_attach_now_gives_the_one_picked_of_two_alike(
        usb_lab: Lab, lab_conn: libvirt.virConnect, make_client: Any, page: Page) -> None:
    """The lab's keyboard and mouse share 0627:0001, and libvirt refuses an attach by those ids
    alone ("Multiple USB devices"): the page asks for the one picked by where it is plugged,
    and the card's Detach gives back that one."""
    client = await make_client(uri=usb_lab.uri)
    await open_dashboard(page, client)
    await expect(card(page, GUEST_NAME).locator(".state")).to_have_text("running")
    usb_lab.plug("keyboard", port="1")
    usb_lab.plug("mouse", port="2")
    mouse = page.locator("#usb-devices > li", has_text="port 1-2")
    await expect(mouse).to_contain_text("0627:0001", timeout=LAB_MS)
    await expect(page.locator("#usb-devices > li", has_text="port 1-1")).to_contain_text(
        "0627:0001", timeout=LAB_MS)
    listed = await (await client.get("/api/0/host/devices")).json()
    address = next(d["address"] for d in listed if d.get("port") == "1-2")

    await mouse.get_by_role("radio").check()
    await page.select_option("#picker-domain", GUEST_NAME)
    await page.get_by_role("button", name="Attach now").click()
    await expect(page.locator("#picker-message")).to_contain_text(
        f"{GUEST_NAME}: attached", timeout=LAB_MS)
    assert usb_hostdev_addresses(lab_conn) == [address]

    held = card(page, GUEST_NAME).locator(".hostdev")
    await expect(held).to_have_count(1, timeout=LAB_MS)
    await held.get_by_role("button", name="Detach").click()
    await expect(held).to_have_count(0, timeout=LAB_MS)
    assert usb_hostdevs(lab_conn) == []
