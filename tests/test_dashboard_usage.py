"""The dashboard's live usage: each running VM's card graphs its CPU and memory from the `stats`
messages of the event stream, on the demo host (libvirt's test driver) and on a real QEMU guest
that keeps its vCPU busy."""

from __future__ import annotations

import re

import libvirt
import pytest
from playwright.async_api import Locator, Page, expect

from tests.conftest import ClientFactory, blocked_by_csp
from tests.libvirt_daemon import LibvirtDaemon
from tests.test_dashboard import card, open_dashboard
from tests.test_qemu_metrics import spinning_guest

TOKEN = "letmein"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def usage(page: Page, name: str) -> Locator:
    return card(page, name).locator(".usage")


async def points_of(page: Page, name: str, gauge: str) -> int:
    """How many samples the card's CPU or memory sparkline draws."""
    count: int = await page.locator(f'[data-domain="{name}"] .gauge-{gauge} polyline').evaluate(
        "(line) => line.points.numberOfItems")
    return count


async def wait_for_points(page: Page, name: str, at_least: int) -> None:
    """Until both sparklines of the card draw at least `at_least` samples."""
    await page.wait_for_function(
        """([name, least]) => [...document.querySelectorAll(
               `[data-domain="${name}"] .usage polyline`)]
             .filter((line) => line.points.numberOfItems >= least).length === 2""",
        arg=[name, at_least])


async def test_running_vms_graph_their_usage(make_client: ClientFactory, page: Page) -> None:
    # With a token (the stream's query carries it), and stats every 0.2 s, not 2.
    client = await make_client(token=TOKEN, stats_interval_s=0.2)
    await open_dashboard(page, client, f"#token={TOKEN}")
    # The test driver's linux-dev: 4 vCPUs that use no CPU time, 4 of 4 GiB "allocated".
    linux = usage(page, "linux-dev")
    await expect(linux).to_be_visible()
    await expect(linux.locator(".gauge-cpu .gauge-text")).to_have_text(
        re.compile(r"^CPU [\d.]+ %$"))
    await expect(linux.locator(".gauge-memory .gauge-text")).to_have_text("RAM 4 / 4 GiB")
    # Each stats message adds a sample: the lines grow as they come.
    await wait_for_points(page, "linux-dev", 2)
    before = await points_of(page, "linux-dev", "cpu")
    await wait_for_points(page, "linux-dev", before + 3)
    # The paused one is graphed too (stats come for it); the shut-off one is not.
    await expect(usage(page, "media-server")).to_be_visible()
    await expect(usage(page, "win11")).to_be_hidden()

    # win11 starts: its graph comes (from its second sample on); it stops: the graph goes.
    assert (await client.post("/api/0/start/win11", headers=AUTH)).status == 200
    await expect(usage(page, "win11")).to_be_visible()
    await expect(usage(page, "win11").locator(".gauge-memory .gauge-text")).to_have_text(
        re.compile(r"^RAM [\d.]+ / [\d.]+ GiB$"))
    await wait_for_points(page, "win11", 8)
    assert (await client.post("/api/0/destroy/win11", headers=AUTH)).status == 200
    await expect(card(page, "win11").locator(".state")).to_have_text("shut off")
    await expect(usage(page, "win11")).to_be_hidden()
    await expect(usage(page, "win11").locator("polyline")).to_have_count(0)
    # It runs again: a new graph, not the old one's samples.
    assert (await client.post("/api/0/start/win11", headers=AUTH)).status == 200
    await expect(usage(page, "win11")).to_be_visible()
    assert await points_of(page, "win11", "cpu") < 8
    await expect(card(page, "linux-dev").locator(".state")).to_have_text("running")
    assert await blocked_by_csp(page) == []


@pytest.mark.qemu
async def test_a_busy_guest_shows_its_cpu(page: Page, make_client: ClientFactory,
                                          qemu_conn: libvirt.virConnect,
                                          libvirt_daemon: LibvirtDaemon) -> None:
    qemu_conn.defineXML(spinning_guest(libvirt_daemon, "spin")).create()
    client = await make_client(uri=libvirt_daemon.uri, stats_interval_s=0.5)
    await open_dashboard(page, client)
    await expect(card(page, "spin").locator(".state")).to_have_text("running")
    # Once SeaBIOS has booted the loop, it keeps its one vCPU busy (TCG on a shared machine:
    # not a whole core).
    cpu_text = usage(page, "spin").locator(".gauge-cpu .gauge-text")
    await page.wait_for_function(
        """() => {
             const text = document.querySelector('[data-domain="spin"] .gauge-cpu .gauge-text');
             const match = text && /^CPU ([\\d.]+) %$/.exec(text.textContent);
             return match && Number(match[1]) > 20;
           }""", timeout=60000)
    await expect(cpu_text).to_be_visible()
    await wait_for_points(page, "spin", 2)
    # No balloon driver: memory in use is QEMU's resident memory, of the guest's 128 MiB.
    await expect(usage(page, "spin").locator(".gauge-memory .gauge-text")).to_have_text(
        re.compile(r"^RAM [\d.]+ / 128 MiB$"))
    # The line is high up at the end: the newest sample is the right-most, y = 100 - CPU %.
    last_y = await usage(page, "spin").locator(".gauge-cpu polyline").evaluate(
        "(line) => line.points.getItem(line.points.numberOfItems - 1).y")
    assert last_y < 80
