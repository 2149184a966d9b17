"""Makes static/overlay-example.png, the README's picture of the OBS overlay: `.venv/bin/python
scripts/overlay-screenshot.py` (after scripts/install --test).

The demo host (libvirt's test driver) with two USB devices handed to win11 and win11 started,
the overlay at its defaults, in Chromium, over a checkerboard that stands for "transparent".
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from aiohttp import web
from playwright.async_api import async_playwright

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import CHROMIUM, CHROMIUM_FLAGS  # noqa: E402
from webvirt.app import create_app  # noqa: E402
from webvirt.config import Settings  # noqa: E402

USB = ("<hostdev mode='subsystem' type='usb' managed='yes'><source><vendor id='0x{}'/>"
       "<product id='0x{}'/></source></hostdev>")
CHECKERBOARD = ("html { background: repeating-conic-gradient(#5b5f66 0 25%, #7a7f87 0 50%) "
                "0 0 / 24px 24px !important; }")


async def main(out: Path) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        host = Path(scratch) / "host.xml"
        usb = USB.format("046d", "c52b") + USB.format("1038", "0024")  # the demo's USB devices
        host.write_text((REPO / "demo" / "host.xml").read_text().replace(
            "</hostdev>", "</hostdev>" + usb, 1))
        runner = web.AppRunner(create_app(Settings(uri=f"test://{host}",
                                                   devices_dir=REPO / "devices",
                                                   state_dir=Path(scratch) / "state")))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch(executable_path=CHROMIUM,
                                                           args=CHROMIUM_FLAGS)
                context = await browser.new_context(viewport={"width": 1920, "height": 1080},
                                                    bypass_csp=True)
                page = await context.new_page()
                await page.goto(f"http://127.0.0.1:{port}/overlay")
                await page.request.get(f"http://127.0.0.1:{port}/api/0/start/win11")
                await page.locator('.vm[data-domain="win11"] .state').filter(
                    has_text="running").wait_for()
                await page.locator(".device").nth(1).wait_for()
                await page.add_style_tag(content=CHECKERBOARD)
                right, bottom = await page.evaluate("""() => {
                    const boxes = [...document.querySelectorAll(".vm > *")]
                        .map((e) => e.getBoundingClientRect());
                    return [Math.max(...boxes.map((b) => b.right)),
                            Math.max(...boxes.map((b) => b.bottom))]; }""")
                await page.screenshot(path=out, clip={"x": 0, "y": 0, "width": right + 28,
                                                      "height": bottom + 14})
                await browser.close()
        finally:
            await runner.cleanup()


if __name__ == "__main__":
    target = REPO / "static" / "overlay-example.png"
    asyncio.run(main(target))
    print(f"{target}: {target.stat().st_size} bytes")
