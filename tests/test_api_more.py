"""The API beyond the seed, on libvirt's test driver (demo/host.xml)."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient

from tests.test_seed_api import get_json
from webvirt.appkeys import HOST


async def test_list_domains(client: TestClient) -> None:
    listing = await get_json(client, "/api/0/domains")
    assert [d["name"] for d in listing] == ["linux-dev", "media-server", "win11"]
    win11 = listing[2]
    assert win11 == {"name": "win11", "uuid": "6b1e5c2a-0d7e-4c55-9a52-3f1d0a9c1111",
                     "state": "shutoff", "vcpus": 8, "memory_kib": 16 * 1024 * 1024,
                     "autostart": False, "persistent": True}


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_power_cycle(client: TestClient, method: str) -> None:
    async def act(action: str, domain: str = "linux-dev") -> object:
        response = await client.request(method, f"/api/0/{action}/{domain}")
        assert response.status == 200, await response.text()
        return await response.json()

    assert await act("suspend") == "paused"
    assert await act("suspend") == "already paused"
    assert await get_json(client, "/api/0/state/linux-dev") == "paused by user"
    assert await act("resume") == "resumed"
    assert await act("resume") == "already running"
    assert await act("reboot") == "rebooting"
    assert await act("reset") == "reset"
    assert await act("destroy") == "forced off"
    assert await act("destroy") == "not running"
    assert await get_json(client, "/api/0/state/linux-dev") == "shut off"
    assert await act("start") == "starting"


@pytest.mark.parametrize("action", ["reboot", "reset", "suspend"])
async def test_actions_on_a_shut_off_domain_are_409(client: TestClient, action: str) -> None:
    body = await get_json(client, f"/api/0/{action}/win11", 409)
    assert "not running" in body["detail"]


async def test_resume_of_a_shut_off_domain_is_409(client: TestClient) -> None:
    body = await get_json(client, "/api/0/resume/win11", 409)
    assert "not paused" in body["detail"] or "not running" in body["detail"]


async def test_shutdown_and_wait(client: TestClient) -> None:
    # The test driver shuts down at once and says so with a lifecycle event.
    assert await get_json(client, "/api/0/shutdown/linux-dev?wait=1&timeout=5") == "shut off"
    assert await get_json(client, "/api/0/shutdown/linux-dev?wait=1") == "not running"


async def test_reboot_wait_says_when_no_reboot_was_seen(client: TestClient) -> None:
    # The test driver emits no reboot event, so the wait runs out.
    assert await get_json(client, "/api/0/reboot/linux-dev?wait=1&timeout=0.2") == "rebooting"


@pytest.mark.parametrize("query", ["timeout=abc", "timeout=-1", "timeout=99999", "force=perhaps"])
async def test_bad_shutdown_parameters_are_400(client: TestClient, query: str) -> None:
    body = await get_json(client, f"/api/0/shutdown/linux-dev?{query}", 400)
    assert body["code"] == "bad_parameter"
    assert await get_json(client, "/api/0/state/linux-dev") == "running"  # nothing was done


async def test_templates(client: TestClient, devices_dir) -> None:
    (devices_dir / "clash.xml").write_text("<a v='$TOKEN'/>")
    listing = {t["name"]: t for t in await get_json(client, "/api/0/templates")}
    assert listing["usb"] == {"name": "usb", "variables": ["vendor_id", "product_id"]}
    assert listing["usb_tablet"]["variables"] == []
    assert listing["pci_with_rom"]["variables"] == [
        "domain", "bus", "slot", "function", "arbitrary_variable_name"]
    assert "reserved" in listing["clash"]["error"]


async def test_domain_devices(client: TestClient) -> None:
    devices = await get_json(client, "/api/0/devices/win11")
    assert devices == [{"type": "pci", "mode": "subsystem", "alias": None,
                        "address": "0000:0f:00.0"}]
    assert await get_json(client, "/api/0/devices/linux-dev") == []
    await get_json(client, "/api/0/devices/nope", 404)


async def test_host_inventory(client: TestClient) -> None:
    devices = {d["name"]: d for d in await get_json(client, "/api/0/host/devices")}
    gpu = devices["pci_0000_0f_00_0"]
    assert gpu == {"name": "pci_0000_0f_00_0", "type": "pci", "vendor_id": "10de",
                   "vendor": "NVIDIA Corporation", "product_id": "1b06",
                   "product": "GP102 [GeForce GTX 1080 Ti]", "address": "0000:0f:00.0",
                   "iommu_group": 14, "held_by": [], "configured_in": ["win11"]}
    assert devices["pci_0000_0f_00_1"]["configured_in"] == []
    receiver = devices["usb_1_4"]
    assert (receiver["vendor_id"], receiver["product_id"], receiver["address"]) == (
        "046d", "c52b", "1:4")
    assert receiver["product"] == "Unifying Receiver"
    assert receiver["port"] is None  # the test driver's devices have no sysfs path

    # Running, win11 holds its GPU.
    assert await get_json(client, "/api/0/start/win11") == "starting"
    devices = {d["name"]: d for d in await get_json(client, "/api/0/host/devices")}
    assert devices["pci_0000_0f_00_0"]["held_by"] == ["win11"]
    assert devices["pci_0000_0f_00_1"]["held_by"] == []


async def test_toggle_is_501_on_the_test_driver(client: TestClient) -> None:
    body = await get_json(client, "/api/0/toggle/linux-dev/usb_tablet", 501)
    assert body["code"] == "not_supported"


async def test_a_second_action_while_one_runs_is_409(client: TestClient) -> None:
    host = client.app[HOST]
    win11 = await host.resolve("win11")
    with host.exclusive(win11):
        body = await get_json(client, "/api/0/start/win11", 409)
        assert body["code"] == "operation_in_progress"
        # The same domain addressed by its UUID is the same domain, under the same lock.
        body = await get_json(client, f"/api/0/start/{win11.uuid}", 409)
        assert body["code"] == "operation_in_progress"
        body = await get_json(client, f"/api/0/attach/{win11.uuid.upper()}/usb_tablet", 409)
        assert body["code"] == "operation_in_progress"
    # Force off is never locked out.
    assert await get_json(client, "/api/0/destroy/linux-dev") == "forced off"
