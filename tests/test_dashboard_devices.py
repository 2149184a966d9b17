"""The dashboard's host devices on the demo host (libvirt's test driver): the picker, the USB
rules, and what each VM holds. The test driver cannot attach or detach (501), so here those
show their error; tests/test_dashboard_usb_lab.py attaches and detaches for real."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiohttp.test_utils import TestClient
from playwright.async_api import Locator, Page, expect

from tests.conftest import ClientFactory
from tests.processes import REPO
from tests.test_dashboard import card, open_dashboard
from tests.waiting import until

TOKEN = "letmein"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RECEIVER_MATCH = {"vendor_id": "046d", "product_id": "c52b"}
NOT_SUPPORTED = "not supported by the connection driver"


def picked(page: Page, product: str) -> Locator:
    """The picker's choice for a host device, by its product name."""
    return page.locator("#picker").get_by_role("radio", name=product)


def rule_items(page: Page) -> Locator:
    return page.locator("#rules > li")


async def rules_via_api(client: TestClient) -> list[dict[str, Any]]:
    response = await client.get("/api/0/rules", headers=AUTH)
    assert response.status == 200, await response.text()
    rules: list[dict[str, Any]] = await response.json()
    return rules


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


async def test_the_picker_lists_the_host_devices_with_who_holds_them(
        client: TestClient, page: Page) -> None:
    await open_dashboard(page, client)
    receiver = page.locator('#usb-devices [data-device="usb_1_4"]')
    await expect(receiver).to_contain_text("Unifying Receiver")
    await expect(receiver).to_contain_text("Logitech, Inc. · 046d:c52b")
    await expect(receiver).to_contain_text("free")
    await expect(page.locator("#usb-devices > li")).to_have_count(2)  # and the keyboard

    await page.locator("#pci-details summary").click()
    gpu = page.locator('#pci-devices [data-device="pci_0000_0f_00_0"]')
    await expect(gpu).to_contain_text("GP102 [GeForce GTX 1080 Ti]")
    await expect(gpu).to_contain_text("10de:1b06 · IOMMU group 14 · 0000:0f:00.0")
    await expect(gpu).to_contain_text("configured for win11")  # in its saved definition

    # Nothing chosen yet: nothing to do.
    await expect(page.get_by_role("button", name="Attach now")).to_be_disabled()
    # A PCI device cannot be given by a rule (rules are for USB); a device without a port
    # (the test driver's have none) cannot be given by port.
    await picked(page, "GP102 [GeForce GTX 1080 Ti]").check()
    await expect(page.get_by_role("button", name="Attach now")).to_be_enabled()
    await expect(page.locator("#give-always")).to_be_hidden()
    await picked(page, "Unifying Receiver").check()
    await expect(page.locator("#give-always")).to_be_visible()
    await expect(page.locator("#give-port")).to_be_hidden()


async def test_usb_root_hubs_are_left_out(make_client: ClientFactory, tmp_path: Path,
                                          page: Page) -> None:
    root_hub = """<device><name>usb_usb1</name><parent>computer</parent>
      <capability type='usb_device'><bus>1</bus><device>1</device>
      <product id='0x0002'>2.0 root hub</product>
      <vendor id='0x1d6b'>Linux Foundation</vendor></capability></device>"""
    host = tmp_path / "host.xml"
    host.write_text((REPO / "demo" / "host.xml").read_text().replace(
        "</node>", f"{root_hub}</node>"))
    client = await make_client(uri=f"test://{host}")
    listing = await (await client.get("/api/0/host/devices")).json()
    assert "usb_usb1" in [d["name"] for d in listing]
    await open_dashboard(page, client)
    await expect(page.locator("#usb-devices > li")).to_have_count(2)
    await expect(page.locator("#usb-devices")).not_to_contain_text("root hub")


async def test_always_give_makes_a_rule_that_switches_off_and_is_deleted_with_a_token(
        make_client: ClientFactory, page: Page) -> None:
    client = await make_client(token=TOKEN)
    await open_dashboard(page, client, f"#token={TOKEN}")
    await picked(page, "Unifying Receiver").check()
    await page.select_option("#picker-domain", "win11")
    await page.get_by_role("button", name="Always give to this VM").click()

    await expect(rule_items(page)).to_have_count(1)
    rule = rule_items(page).first
    await expect(rule).to_contain_text("win11 always gets Unifying Receiver (046d:c52b)")
    await expect(page.locator("#picker-message")).to_contain_text("win11: rule 1 gives it")
    [made] = await rules_via_api(client)
    assert {k: made[k] for k in ("id", "domain", "match", "enabled", "persistent")} == {
        "id": 1, "domain": "win11", "match": RECEIVER_MATCH, "enabled": True,
        "persistent": False}

    await rule.get_by_role("checkbox", name="Enabled").uncheck()

    async def switched_off() -> bool:
        return [r["enabled"] for r in await rules_via_api(client)] == [False]

    await until(switched_off, 10, "the rule is off")
    await expect(rule_items(page).first).to_have_class("rule rule-off")
    [kept] = await rules_via_api(client)
    assert kept == {**made, "enabled": False}  # the rest of it as it was

    await rule_items(page).first.get_by_role("button", name="Delete").click()
    await expect(rule_items(page)).to_have_count(0)
    await expect(page.locator("#no-rules")).to_be_visible()
    assert await rules_via_api(client) == []


async def test_rules_made_and_deleted_elsewhere_show_without_a_reload(
        client: TestClient, page: Page) -> None:
    await open_dashboard(page, client)
    await expect(page.locator("#no-rules")).to_be_visible()
    response = await client.post("/api/0/rules", json={
        "domain": "linux-dev", "match": {"port": "1-4.2"}})
    assert response.status == 201, await response.text()
    await expect(rule_items(page).locator(".rule-text")).to_have_text([
        "linux-dev always gets port 1-4.2by port · rule 1"])
    assert (await client.delete("/api/0/rules/1")).status == 204
    await expect(rule_items(page)).to_have_count(0)


async def test_a_refused_switch_goes_back_and_says_why(make_client: ClientFactory,
                                                      page: Page) -> None:
    client = await make_client(token=TOKEN, read_tokens=("view",))
    response = await client.post("/api/0/rules", headers=AUTH,
                                 json={"domain": "win11", "match": RECEIVER_MATCH})
    assert response.status == 201, await response.text()
    await open_dashboard(page, client, "#token=view")  # may read, not act
    switch = rule_items(page).first.get_by_role("checkbox", name="Enabled")
    await expect(switch).to_be_checked()
    await switch.click()  # not uncheck(): that insists on the box staying unchecked
    await expect(page.locator("#rules-message")).to_have_text(
        "Rule 1: switched off failed: this token may only read; actions need the full token")
    await expect(switch).to_be_checked()  # as the server has it
    await expect(switch).to_be_enabled()
    assert [r["enabled"] for r in await rules_via_api(client)] == [True]


async def test_attach_now_sends_the_device_and_shows_why_it_failed(
        client: TestClient, page: Page) -> None:
    await open_dashboard(page, client)
    await picked(page, "Unifying Receiver").check()
    await page.select_option("#picker-domain", "linux-dev")
    async with page.expect_request("**/api/0/attach/**") as sent:
        await page.get_by_role("button", name="Attach now").click()
    request = await sent.value
    assert request.method == "POST"
    # Where it is plugged too: libvirt refuses ids that two plugged devices share.
    assert urlsplit(request.url).path == "/api/0/attach/linux-dev/usb_address"
    assert query_of(request.url) == {"vendor_id": ["046d"], "product_id": ["c52b"],
                                     "bus": ["1"], "device": ["4"]}
    await expect(page.locator("#picker-message")).to_contain_text(
        f"linux-dev: attach Unifying Receiver failed: this function is {NOT_SUPPORTED}")
    await expect(page.get_by_role("button", name="Attach now")).to_be_enabled()

    await page.locator("#pci-details summary").click()
    await picked(page, "GP102 [GeForce GTX 1080 Ti]").check()
    async with page.expect_request("**/api/0/attach/**") as sent:
        await page.get_by_role("button", name="Attach now").click()
    request = await sent.value
    assert urlsplit(request.url).path == "/api/0/attach/linux-dev/pci"
    assert query_of(request.url) == {"domain": ["0000"], "bus": ["0f"], "slot": ["00"],
                                     "function": ["0"]}


async def test_a_vm_card_lists_what_it_holds_and_shows_why_a_detach_failed(
        client: TestClient, page: Page) -> None:
    await open_dashboard(page, client)
    held = card(page, "win11").locator(".hostdev")
    await expect(held).to_have_count(1)
    await expect(held).to_contain_text("GP102 [GeForce GTX 1080 Ti]")  # named from the host
    await expect(held).to_contain_text("PCI · 0000:0f:00.0")
    await expect(card(page, "linux-dev").locator(".hostdev")).to_have_count(0)

    detach = held.get_by_role("button", name="Detach")
    async with page.expect_request("**/api/0/detach/**") as sent:
        await detach.click()
    request = await sent.value
    assert urlsplit(request.url).path == "/api/0/detach/win11/pci"
    # win11 is shut off: its list is its saved definition, and that is what is changed.
    assert query_of(request.url) == {"domain": ["0000"], "bus": ["0f"], "slot": ["00"],
                                     "function": ["0"], "live": ["0"], "persistent": ["1"]}
    await expect(card(page, "win11").locator(".card-message")).to_have_text(
        f"Detach GP102 [GeForce GTX 1080 Ti] failed: this function is {NOT_SUPPORTED}: "
        "virDomainDetachDeviceFlags")
    await expect(held.get_by_role("button", name="Detach")).to_be_enabled()
    await expect(held).to_have_count(1)  # still there, as libvirt has it
