"""The Stream Deck plugin (streamdeck/), built as users get it, started by a stand-in for the
Stream Deck app (tests/streamdeck_app.py) that speaks Elgato's protocol, against a real webvirt
on the demo host (and on the real QEMU daemon, and the USB lab)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Any

import libvirt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from playwright.async_api import Page, expect

from tests.conftest import DEMO_HOST_URI, ClientFactory, DeckFactory, drop_all_connections
from tests.libvirt_daemon import LibvirtDaemon, guest_xml
from tests.processes import REPO, free_port, spawn_webvirt, wait_until_serving
from tests.streamdeck_app import (
    INFO,
    PLUGIN_DIR,
    POWER,
    STREAMDECK,
    USAGE,
    USB,
    FakeStreamDeck,
)
from tests.test_metrics import parse
from webvirt.app import create_app
from webvirt.config import Settings

DEMO_HOST = REPO / "demo" / "host.xml"
TOKEN = "streamdeck-test-token-1"
READ_TOKEN = "streamdeck-read-token-1"


def url_of(client: TestClient) -> str:
    return str(client.make_url("")).rstrip("/")


@pytest.fixture
async def demo(make_client: ClientFactory) -> TestClient:
    return await make_client(token=TOKEN, read_tokens=(READ_TOKEN,))


@pytest.fixture
async def deck(demo: TestClient, make_deck: DeckFactory) -> FakeStreamDeck:
    return await make_deck(url_of(demo), TOKEN)


async def state_of(client: TestClient, domain: str) -> str:
    response = await client.get(f"/api/0/state/{domain}",
                                headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status == 200, await response.text()
    state: str = await response.json()
    return state


# Keys that show.

async def test_every_key_is_drawn_within_a_second_of_appearing(deck: FakeStreamDeck) -> None:
    # The plugin has connected (its first key waits for the server's first answer).
    await deck.shows(await deck.appear(POWER, {"domain": "win11"}), "win11", "shut off")
    for domain, word in (("win11", "shut off"), ("linux-dev", "running"),
                         ("media-server", "paused")):
        began = time.monotonic()
        key = await deck.appear(POWER, {"domain": domain})
        shown = await deck.shows(key, domain, word, seconds=5)
        assert shown.at - began < 1.0, f"{domain}: {shown.at - began:.2f} s"


async def test_a_change_by_another_client_is_redrawn_within_half_a_second(
        deck: FakeStreamDeck, demo: TestClient) -> None:
    key = await deck.appear(POWER, {"domain": "win11"})
    await deck.shows(key, "shut off")
    mark = deck.mark()
    response = await demo.post("/api/0/start/win11", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status == 200
    started = time.monotonic()  # started: the change is made
    shown = await deck.shows(key, "running", after=mark)
    assert shown.at - started < 0.5, f"{shown.at - started:.2f} s"


async def test_a_press_starts_a_shut_off_vm_and_a_hold_forces_it_off(
        deck: FakeStreamDeck, demo: TestClient) -> None:
    key = await deck.appear(POWER, {"domain": "win11"})
    await deck.shows(key, "shut off")
    mark = deck.mark()
    await deck.press(key)
    await deck.wait_for(lambda m: m.event == "showOk" and m.data["context"] == key, 5,
                        "a tick", after=mark)
    await deck.shows(key, "running", after=mark)
    assert await state_of(demo, "win11") == "running"
    # A paused VM tells a hold from a press: a press would resume it, a hold forces it off.
    paused = await deck.appear(POWER, {"domain": "media-server"})
    await deck.shows(paused, "paused")
    mark = deck.mark()
    await deck.key_down(paused)
    await asyncio.sleep(1.1)  # the user holds the key for over a second
    await deck.key_up(paused)
    await deck.shows(paused, "shut off", after=mark)
    assert await state_of(demo, "media-server") == "shut off"
    assert not [m for m in deck.sent[mark:] if m.event == "showAlert"]
    # A release whose press the plugin never saw (a page changed meanwhile) does nothing.
    mark = deck.mark()
    await deck.key_up(key)
    await deck.press(key)  # and the next press is a press
    await deck.shows(key, "shut off", after=mark)


async def test_a_press_that_fails_shows_an_alert_and_logs_the_reason(
        deck: FakeStreamDeck) -> None:
    key = await deck.appear(USB, {"domain": "linux-dev", "vendor_id": "046d",
                                  "product_id": "c52b", "label": "Unifying Receiver"})
    await deck.shows(key, "Unifying Receiver", "not here")
    mark = deck.mark()
    await deck.press(key)  # the test driver cannot attach devices: 501
    await deck.wait_for(lambda m: m.event == "showAlert" and m.data["context"] == key, 5,
                        "a warning", after=mark)
    assert "(501)" in deck.log_tail()


async def test_fifty_keys_share_one_event_connection(deck: FakeStreamDeck,
                                                     demo: TestClient) -> None:
    domains = [("win11", "linux-dev", "media-server")[n % 3] for n in range(50)]
    keys = [await deck.appear(POWER, {"domain": domain}) for domain in domains]
    for key, domain in zip(keys, domains, strict=True):
        await deck.shows(key, domain)
    metrics = await demo.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert parse(await metrics.text())["webvirt_event_clients"] == {(): 1.0}


async def test_unknown_vm_wrong_token_and_garbage_server_show_on_the_key(
        deck: FakeStreamDeck, demo: TestClient) -> None:
    key = await deck.appear(POWER, {"domain": "win10"})
    await deck.shows(key, "win10", "no such VM")
    await deck.inspect(key)
    mark = deck.mark()
    await deck.change_global_settings({"server": url_of(demo), "token": "wrong-token-1234567"})
    await deck.shows(key, "token?", after=mark)
    reply = await deck.ask(key, {"request": "test", "server": url_of(demo),
                                 "token": "wrong-token-1234567", "id": 1})
    assert reply == {"event": "test", "id": 1, "context": key, "ok": False,
                     "text": "the token is wrong (401)"}
    mark = deck.mark()
    await deck.change_global_settings({"server": "htp:/nonsense", "token": TOKEN})
    await deck.shows(key, "set up", after=mark)
    reply = await deck.ask(key, {"request": "test", "server": "htp:/nonsense"})
    assert reply["ok"] is False and "server's address" in reply["text"]
    assert deck.alive


async def test_test_connection_tells_a_read_token_and_lists_vms(
        deck: FakeStreamDeck, demo: TestClient) -> None:
    key = await deck.appear(POWER, {})
    await deck.inspect(key)
    server = url_of(demo)
    assert await deck.ask(key, {"request": "test", "server": server, "token": TOKEN}) == {
        "event": "test", "context": key, "ok": True, "text": "connected: 3 VMs"}
    read = await deck.ask(key, {"request": "test", "server": server, "token": READ_TOKEN})
    assert read["ok"] is False and "read-only token" in read["text"]
    unreachable = await deck.ask(key, {"request": "test", "server": f"http://127.0.0.1:{free_port()}",
                                       "token": TOKEN})
    assert unreachable["ok"] is False and "unreachable" in unreachable["text"]
    listing = await deck.ask(key, {"request": "domains", "server": server, "token": TOKEN})
    assert [item["ref"] for item in listing["items"]] == ["linux-dev", "media-server", "win11"]
    devices = await deck.ask(key, {"request": "devices", "server": server, "token": TOKEN,
                                   "domain": "win11"})
    assert {(d["vendor_id"], d["product_id"]) for d in devices["items"]} == {
        ("046d", "c52b"), ("1038", "0024")}


async def test_the_token_goes_in_a_header_never_in_a_url(
        aiohttp_client: Any, make_deck: DeckFactory, tmp_path: Path) -> None:
    seen: list[tuple[str, str, str]] = []  # every request webvirt gets: method, URL, header

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.append((request.method, str(request.rel_url),
                     request.headers.get("Authorization", "")))
        return await handler(request)

    app = create_app(Settings(uri=DEMO_HOST_URI, token=TOKEN, state_dir=tmp_path / "state"))
    app.middlewares.insert(0, record)
    demo = await aiohttp_client(app)
    deck = await make_deck(url_of(demo), TOKEN)
    key = await deck.appear(POWER, {"domain": "linux-dev"})
    await deck.shows(key, "running")
    mark = deck.mark()
    await deck.press(key)
    await deck.wait_for(lambda m: m.event == "showOk", 5, "a tick", after=mark)
    assert {method for method, _url, _header in seen} == {"GET", "POST"}
    assert any(url.startswith("/api/0/events?") for _method, url, _header in seen), seen
    for method, url, header in seen:
        assert "token" not in url.lower() and header == f"Bearer {TOKEN}", (method, url)


# webvirt goes away and comes back.

async def test_a_dropped_stream_resumes_with_what_happened_meanwhile(
        deck: FakeStreamDeck, demo: TestClient) -> None:
    key = await deck.appear(POWER, {"domain": "win11"})
    await deck.shows(key, "shut off")
    mark = deck.mark()
    drop_all_connections(demo)  # a network blip: every connection ends
    response = await demo.post("/api/0/start/win11", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status == 200  # while the plugin was away
    await deck.shows(key, "running", after=mark)

async def test_keys_show_offline_when_webvirt_dies_and_are_right_within_a_second_of_its_return(
        make_deck: DeckFactory, tmp_path: Path) -> None:
    port = free_port()
    server = spawn_webvirt(DEMO_HOST_URI, port, "--token", TOKEN, state_dir=tmp_path)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/api/0/version", server)
        deck = await make_deck(f"http://127.0.0.1:{port}", TOKEN)
        key = await deck.appear(POWER, {"domain": "linux-dev"})
        await deck.shows(key, "running")
        mark = deck.mark()
        server.send_signal(signal.SIGKILL)
        server.communicate(timeout=10)
        await deck.shows(key, "offline", after=mark)
        mark = deck.mark()
        # Back, and linux-dev shut off meanwhile: the key must not keep what it showed.
        changed = tmp_path / "host.xml"
        changed.write_text(shut_off(DEMO_HOST.read_text(), "linux-dev"))
        server = spawn_webvirt(f"test://{changed}", port, "--token", TOKEN, state_dir=tmp_path)
        await asyncio.to_thread(wait_until_serving, f"http://127.0.0.1:{port}/api/0/version",
                                server)
        back = time.monotonic()
        shown = await deck.shows(key, "shut off", after=mark)
        assert shown.at - back < 1.0, f"{shown.at - back:.2f} s"
    finally:
        server.kill()
        server.communicate(timeout=10)


def shut_off(host_xml: str, domain: str) -> str:
    """The test driver's host with this domain shut off (its runstate 5)."""
    start = host_xml.index(f"<name>{domain}</name>")
    opening = host_xml.rindex("<domain ", 0, start)
    tag_end = host_xml.index(">", opening)
    tag = host_xml[opening:tag_end]
    if "xmlns:test" not in tag:
        tag += " xmlns:test='http://libvirt.org/schemas/domain/test/1.0'"
    end = host_xml.index("</domain>", start)
    body = re.sub(r"<test:runstate>\d+</test:runstate>", "", host_xml[tag_end:end])
    return f"{host_xml[:opening]}{tag}{body}<test:runstate>5</test:runstate>{host_xml[end:]}"


async def test_a_server_that_is_not_webvirt_crashes_nothing(
        deck: FakeStreamDeck, aiohttp_server: Any) -> None:
    async def login_page(_request: web.Request) -> web.Response:
        return web.Response(text="<html>please log in</html>", content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", login_page)
    other = await aiohttp_server(app)
    elsewhere = f"http://127.0.0.1:{other.port}"
    key = await deck.appear(POWER, {"domain": "win11"})
    await deck.shows(key, "shut off")
    await deck.inspect(key)
    for request in ("test", "test", "domains", "devices"):
        reply = await deck.ask(key, {"request": request, "server": elsewhere, "domain": "x"})
        assert reply["ok"] is False and "not webvirt's" in reply["text"], reply
    mark = deck.mark()
    await deck.change_global_settings({"server": elsewhere, "token": TOKEN})
    await deck.shows(key, "offline", after=mark)
    assert deck.alive


# Real guests.

@pytest.mark.qemu
async def test_a_real_guest_is_started_by_a_press_and_its_usage_drawn(
        make_client: ClientFactory, make_deck: DeckFactory, libvirt_daemon: LibvirtDaemon,
        qemu_conn: libvirt.virConnect) -> None:
    qemu_conn.defineXML(guest_xml("keyed"))
    client = await make_client(uri=libvirt_daemon.uri, token=TOKEN, stats_interval_s=0.5)
    deck = await make_deck(url_of(client), TOKEN)
    key = await deck.appear(POWER, {"domain": "keyed"})
    usage = await deck.appear(USAGE, {"domain": "keyed"})
    await deck.shows(key, "shut off")
    mark = deck.mark()
    await deck.press(key)
    await deck.shows(key, "running", seconds=30, after=mark)
    await deck.shows(usage, "CPU", "%", seconds=15, after=mark)


# What is shipped.

def npm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["npm", "run", *args], cwd=STREAMDECK, capture_output=True, text=True,
                          timeout=240)


@pytest.mark.time_limit(300)
def test_the_plugin_validates_and_packs_into_one_file_that_needs_no_npm(
        tmp_path: Path) -> None:
    manifest = (PLUGIN_DIR / "manifest.json").read_text()
    validated = npm("validate")
    assert validated.returncode == 0, validated.stdout + validated.stderr
    packed = npm("pack")
    assert packed.returncode == 0, packed.stdout + packed.stderr
    assert (PLUGIN_DIR / "manifest.json").read_text() == manifest  # pack left it as it was
    archive = STREAMDECK / "dist" / "org.webvirt.streamdeck.streamDeckPlugin"
    with zipfile.ZipFile(archive) as packed_file:
        names = packed_file.namelist()
        packed_manifest = json.loads(packed_file.read(
            "org.webvirt.streamdeck.sdPlugin/manifest.json"))
    assert "org.webvirt.streamdeck.sdPlugin/bin/plugin.js" in names
    assert not [n for n in names if "node_modules" in n or n.endswith(".log")]
    assert packed_manifest["UUID"] == "org.webvirt.streamdeck"
    # Every dependency is in the bundle: it imports nothing but Node's own modules.
    bundle = (PLUGIN_DIR / "bin" / "plugin.js").read_text()
    imports = {line.split(" from ")[-1].strip(" ';\"") for line in bundle.splitlines()
               if line.startswith("import ") and " from " in line}
    builtins = set(json.loads(subprocess.run(
        ["node", "-p", "JSON.stringify(require('node:module').builtinModules)"],
        check=True, capture_output=True, text=True).stdout))
    assert {name.removeprefix("node:") for name in imports} <= builtins, imports


def test_each_state_of_a_vm_has_a_colour_of_its_own() -> None:
    keys = json.loads(subprocess.run(["node", "scripts/keys.mjs"], cwd=STREAMDECK, check=True,
                                     capture_output=True, text=True).stdout)["gallery"]
    states = ("running", "paused", "shut off", "asleep", "crashed")
    backgrounds = {re.search(r'<rect width="144" height="144" fill="(#[0-9a-f]{6})"',
                             keys[state])[1] for state in states}  # type: ignore[index]
    assert len(backgrounds) == len(states)
    for name, svg in keys.items():
        assert svg.startswith("<svg ") and 'width="144"' in svg, name



# The property inspector, in Chromium.

async def test_the_settings_page_sets_server_token_and_vm_and_says_what_is_wrong(
        deck: FakeStreamDeck, demo: TestClient, page: Page) -> None:
    key = await deck.appear(POWER, {})
    await deck.shows(key, "set up")
    await deck.inspect(key)
    await connect_page(page, deck, POWER, key, {})
    await expect(page.locator("#device-row")).to_be_hidden()  # a power key has no device
    await expect(page.locator("#server")).to_have_value(url_of(demo))
    await expect(page.locator("#domain option")).to_have_count(4)  # "choose" and 3 VMs
    await page.click("#test")
    await expect(page.locator("#status")).to_have_text("connected: 3 VMs")
    mark = deck.mark()
    await page.select_option("#domain", "win11")
    await deck.shows(key, "win11", "shut off", after=mark)
    mark = deck.mark()
    await page.fill("#token", "wrong-token-1234567")
    await page.locator("#token").dispatch_event("change")
    await deck.shows(key, "token?", after=mark)
    await page.click("#test")
    await expect(page.locator("#status")).to_have_text("the token is wrong (401)")
    assert deck.global_settings == {"server": url_of(demo), "token": "wrong-token-1234567"}


async def test_the_usb_settings_page_lists_the_hosts_devices_when_it_opens(
        deck: FakeStreamDeck, page: Page) -> None:
    key = await deck.appear(USB, {"domain": "win11"})
    await deck.inspect(key)
    await connect_page(page, deck, USB, key, {"domain": "win11"})
    await expect(page.locator("#device option")).to_have_count(3)  # "choose" and 2 devices
    mark = deck.mark()
    await page.select_option("#device", "046d:c52b")
    await deck.shows(key, "Unifying Receiver", "not here", after=mark)
    assert deck.settings[key] == {"domain": "win11", "vendor_id": "046d",
                                  "product_id": "c52b", "label": "Unifying Receiver"}


async def connect_page(page: Page, deck: FakeStreamDeck, action: str, key: str,
                       settings: dict[str, Any]) -> None:
    """The key's settings page, connected as the Stream Deck app does it."""
    await page.goto((PLUGIN_DIR / "ui" / "settings.html").as_uri())
    await page.evaluate(
        "([port, uuid, info, action]) => window.connectElgatoStreamDeckSocket(port, uuid, "
        "'registerPropertyInspector', info, action)",
        [str(deck.port), key, json.dumps(INFO), json.dumps(
            {"action": action, "context": key, "device": "DEV1",
             "payload": {"settings": settings, "coordinates": {"column": 0, "row": 0},
                         "controller": "Keypad", "state": 0, "isInMultiAction": False}})])
