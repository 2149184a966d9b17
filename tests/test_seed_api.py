"""The seed's endpoints on libvirt's test driver (a fresh copy of demo/host.xml per test)."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from webvirt import __version__


async def get_json(client: TestClient, path: str, status: int = 200,
                   headers: dict[str, str] | None = None) -> Any:
    response = await client.get(path, headers=headers)
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    return await response.json()


async def test_state_uses_the_seed_texts(client: TestClient) -> None:
    assert await get_json(client, "/api/0/state/linux-dev") == "running"
    assert await get_json(client, "/api/0/state/win11") == "shut off"
    assert await get_json(client, "/api/0/state/media-server") == "paused by user"


async def test_state_by_uuid(client: TestClient) -> None:
    uuid = "6b1e5c2a-0d7e-4c55-9a52-3f1d0a9c1111"
    assert await get_json(client, f"/api/0/state/{uuid}") == "shut off"


async def test_start_boots_a_shut_off_domain_once(client: TestClient) -> None:
    assert await get_json(client, "/api/0/start/win11") == "starting"
    assert await get_json(client, "/api/0/state/win11") == "running"
    assert await get_json(client, "/api/0/start/win11") == "already running"


async def test_start_of_a_paused_domain_is_a_conflict(client: TestClient) -> None:
    body = await get_json(client, "/api/0/start/media-server", 409)
    # libvirt's own words; the test driver files this under "internal error", QEMU under
    # "operation invalid": both are a refusal, so both are 409.
    assert "already running" in body["detail"]
    assert await get_json(client, "/api/0/state/media-server") == "paused by user"


async def test_shutdown(client: TestClient) -> None:
    assert await get_json(client, "/api/0/shutdown/linux-dev") == "shutting down"
    # The test driver has no guest to wait for: shutdown is immediate.
    assert await get_json(client, "/api/0/state/linux-dev") == "shut off"
    assert await get_json(client, "/api/0/shutdown/linux-dev") == "not running"


@pytest.mark.parametrize("action", ["state", "start", "shutdown"])
async def test_unknown_domain_is_404(client: TestClient, action: str) -> None:
    body = await get_json(client, f"/api/0/{action}/no-such-vm", 404)
    assert body == {"detail": "no domain named 'no-such-vm'", "code": "domain_not_found",
                    "status": 404}


async def test_version(client: TestClient) -> None:
    assert await get_json(client, "/api/0/version") == __version__


async def test_attach_is_501_on_the_test_driver(client: TestClient) -> None:
    body = await get_json(client, "/api/0/attach/linux-dev/usb?vendor_id=046d&product_id=c52b",
                          501)
    assert body["code"] == "not_supported"
    assert "virDomainAttachDeviceFlags" in body["detail"]


async def test_detach_is_501_on_the_test_driver(client: TestClient) -> None:
    body = await get_json(client, "/api/0/detach/linux-dev/usb?vendor_id=046d&product_id=c52b",
                          501)
    assert body["code"] == "not_supported"


async def test_attach_checks_template_and_variables_before_libvirt(client: TestClient) -> None:
    body = await get_json(client, "/api/0/attach/linux-dev/nope", 404)
    assert body["code"] == "template_not_found"
    body = await get_json(client, "/api/0/attach/linux-dev/usb?vendor_id=046d", 400)
    assert body["code"] == "missing_variable"
    assert "product_id" in body["detail"]


async def test_attach_to_unknown_domain_is_404(client: TestClient) -> None:
    body = await get_json(client, "/api/0/attach/nope/usb?vendor_id=1&product_id=2", 404)
    assert body["code"] == "domain_not_found"


async def test_bad_flag_value_is_400(client: TestClient) -> None:
    body = await get_json(client, "/api/0/attach/linux-dev/usb?vendor_id=1&product_id=2&live=maybe",
                          400)
    assert body["code"] == "bad_parameter"
    assert "live" in body["detail"]


async def test_unknown_path_is_json_404(client: TestClient) -> None:
    body = await get_json(client, "/api/0/nothing-here", 404)
    assert body["code"] == "not_found"


async def test_wrong_method_is_json_405(client: TestClient) -> None:
    response = await client.post("/api/0/version")
    assert response.status == 405
    assert (await response.json())["code"] == "method_not_allowed"
    assert response.headers["Allow"] == "GET"
