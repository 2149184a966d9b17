"""LAN safety: token, cross-site refusal, Host names (DNS rebinding)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import ClientFactory
from tests.test_seed_api import get_json
from tests.waiting import until
from webvirt.security import FQDN_TIMEOUT_S, Guard

TOKEN = "s3cret-token"


@pytest.fixture
async def token_client(make_client: ClientFactory) -> TestClient:
    return await make_client(token=TOKEN)


async def test_token_is_required(token_client: TestClient) -> None:
    response = await token_client.get("/api/0/shutdown/linux-dev")
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await response.json())["code"] == "unauthorized"
    response = await token_client.get("/api/0/shutdown/linux-dev",
                                      headers={"Authorization": "Bearer wrong"})
    assert response.status == 401
    response = await token_client.get("/api/0/state/linux-dev?token=wrong")
    assert response.status == 401
    assert await get_json(token_client, f"/api/0/state/linux-dev?token={TOKEN}") == "running"


async def test_bearer_token(token_client: TestClient) -> None:
    response = await token_client.get("/api/0/shutdown/linux-dev",
                                      headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status == 200
    assert await response.json() == "shutting down"


async def test_token_guards_the_event_stream(token_client: TestClient) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await token_client.ws_connect("/api/0/events")
    assert caught.value.status == 401
    async with token_client.ws_connect(f"/api/0/events?token={TOKEN}") as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "snapshot"
    response = await token_client.get("/api/0/events", headers={"Accept": "text/event-stream"})
    assert response.status == 401
    response = await token_client.get("/api/0/events", headers={
        "Accept": "text/event-stream", "Authorization": f"Bearer {TOKEN}"})
    assert response.status == 200
    response.close()


async def test_docs_need_no_token(token_client: TestClient) -> None:
    for path in ("/docs", "/redoc", "/api/0/openapi.json", "/static/vendor/redoc.standalone.js"):
        assert (await token_client.get(path)).status == 200, path


@pytest.mark.parametrize("headers", [
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},
    {"Origin": "http://evil.example"},
    {"Origin": "null"},
])
async def test_cross_site_requests_change_nothing(client: TestClient, headers: dict) -> None:
    response = await client.get("/api/0/shutdown/linux-dev", headers=headers)
    assert response.status == 403
    assert (await response.json())["code"] == "cross_site_request"
    assert await get_json(client, "/api/0/state/linux-dev") == "running"


async def test_same_origin_browser_requests_work(client: TestClient) -> None:
    origin = f"http://{client.host}:{client.port}"
    response = await client.get("/api/0/shutdown/linux-dev", headers={
        "Sec-Fetch-Site": "same-origin", "Origin": origin})
    assert response.status == 200
    response = await client.get("/api/0/state/linux-dev", headers={"Sec-Fetch-Site": "none"})
    assert response.status == 200  # typed into the address bar


async def test_cross_site_websocket_is_refused(client: TestClient) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await client.ws_connect("/api/0/events", origin="http://evil.example")
    assert caught.value.status == 403


@pytest.mark.parametrize("host", ["evil.example", "evil.example:5000", "rebind.attacker.net"])
async def test_unknown_host_names_are_refused(client: TestClient, host: str) -> None:
    response = await client.get("/api/0/shutdown/linux-dev", headers={"Host": host})
    assert response.status == 403
    assert (await response.json())["code"] == "host_not_allowed"
    assert await get_json(client, "/api/0/state/linux-dev") == "running"


@pytest.mark.parametrize("host", ["localhost:5000", "127.0.0.1", "192.168.1.20:5000",
                                  "[::1]:5000", "[fe80::1]"])
async def test_ip_addresses_and_localhost_are_allowed(client: TestClient, host: str) -> None:
    response = await client.get("/api/0/version", headers={"Host": host})
    assert response.status == 200


async def test_allow_host(make_client: ClientFactory) -> None:
    client = await make_client(allowed_hosts=("vmhost.lan",))
    assert (await client.get("/api/0/version", headers={"Host": "vmhost.lan:5000"})).status == 200
    assert (await client.get("/api/0/version", headers={"Host": "other.lan"})).status == 403


async def test_host_equal_to_this_machines_fqdn_is_allowed(
        make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda: "VMHOST.Example.org")
    client = await make_client()
    headers = {"Host": "vmhost.example.org:5000"}
    assert (await client.get("/api/0/version", headers=headers)).status == 200
    assert (await client.get("/api/0/version", headers={"Host": "other.example.org"})).status \
        == 403


async def test_start_up_and_requests_do_not_wait_for_a_hung_dns(
        make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float] = []
    dns_answers = threading.Event()

    def hung_getfqdn() -> str:  # like getfqdn() with a DNS server that does not answer
        calls.append(time.monotonic())
        dns_answers.wait(timeout=30)
        return "slow.example.org"

    monkeypatch.setattr(socket, "getfqdn", hung_getfqdn)
    try:
        client = await make_client()
        assert calls == []
        assert (await client.get("/api/0/version")).status == 200
        assert calls == []  # known names never ask DNS
        started = time.monotonic()
        refused = await client.get("/api/0/version", headers={"Host": "slow.example.org"})
        assert refused.status == 403
        assert time.monotonic() - started < FQDN_TIMEOUT_S + 1
        # The time budget is spent: later requests do not wait again, nor ask again.
        started = time.monotonic()
        refused = await client.get("/api/0/version", headers={"Host": "slow.example.org"})
        assert refused.status == 403
        assert time.monotonic() - started < 1
        assert len(calls) == 1
    finally:
        dns_answers.set()
    # Once DNS answers, the name is allowed.
    async def allowed() -> bool:
        response = await client.get("/api/0/version", headers={"Host": "slow.example.org"})
        return response.status == 200

    await until(allowed, 10, "the name is allowed once DNS answers")
    assert len(calls) == 1


@pytest.mark.parametrize("path", ["/", "/static/app.js", "/docs", "/redoc",
                                  "/static/vendor/redoc.standalone.js"])
async def test_pages_forbid_framing(client: TestClient, path: str) -> None:
    response = await client.get(path)
    assert response.status == 200
    assert response.headers["X-Frame-Options"] == "DENY"
    policy = [d.strip() for d in response.headers["Content-Security-Policy"].split(";")]
    assert {"frame-ancestors 'none'", "default-src 'none'"} <= set(policy)
    assert response.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize(("path", "headers", "status"), [
    ("/api/0/version", {}, 200),
    ("/api/0/state/nope", {}, 404),
    ("/api/0/start/win11", {"Origin": "http://evil.example"}, 403),
    ("/api/0/openapi.json", {}, 200),
])
async def test_api_answers_are_never_sniffed(client: TestClient, path: str, headers: dict,
                                             status: int) -> None:
    response = await client.get(path, headers=headers)
    assert response.status == status
    assert response.content_type == "application/json"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


# Hostile input never gets a 500, and every error, whichever layer refuses it, is JSON.


async def raw_get(client: TestClient, target: str, *headers: bytes) -> tuple[int, dict]:
    """GET over a plain socket, for bytes an HTTP client library would refuse to send."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(b"\r\n".join([f"GET {target} HTTP/1.1".encode(), b"Host: localhost",
                                    *headers, b"Connection: close", b"", b""]))
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"application/json" in head, answer
    return int(head.split()[1]), json.loads(body)


def assert_error_body(body: dict, status: int, code: str) -> None:
    assert body == {"detail": body["detail"], "code": code, "status": status}


@pytest.mark.parametrize("path", [
    "/api/0/state/win%0011", "/api/0/start/win%0011", "/api/0/shutdown/%00",
    "/api/0/devices/win11%00", "/api/0/attach/win%0011/usb?vendor_id=1&product_id=2",
])
async def test_nul_in_the_domain_name_is_a_json_400(client: TestClient, path: str) -> None:
    response = await client.get(path)
    assert response.status == 400
    body = await response.json()
    assert_error_body(body, 400, "bad_parameter")
    assert "domain" in body["detail"]
    assert await get_json(client, "/api/0/state/win11") == "shut off"


async def test_non_utf8_authorization_header_is_a_json_401(make_client: ClientFactory) -> None:
    client = await make_client(token=TOKEN)
    status, body = await raw_get(client, "/api/0/state/win11", b"Authorization: Bearer \xff\xfe")
    assert status == 401
    assert_error_body(body, 401, "unauthorized")


async def test_malformed_origin_is_a_json_403(client: TestClient) -> None:
    status, body = await raw_get(client, "/api/0/start/win11", b"Origin: http://[::1")
    assert status == 403
    assert_error_body(body, 403, "cross_site_request")
    assert await get_json(client, "/api/0/state/win11") == "shut off"


async def test_a_bug_in_the_guard_still_answers_json(
        make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object) -> None:
        raise RuntimeError("a bug in the guard")

    monkeypatch.setattr(Guard, "cross_site", broken)
    client = await make_client()
    status, body = await raw_get(client, "/api/0/version")
    assert status == 500
    assert_error_body(body, 500, "internal_error")
