"""The OBS overlay (/overlay) and the user's own overlays (--overlays DIR), in real headless
Chromium (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import asyncio
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import libvirt
import pytest
from aiohttp.test_utils import TestClient
from playwright.async_api import Browser, Locator, Page, expect

from tests.conftest import (
    CHROMIUM,
    CHROMIUM_FLAGS,
    DEMO_HOST_URI,
    ClientFactory,
    blocked_by_csp,
    drop_all_connections,
)
from tests.libvirt_daemon import guest_xml
from tests.processes import REPO, free_port
from webvirt.appkeys import EVENT_HUB
from webvirt.hosts import HostSpec

FULL_HD = {"width": 1920, "height": 1080}


def vm(page: Page, name: str) -> Locator:
    return page.locator(f'.vm[data-domain="{name}"]')


async def open_overlay(page: Page, client: TestClient, query: str = "") -> None:
    response = await page.goto(str(client.make_url("/overlay")) + query)
    assert response is not None and response.status == 200
    await expect(page.locator(".vm").first).to_be_visible()


def host_uri(path: Path, domains: str) -> str:
    """A libvirt test-driver URI for a host with these <domain> elements."""
    path.write_text(f"<node>{domains}</node>")
    return f"test://{path}"


def domain_xml(name: str, devices: str = "") -> str:
    return (f"<domain type='test'><name>{name}</name><memory unit='GiB'>1</memory>"
            f"<os><type arch='x86_64'>hvm</type></os><devices>{devices}</devices></domain>")


def usb_hostdev(vendor: str, product: str) -> str:
    return (f"<hostdev mode='subsystem' type='usb' managed='yes'><source>"
            f"<vendor id='0x{vendor}'/><product id='0x{product}'/></source></hostdev>")


# --- The built-in overlay ------------------------------------------------------------------


async def test_shows_the_chosen_vm_and_a_state_change_within_a_second(
        client: TestClient, page: Page) -> None:
    response = await page.goto(str(client.make_url("/overlay?domain=win11")))
    assert response is not None
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    await expect(vm(page, "win11").locator(".state")).to_have_text("shut off")
    await expect(page.locator(".vm")).to_have_count(1)  # only the chosen one

    assert await (await client.get("/api/0/start/win11")).json() == "starting"
    answered = time.monotonic()
    await expect(vm(page, "win11").locator(".state")).to_have_text("running", timeout=1000)
    assert time.monotonic() - answered < 1.0
    assert await blocked_by_csp(page) == []


async def test_every_vm_when_none_is_chosen(client: TestClient, page: Page) -> None:
    await open_overlay(page, client, "?domain=linux-dev,nope")
    await expect(page.locator(".vm")).to_have_count(2)  # in the order asked for
    await expect(page.locator(".vm .state")).to_have_text(["running", "not found"])
    await open_overlay(page, client)
    await expect(page.locator(".vm .name")).to_have_text(["linux-dev", "media-server", "win11"])
    await expect(page.locator(".vm .state")).to_have_text(["running", "paused", "shut off"])


async def test_recovers_after_a_dropped_connection(client: TestClient, page: Page) -> None:
    await open_overlay(page, client, "?domain=win11")
    await expect(vm(page, "win11").locator(".state")).to_have_text("shut off")
    drop_all_connections(client)
    # While the EventSource is away (it comes back after a second by itself), win11 starts.
    assert await (await client.get("/api/0/start/win11")).json() == "starting"
    await expect(vm(page, "win11").locator(".state")).to_have_text("running")
    await expect(page.locator("#status")).to_be_hidden()


async def test_several_hosts_keep_their_vms_apart(make_client: ClientFactory, tmp_path: Path,
                                                   page: Page) -> None:
    """Two hosts with a VM of the same name: two entries, each following its own host; one
    host away is said for its VMs only."""
    b_uri = host_uri(tmp_path / "b.xml", domain_xml("win11", usb_hostdev("046d", "c52b")))
    client = await make_client(hosts=(HostSpec("a", DEMO_HOST_URI), HostSpec("b", b_uri)))
    await open_overlay(page, client, "?domain=win11,linux-dev@a")
    await expect(page.locator(".vm .name")).to_have_text(["win11@a", "win11@b", "linux-dev@a"])
    await expect(vm(page, "win11@a").locator(".state")).to_have_text("shut off")
    await expect(vm(page, "win11@b").locator(".state")).to_have_text("running")
    await expect(vm(page, "win11@b").locator(".device")).to_have_text(["046d:c52b"])
    await expect(vm(page, "win11@a").locator(".device")).to_have_count(0)

    assert await (await client.get("/api/0/start/win11@a")).json() == "starting"
    await expect(vm(page, "win11@a").locator(".state")).to_have_text("running")
    assert await (await client.get("/api/0/destroy/win11@b")).json() == "forced off"
    await expect(vm(page, "win11@b").locator(".state")).to_have_text("shut off")
    await expect(vm(page, "win11@a").locator(".state")).to_have_text("running")

    # A connection event of host b: said as b's, not as webvirt's whole.
    client.app[EVENT_HUB].publish("connection", state="lost", reason="test", host="b")
    await expect(page.locator("#status")).to_have_text("libvirt connection lost (b)")


def png_pixels(png: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and RGBA rows of an 8-bit RGBA PNG (what a transparent screenshot is)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    position, compressed = 8, b""
    while position < len(png):
        length, kind = struct.unpack(">I4s", png[position:position + 8])
        body = png[position + 8:position + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert (depth, color, interlace) == (8, 6, 0), "not 8-bit RGBA, not interlaced"
        elif kind == b"IDAT":
            compressed += body
        position += 12 + length
    raw, stride = zlib.decompress(compressed), width * 4
    rows, previous = [], bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, row = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            left = row[i - 4] if i >= 4 else 0
            up, up_left = previous[i], previous[i - 4] if i >= 4 else 0
            if kind == 1:
                row[i] = (row[i] + left) & 0xFF
            elif kind == 2:
                row[i] = (row[i] + up) & 0xFF
            elif kind == 3:
                row[i] = (row[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                guess = left + up - up_left
                nearest = min((abs(guess - left), 0, left), (abs(guess - up), 1, up),
                              (abs(guess - up_left), 2, up_left))[2]
                row[i] = (row[i] + nearest) & 0xFF
        rows.append(bytes(row))
        previous = row
    return width, height, rows


async def test_the_background_is_transparent(browser: Browser, client: TestClient) -> None:
    # Small, so decoding the PNG in Python stays quick; the page is the same at any size.
    context = await browser.new_context(viewport={"width": 480, "height": 270})
    page = await context.new_page()
    try:
        await open_overlay(page, client)
        await expect(page.locator(".vm")).to_have_count(3)
        width, height, rows = png_pixels(await page.screenshot(omit_background=True))
    finally:
        await context.close()
    alpha = [row[3::4] for row in rows]
    corners = [alpha[y][x] for y in (0, height - 1) for x in (0, width - 1)]
    assert corners == [0, 0, 0, 0]
    assert max(max(row) for row in alpha) == 255  # the text itself is there, opaque


async def test_no_scrollbars_at_1080p_with_many_vms(browser: Browser, make_client: ClientFactory,
                                                    tmp_path: Path) -> None:
    names = [f"vm-{i}" for i in range(10)] + ["a-very-long-vm-name-" * 8]
    uri = host_uri(tmp_path / "host.xml", "".join(
        domain_xml(name, "".join(usb_hostdev("046d", f"{i:02x}{j:02x}") for j in range(3)))
        for i, name in enumerate(names)))
    client = await make_client(uri=uri)
    # Playwright hides scroll bars in headless Chromium; OBS's browser shows them.
    with_scrollbars = await browser.browser_type.launch(
        executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
        ignore_default_args=["--hide-scrollbars"])
    try:
        page = await with_scrollbars.new_page(viewport=FULL_HD)
        await open_overlay(page, client, "?size=large")
        await expect(page.locator(".device")).to_have_count(3 * len(names))
        layout = await page.evaluate("""() => ({
            scrollbars: innerWidth - document.documentElement.clientWidth
                + innerHeight - document.documentElement.clientHeight,
            scrollHeight: document.documentElement.scrollHeight, innerHeight, innerWidth,
            outside: [...document.querySelectorAll(".vm")].map((e) => e.getBoundingClientRect())
                .filter((r) => r.bottom > innerHeight || r.right > innerWidth).length})""")
        assert layout["scrollbars"] == 0, layout
        assert layout["scrollHeight"] <= layout["innerHeight"], layout
        assert layout["outside"] == 0, layout  # every VM in view (in columns), none cut off
        # Even a browser source smaller than what it shows gets no scroll bars.
        await page.set_viewport_size({"width": 300, "height": 120})
        assert await page.evaluate("""() => innerWidth - document.documentElement.clientWidth
            + innerHeight - document.documentElement.clientHeight""") == 0
    finally:
        await with_scrollbars.close()


async def computed(page: Page, selector: str, *properties: str) -> list[str]:
    # In one go: the overlay may replace the element between two calls.
    values: list[str] = await page.evaluate(
        "([selector, properties]) => { const style = getComputedStyle("
        "document.querySelector(selector)); return properties.map((p) => style[p]); }",
        [selector, list(properties)])
    return values


async def test_size_and_theme_from_the_query(client: TestClient, page: Page) -> None:
    looks = {}
    for query in ("", "?size=small", "?size=large", "?theme=light", "?size=huge&theme=pink"):
        await open_overlay(page, client, query)
        looks[query] = await computed(page, ".vm .name", "fontSize", "color", "textShadow")
    font = {query: float(look[0].removesuffix("px")) for query, look in looks.items()}
    assert font["?size=small"] < font[""] < font["?size=large"]
    assert font[""] >= 24  # readable at 1080p
    assert looks[""][1] == "rgb(255, 255, 255)"  # dark theme: light text, dark shadow
    assert looks[""][2] != "none"
    assert looks["?theme=light"][1] == "rgb(17, 24, 39)"
    assert looks["?size=huge&theme=pink"] == looks[""]  # unknown values: the defaults


async def test_lists_the_usb_devices_the_api_reports(make_client: ClientFactory,
                                                     tmp_path: Path, page: Page) -> None:
    by_address = ("<hostdev mode='subsystem' type='usb'><source><address bus='1' device='5'/>"
                  "</source></hostdev>")
    pci = ("<hostdev mode='subsystem' type='pci' managed='yes'><source><address "
           "domain='0x0000' bus='0x0f' slot='0x00' function='0x0'/></source></hostdev>")
    uri = host_uri(tmp_path / "host.xml",
                    domain_xml("gamer", usb_hostdev("046d", "c52b") + by_address + pci)
                    + domain_xml("other", usb_hostdev("1234", "5678")))
    client = await make_client(uri=uri)
    held = await (await client.get("/api/0/devices/gamer")).json()
    assert [d["type"] for d in held] == ["usb", "usb", "pci"]
    await open_overlay(page, client, "?domain=gamer")
    await expect(vm(page, "gamer").locator(".device")).to_have_text(["046d:c52b", "bus 1:5"])


async def test_token_from_the_query(make_client: ClientFactory, tmp_path: Path,
                                    page: Page) -> None:
    uri = host_uri(tmp_path / "host.xml", domain_xml("gamer", usb_hostdev("046d", "c52b")))
    client = await make_client(uri=uri, token="letmein")
    await open_overlay(page, client, "?token=letmein")
    await expect(vm(page, "gamer").locator(".state")).to_have_text("running")
    await expect(vm(page, "gamer").locator(".device")).to_have_text(["046d:c52b"])


@pytest.mark.qemu
async def test_devices_follow_attach_and_detach_on_real_qemu(
        page: Page, qemu_client: TestClient, qemu_conn: libvirt.virConnect) -> None:
    # A guest whose saved definition holds a USB host device (it need not run, nor the
    # device exist, to be defined).
    xml = guest_xml("streamer").replace(
        "</devices>", usb_hostdev("046d", "c52b") + "</devices>")
    qemu_conn.defineXML(xml)
    await open_overlay(page, qemu_client, "?domain=streamer")
    await expect(vm(page, "streamer").locator(".state")).to_have_text("shut off")
    await expect(vm(page, "streamer").locator(".device")).to_have_text(["046d:c52b"])

    # Attaching and detaching (to the saved definition) re-reads the devices.
    query = "vendor_id=1b1c&product_id=1b2d&live=0&persistent=1"
    response = await qemu_client.get(f"/api/0/attach/streamer/usb?{query}")
    assert response.status == 200, await response.text()
    await expect(vm(page, "streamer").locator(".device")).to_have_text(
        ["046d:c52b", "1b1c:1b2d"])
    response = await qemu_client.get(f"/api/0/detach/streamer/usb?{query}")
    assert response.status == 200, await response.text()
    await expect(vm(page, "streamer").locator(".device")).to_have_text(["046d:c52b"])


# --- The user's own overlays (--overlays DIR) ----------------------------------------------

def readme_example() -> str:
    """The example custom overlay in the README, so what it shows is known to work."""
    section = (REPO / "README.md").read_text().split("### Your own overlays", 1)[1]
    return section.split("```html\n", 1)[1].split("```", 1)[0]


@pytest.fixture
def overlays_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "overlays"
    (folder / "sub").mkdir(parents=True)
    (folder / "win11.html").write_text(readme_example())
    (folder / "x.html").write_text("<p>my overlay</p>")
    (tmp_path / "secret.txt").write_text("not for the web")
    (folder / "sub" / "out.txt").symlink_to(tmp_path / "secret.txt")
    return folder


async def raw_status(client: TestClient, target: str) -> tuple[int, bytes]:
    """GET a path exactly as written (an HTTP client would normalize the dots away)."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                     .encode())
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    return int(answer.split(b" ", 2)[1]), answer


async def test_user_overlays_are_served_from_their_folder(make_client: ClientFactory,
                                                          overlays_dir: Path) -> None:
    client = await make_client(overlays_dir=overlays_dir)
    response = await client.get("/overlays/x.html")
    assert response.status == 200
    assert await response.text() == "<p>my overlay</p>"
    policy = response.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in policy
    assert "script-src 'self' 'unsafe-inline'" in policy
    assert response.headers["X-Frame-Options"] == "DENY"
    assert (await client.get("/overlays/missing.html")).status == 404
    assert (await client.get("/overlays/")).status == 403  # no listing
    for target in ("/overlays/../secret.txt", "/overlays/%2e%2e/secret.txt",
                   "/overlays/..%2fsecret.txt", "/overlays/sub/../../secret.txt",
                   "/overlays/%2e%2e%2fsecret.txt", "/overlays/sub/out.txt",
                   "/overlays//etc/passwd", "/overlays/..\\secret.txt"):
        status, answer = await raw_status(client, target)
        assert 400 <= status < 500, (target, status)
        assert b"not for the web" not in answer and b"root:" not in answer, target


async def test_no_user_overlays_without_the_option(client: TestClient) -> None:
    assert (await client.get("/overlays/")).status == 404  # a folder served there: 403
    assert (await client.get("/overlays/index.html")).status == 404


async def test_a_user_overlay_follows_the_event_stream(make_client: ClientFactory,
                                                       overlays_dir: Path, page: Page) -> None:
    # The README's example: same origin as the API, so its EventSource needs no CORS.
    client = await make_client(overlays_dir=overlays_dir)
    await page.goto(str(client.make_url("/overlays/win11.html")))
    await expect(page.locator("#vm")).to_have_text("win11: shutoff")
    assert await (await client.get("/api/0/start/win11")).json() == "starting"
    await expect(page.locator("#vm")).to_have_text("win11: running")
    assert await blocked_by_csp(page) == []


def test_a_missing_overlay_folder_is_a_one_line_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "webvirt", "--connect", DEMO_HOST_URI, "--port",
         str(free_port()), "--overlays", str(tmp_path / "nope"), "--state-dir",
         str(tmp_path / "state")],
        capture_output=True, text=True, timeout=20, cwd=REPO)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"webvirt: error: overlay folder {tmp_path / 'nope'} does not exist"]
