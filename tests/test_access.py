"""Stream Deck and OBS: read-only tokens, other origins that may read, one power button."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from playwright.async_api import Page

from tests.conftest import ClientFactory
from tests.processes import free_port
from tests.test_seed_api import get_json
from tests.waiting import until

FULL, READER = "full-secret", "reader-secret"
EXAMPLE = {"domain": "linux-dev", "xml_name": "usb_tablet", "id": "1"}


async def operations(client: TestClient) -> list[tuple[str, str, bool]]:
    """(method, path, is an action) of every /api/ operation in the OpenAPI spec. Whatever is
    not a GET acts; so does a GET that does what its path's POST does (actions take GET too,
    for Stream Deck buttons), where a REST collection's GET lists and its POST creates."""
    spec = await get_json(client, "/api/0/openapi.json")
    found = []
    for template, methods in spec["paths"].items():
        if not template.startswith("/api/") or template.endswith("openapi.json"):
            continue
        path = re.sub(r"\{(\w+)\}", lambda m: EXAMPLE[m.group(1)], template)
        post = methods.get("post", {}).get("summary")
        found += [(method.upper(), path, method != "get" or operation["summary"] == post)
                  for method, operation in methods.items()]
    assert len(found) > 20, found
    return found


@pytest.fixture
async def guarded(make_client: ClientFactory) -> TestClient:
    return await make_client(token=FULL, read_tokens=(READER,))


async def test_a_read_token_reads_everything_and_acts_on_nothing(guarded: TestClient) -> None:
    before = await get_json(guarded, "/api/0/domains", headers=bearer(FULL))
    for method, path, action in await operations(guarded):
        response = await guarded.request(method, path, headers=bearer(READER))
        body = await response.read()
        if action:
            assert response.status == 403, (method, path, body)
            assert (await response.json())["code"] == "read_only_token"
        else:
            assert response.status not in (401, 403), (method, path, body)
    # The same token in the query string (what a plugin that only sets a URL sends).
    response = await guarded.get(f"/api/0/start/win11?token={READER}")
    assert response.status == 403
    assert await get_json(guarded, "/api/0/domains", headers=bearer(FULL)) == before


async def test_the_full_token_acts_and_no_token_is_refused(guarded: TestClient) -> None:
    for method, path, _action in await operations(guarded):
        response = await guarded.request(method, path)
        assert response.status == 401, (method, path)
    assert await get_json(guarded, "/api/0/start/win11", headers=bearer(FULL)) == "starting"
    response = await guarded.get("/api/0/start/win11", headers=bearer("nonsense"))
    assert response.status == 401


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_the_power_button_goes_through_every_state(client: TestClient) -> None:
    async def press() -> Any:
        return await get_json(client, "/api/0/power/media-server")

    async def state() -> Any:
        return (await get_json(client, "/api/0/status/media-server"))["state"]

    assert await state() == "paused"
    assert await press() == "resumed"
    assert await state() == "running"
    assert await press() == "shutting down"  # the test driver's guests stop at once
    assert await state() == "shutoff"
    assert await press() == "starting"
    assert await state() == "running"
    response = await client.post("/api/0/power/no-such-vm")
    assert response.status == 404


async def test_status_is_flat_json_for_a_key(client: TestClient) -> None:
    assert await get_json(client, "/api/0/status/win11") == {
        "domain": "win11", "state": "shutoff", "running": False, "paused": False,
        "devices": ["0000:0f:00.0"]}
    status = await get_json(client, "/api/0/status/linux-dev")
    assert (status["running"], status["paused"], status["devices"]) == (True, False, [])


# Other origins.

OVERLAY = "http://overlay.example:8080"


@pytest.fixture
async def open_to_overlay(make_client: ClientFactory) -> TestClient:
    return await make_client(allowed_origins=(OVERLAY, "null"))


def from_origin(origin: str) -> dict[str, str]:
    return {"Origin": origin, "Sec-Fetch-Site": "cross-site"}


async def test_an_allowed_origin_may_read(open_to_overlay: TestClient) -> None:
    response = await open_to_overlay.get("/api/0/domains", headers=from_origin(OVERLAY))
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == OVERLAY
    assert "Origin" in response.headers.getall("Vary")
    response = await open_to_overlay.get("/api/0/events", headers={
        **from_origin(OVERLAY), "Accept": "text/event-stream"})
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == OVERLAY
    response.close()
    preflight = await open_to_overlay.options("/api/0/domains", headers={
        **from_origin(OVERLAY), "Access-Control-Request-Headers": "authorization"})
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == OVERLAY
    assert preflight.headers["Access-Control-Allow-Methods"] == "GET"


async def test_an_allowed_origin_may_not_act(open_to_overlay: TestClient) -> None:
    for method in ("GET", "POST"):
        response = await open_to_overlay.request(method, "/api/0/start/win11",
                                                 headers=from_origin(OVERLAY))
        assert response.status == 403
        assert (await response.json())["code"] == "cross_site_request"
        assert "Access-Control-Allow-Origin" not in response.headers
    assert await get_json(open_to_overlay, "/api/0/state/win11") == "shut off"


async def test_other_origins_and_an_unnamed_null_are_refused(
        open_to_overlay: TestClient, client: TestClient) -> None:
    response = await open_to_overlay.get("/api/0/domains",
                                         headers=from_origin("http://evil.example"))
    assert response.status == 403
    assert "Access-Control-Allow-Origin" not in response.headers
    # null is allowed only where it was named.
    assert (await open_to_overlay.get("/api/0/domains", headers=from_origin("null"))).status \
        == 200
    assert (await client.get("/api/0/domains", headers=from_origin("null"))).status == 403


# In a real browser: a page served by another local server reads the stream.

OVERLAY_PAGE = """<!DOCTYPE html><html><body><script>
window.results = {};
const base = "WEBVIRT";
new EventSource(base + "/api/0/events").onmessage = (m) => {
  window.results.sse = JSON.parse(m.data).type;
};
const ws = new WebSocket(base.replace("http", "ws") + "/api/0/events");
ws.onmessage = (m) => { window.results.ws = JSON.parse(m.data).type; };
ws.onerror = () => { window.results.ws = "refused"; };
</script></body></html>"""


ServeOverlay = Callable[[TestClient, int], Awaitable[None]]


@pytest.fixture
async def serve_overlay() -> AsyncIterator[ServeOverlay]:
    """A second local web server on another port, serving a page that reads webvirt's stream."""
    runners: list[web.AppRunner] = []

    async def serve(client: TestClient, port: int) -> None:
        page = OVERLAY_PAGE.replace("WEBVIRT", str(client.make_url("")).rstrip("/"))

        async def overlay(_request: web.Request) -> web.Response:
            return web.Response(text=page, content_type="text/html")

        app = web.Application()
        app.router.add_get("/overlay.html", overlay)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", port).start()

    yield serve
    for runner in runners:
        await runner.cleanup()


async def results(page: Page) -> dict[str, str]:
    return dict(await page.evaluate("window.results"))


async def test_a_page_from_an_allowed_origin_reads_the_stream_in_a_browser(
        make_client: ClientFactory, page: Page, serve_overlay: ServeOverlay) -> None:
    port = free_port()
    client = await make_client(allowed_origins=(f"http://127.0.0.1:{port}",))
    await serve_overlay(client, port)
    await page.goto(f"http://127.0.0.1:{port}/overlay.html")
    await until(lambda: _both_snapshots(page), 10, "EventSource and WebSocket got the snapshot")


async def test_a_page_from_another_origin_is_refused_in_a_browser(
        make_client: ClientFactory, page: Page, serve_overlay: ServeOverlay) -> None:
    port = free_port()
    client = await make_client(allowed_origins=(f"http://127.0.0.1:{port}",))
    await serve_overlay(client, port)
    await page.goto(f"http://localhost:{port}/overlay.html")  # same server, another origin
    await until(lambda: _ws_refused(page), 10, "the WebSocket is refused")
    assert (await results(page)).get("sse") is None


@pytest.mark.parametrize("allow_null", [True, False])
async def test_a_local_file_works_only_when_null_is_allowed(
        make_client: ClientFactory, page: Page, tmp_path: Path, allow_null: bool) -> None:
    client = await make_client(allowed_origins=("null",) if allow_null else ())
    overlay = tmp_path / "overlay.html"
    overlay.write_text(OVERLAY_PAGE.replace("WEBVIRT", str(client.make_url("")).rstrip("/")))
    await page.goto(overlay.as_uri())
    if allow_null:
        await until(lambda: _both_snapshots(page), 10, "a file:// page reads the stream")
    else:
        await until(lambda: _ws_refused(page), 10, "a file:// page is refused")
        assert (await results(page)).get("sse") is None


async def _both_snapshots(page: Page) -> bool:
    return await results(page) == {"sse": "snapshot", "ws": "snapshot"}


async def _ws_refused(page: Page) -> bool:
    return (await results(page)).get("ws") == "refused"
