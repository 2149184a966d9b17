"""The dashboard with several hosts, in real headless Chromium: VMs grouped by host, each host
with its connection badge; one host looks as it always did."""

from __future__ import annotations

from aiohttp.test_utils import TestClient
from playwright.async_api import Page, expect

from tests.conftest import DEMO_HOST_URI, ClientFactory, blocked_by_csp
from tests.test_dashboard import card, open_dashboard
from webvirt.hosts import HostSpec

NOWHERE = "qemu+unix:///session?socket=/nonexistent/libvirt-sock"


async def test_vms_are_grouped_by_host_with_its_connection(make_client: ClientFactory,
                                                           page: Page) -> None:
    client = await make_client(hosts=(HostSpec("a", DEMO_HOST_URI),
                                       HostSpec("b", DEMO_HOST_URI),
                                       HostSpec("gone", NOWHERE)))
    await open_dashboard(page, client)
    groups = page.locator(".host-group")
    await expect(groups.locator(".host-name")).to_have_text(
        ["aconnected", "bconnected", "gonenot connected"])
    for host in ("a", "b"):
        await expect(page.locator(f'.host-group[data-host="{host}"] .card h3')).to_have_text(
            ["linux-dev", "media-server", "win11"])
    await expect(page.locator('.host-group[data-host="gone"] .card')).to_have_count(0)
    # One host's VM is started, not its namesake on the other.
    await card(page, "win11@b").get_by_role("button", name="Start").click()
    await expect(card(page, "win11@b").locator(".state")).to_have_text("running")
    await expect(card(page, "win11@a").locator(".state")).to_have_text("shut off")
    await expect(page.locator("#domains .card")).to_have_count(0)
    assert await blocked_by_csp(page) == []


async def test_one_host_has_no_host_groups(client: TestClient, page: Page) -> None:
    await open_dashboard(page, client)
    await expect(page.locator("#domains .card")).to_have_count(3)
    await expect(page.locator("#hosts")).to_be_hidden()
    await expect(page.locator(".host-group")).to_have_count(0)


async def test_the_picker_gives_a_device_only_to_a_vm_on_its_host(make_client: ClientFactory,
                                                                   page: Page) -> None:
    """Both hosts have a usb_1_4: each is listed with its host, and one goes only to a VM on
    its own host."""
    client = await make_client(hosts=(HostSpec("a", DEMO_HOST_URI), HostSpec("b", DEMO_HOST_URI)))
    await open_dashboard(page, client)
    for host in ("a", "b"):
        await expect(page.locator(f'#usb-devices [data-device="usb_1_4@{host}"]')).to_contain_text(
            f"host {host}")
    await page.locator('#usb-devices [data-device="usb_1_4@b"] input').check()
    attach = page.get_by_role("button", name="Attach now")
    await page.locator("#picker-domain").select_option("win11@a")
    await expect(page.locator("#picker-chosen")).to_contain_text("on host b: choose a VM there")
    await expect(attach).to_be_disabled()
    await expect(page.locator("#give-always")).to_be_disabled()
    await page.locator("#picker-domain").select_option("win11@b")
    await expect(attach).to_be_enabled()
    await expect(page.locator("#give-always")).to_be_enabled()
