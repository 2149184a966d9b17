"""The dashboard in real headless Chromium (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import time

import libvirt
import pytest
from aiohttp.test_utils import TestClient
from playwright.async_api import Browser, Locator, Page, expect

from tests.conftest import ClientFactory, blocked_by_csp, drop_all_connections
from tests.libvirt_daemon import LibvirtDaemon, guest_xml


def card(page: Page, name: str) -> Locator:
    return page.locator(f'[data-domain="{name}"]')


async def open_dashboard(page: Page, client: TestClient, fragment: str = "") -> None:
    await page.goto(str(client.make_url("/")) + fragment)
    await expect(page.locator("#connection")).to_have_text("live")


async def test_shows_every_vm_with_its_state(client: TestClient, page: Page) -> None:
    await open_dashboard(page, client)
    await expect(card(page, "win11").locator(".state")).to_have_text("shut off")
    await expect(card(page, "linux-dev").locator(".state")).to_have_text("running")
    await expect(card(page, "media-server").locator(".state")).to_have_text("paused")
    # Only the power buttons that apply are shown.
    await expect(card(page, "win11").locator("button[data-action]:visible")).to_have_text(
        ["Start"])
    await expect(card(page, "linux-dev").locator("button[data-action]:visible")).to_have_text(
        ["Shut down", "Force off"])


async def test_works_under_its_content_security_policy(client: TestClient, page: Page) -> None:
    response = await page.goto(str(client.make_url("/")))
    assert response is not None
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    await expect(page.locator("#connection")).to_have_text("live")
    await card(page, "win11").get_by_role("button", name="Start").click()
    await expect(card(page, "win11").locator(".state")).to_have_text("running")
    await expect(page.locator("#device-template option")).not_to_have_count(0)
    assert await blocked_by_csp(page) == []


async def test_no_other_site_can_frame_the_pages(client: TestClient, page: Page) -> None:
    # Clickjacking: a decoy page must not show the dashboard (or the docs' Try it out) inside.
    frames = "".join(f'<iframe src="{client.make_url(path)}" onload="this.dataset.loaded=1">'
                     "</iframe>" for path in ("/", "/docs", "/redoc"))
    await page.set_content(f"<h1>Win a prize!</h1>{frames}")
    await page.wait_for_function(
        "[...document.querySelectorAll('iframe')].every((f) => f.dataset.loaded)")
    framed = page.frames[1:]
    assert len(framed) == 3
    # A refused frame shows the browser's error page instead of the framed one.
    assert [f.url.split(":", 1)[0] for f in framed] == ["chrome-error"] * 3, \
        [f.url for f in framed]


async def test_a_state_change_shows_within_a_second(client: TestClient, page: Page) -> None:
    await open_dashboard(page, client)
    started = time.monotonic()
    assert (await client.get("/api/0/start/win11")).status == 200
    await expect(card(page, "win11").locator(".state")).to_have_text("running", timeout=1000)
    assert time.monotonic() - started < 1.0


async def test_clicking_start_starts_the_vm(client: TestClient, page: Page) -> None:
    await open_dashboard(page, client)
    await card(page, "win11").get_by_role("button", name="Start").click()
    await expect(card(page, "win11").locator(".state")).to_have_text("running")
    assert await (await client.get("/api/0/state/win11")).json() == "running"
    # The click's answer and the "started" event race each other, so either may be logged first.
    await expect(page.locator("#log li", has_text="win11: starting")).to_have_count(1)
    await expect(page.locator("#log li", has_text="win11: started")).to_have_count(1)


async def test_resumes_after_a_dropped_connection(client: TestClient, page: Page) -> None:
    await open_dashboard(page, client)
    drop_all_connections(client)
    # While the page is away (it reconnects after half a second), win11 starts.
    assert await (await client.get("/api/0/start/win11")).json() == "starting"
    await expect(card(page, "win11").locator(".state")).to_have_text("running")
    # Only a resumed stream brings the event itself; a fresh snapshot would not log it.
    await expect(page.locator("#log li", has_text="win11: started")).to_have_count(1)


async def test_force_off(client: TestClient, page: Page) -> None:
    await open_dashboard(page, client)
    await card(page, "linux-dev").get_by_role("button", name="Force off").click()
    await expect(card(page, "linux-dev").locator(".state")).to_have_text("shut off")


async def test_fits_a_phone_screen(browser: Browser, client: TestClient) -> None:
    context = await browser.new_context(viewport={"width": 390, "height": 844},
                                        is_mobile=True, has_touch=True)
    page = await context.new_page()
    try:
        await open_dashboard(page, client)
        overflow = await page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0
        box = await card(page, "win11").get_by_role("button", name="Start").bounding_box()
        assert box is not None and box["height"] >= 40  # big enough for a thumb
    finally:
        await context.close()


async def test_token_from_the_url_fragment(make_client: ClientFactory, page: Page) -> None:
    client = await make_client(token="letmein")
    await open_dashboard(page, client, "#token=letmein")
    await expect(card(page, "win11").locator(".state")).to_have_text("shut off")
    assert "token" not in page.url  # dropped from the address bar once stored


async def test_asks_for_a_token_when_needed(make_client: ClientFactory, page: Page) -> None:
    client = await make_client(token="letmein")
    await page.goto(str(client.make_url("/")))
    await expect(page.locator("#token-dialog")).to_be_visible()
    await page.fill("#token-input", "letmein")
    await page.click("#token-form button")
    await expect(page.locator("#connection")).to_have_text("live")


@pytest.mark.qemu
async def test_libvirt_restart_and_attach_on_real_qemu(
        page: Page, qemu_client: TestClient, qemu_conn: libvirt.virConnect,
        libvirt_daemon: LibvirtDaemon) -> None:
    qemu_conn.defineXML(guest_xml("desk")).create()
    await open_dashboard(page, qemu_client)
    await expect(card(page, "desk").locator(".state")).to_have_text("running")

    await page.select_option("#device-domain", "desk")
    await page.select_option("#device-template", "usb_tablet")
    await page.locator("#device-form").get_by_role("button", name="Attach").click()
    await expect(page.locator("#log")).to_contain_text("desk: usb_tablet attached")
    await expect(page.locator("#log")).to_contain_text("desk: device added input")

    libvirt_daemon.kill()
    await expect(page.locator("#connection")).to_have_text("libvirt connection lost")
    libvirt_daemon.start()
    await expect(page.locator("#connection")).to_have_text("live", timeout=30000)
    await expect(card(page, "desk").locator(".state")).to_have_text("running")
