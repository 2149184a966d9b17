"""USB rules over HTTP (webvirt/api_rules.py), on libvirt's test driver (demo/host.xml)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import ClientFactory
from tests.test_access import FULL, READER, bearer
from tests.test_rules import BAD_BODIES
from tests.test_seed_api import get_json
from tests.waiting import next_message
from webvirt.appkeys import RULES
from webvirt.rules import Rule
from webvirt.rules_store import Change

WIN11_UUID = "6b1e5c2a-0d7e-4c55-9a52-3f1d0a9c1111"
RECEIVER = {"vendor_id": "046d", "product_id": "c52b"}


NO_BODY = object()


async def send(client: TestClient, method: str, path: str, body: Any, status: int,
               headers: dict[str, str] | None = None) -> Any:
    """`body` as JSON (None is null), or no body at all (NO_BODY); the JSON answer."""
    if body is not NO_BODY:
        headers = {"Content-Type": "application/json", **(headers or {})}
    response = await client.request(method, path, headers=headers,
                                    data=None if body is NO_BODY else json.dumps(body))
    assert response.status == status, await response.text()
    return await response.json() if status != 204 else None


async def test_create_read_replace_delete(client: TestClient) -> None:
    assert await get_json(client, "/api/0/rules") == []
    response = await client.post("/api/0/rules", json={
        "domain": "win11", "match": {"vendor_id": "0x046D", "product_id": "C52B"}})
    assert response.status == 201, await response.text()
    rule = await response.json()
    assert response.headers["Location"] == f"/api/0/rules/{rule['id']}"
    created = rule.pop("created")
    assert isinstance(created, float)
    assert rule == {"id": rule["id"], "domain": "win11", "domain_uuid": WIN11_UUID,
                    "match": RECEIVER, "enabled": True, "persistent": False}
    path = f"/api/0/rules/{rule['id']}"
    assert await get_json(client, path) == {**rule, "created": created}
    assert await get_json(client, "/api/0/rules") == [{**rule, "created": created}]

    # A whole new rule under the same id and age; the domain by UUID is kept by name.
    replaced = await send(client, "PUT", path, {
        "domain": WIN11_UUID, "match": {"port": "1-4.2"}, "enabled": False}, 200)
    assert replaced == {"id": rule["id"], "domain": "win11", "domain_uuid": WIN11_UUID,
                        "match": {"port": "1-4.2"}, "enabled": False, "persistent": False,
                        "created": created}
    assert await get_json(client, path) == replaced

    await send(client, "DELETE", path, NO_BODY, 204)
    assert (await get_json(client, path, 404))["code"] == "rule_not_found"
    assert await get_json(client, "/api/0/rules") == []
    # Ids are never given again, so a deleted rule's id cannot come to mean another rule.
    again = await send(client, "POST", "/api/0/rules", {"domain": "linux-dev",
                                                        "match": RECEIVER}, 201)
    assert again["id"] > rule["id"]


@pytest.mark.parametrize(("body", "problem"), BAD_BODIES)
@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_bad_bodies_are_400_with_the_reason(client: TestClient, method: str, body: Any,
                                                  problem: str) -> None:
    rule = await send(client, "POST", "/api/0/rules", {"domain": "win11", "match": RECEIVER},
                      201)
    path = "/api/0/rules" if method == "POST" else f"/api/0/rules/{rule['id']}"
    error = await send(client, method, path, body, 400)
    assert error == {"detail": error["detail"], "code": "bad_rule", "status": 400}
    assert problem in error["detail"]
    assert [r["match"] for r in await get_json(client, "/api/0/rules")] == [RECEIVER]


@pytest.mark.parametrize("body", [b"", b"{", b"{'domain': 'win11'}", b"\xff\xfe\x00",
                                  b"[" * 60_000])  # too deep, and under 64 KiB
async def test_a_body_that_is_not_json_is_400(client: TestClient, body: bytes) -> None:
    response = await client.post("/api/0/rules", data=body,
                                 headers={"Content-Type": "application/json"})
    assert response.status == 400
    error = await response.json()
    assert error["code"] == "bad_json"
    assert error["detail"].startswith("the body is not JSON")


async def test_a_body_not_sent_as_json_is_415(client: TestClient) -> None:
    # A form (what a cross-site page can send without asking first) is never read as a rule.
    body = json.dumps({"domain": "win11", "match": RECEIVER})
    response = await client.post("/api/0/rules", data=body,
                                 headers={"Content-Type": "text/plain"})
    assert response.status == 415
    assert "Content-Type: application/json" in (await response.json())["detail"]
    assert await get_json(client, "/api/0/rules") == []


@pytest.mark.parametrize("rule_id", ["abc", "-1", "1.5", "1e3", "\u0661", "1" * 19])
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_bad_rule_ids_are_400(client: TestClient, method: str, rule_id: str) -> None:
    body = {"domain": "win11", "match": RECEIVER} if method == "PUT" else NO_BODY
    error = await send(client, method, f"/api/0/rules/{rule_id}", body, 400)
    assert error["detail"] == "bad path parameter: id: must be a rule id"


async def test_an_unknown_domain_is_404(client: TestClient) -> None:
    body = {"domain": "win10", "match": RECEIVER}
    assert (await send(client, "POST", "/api/0/rules", body, 404))["code"] == "domain_not_found"
    rule = await send(client, "POST", "/api/0/rules", {**body, "domain": "win11"}, 201)
    error = await send(client, "PUT", f"/api/0/rules/{rule['id']}", body, 404)
    assert error["code"] == "domain_not_found"
    assert await get_json(client, "/api/0/rules") == [rule]


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_an_unknown_rule_is_404(client: TestClient, method: str) -> None:
    body = {"domain": "win11", "match": RECEIVER} if method == "PUT" else NO_BODY
    error = await send(client, method, "/api/0/rules/42", body, 404)
    assert error == {"detail": "no rule with id 42", "code": "rule_not_found", "status": 404}


async def test_a_read_token_lists_rules_but_cannot_change_them(
        make_client: ClientFactory) -> None:
    client = await make_client(token=FULL, read_tokens=(READER,))
    body = {"domain": "win11", "match": RECEIVER}
    rule = await send(client, "POST", "/api/0/rules", body, 201, bearer(FULL))
    path = f"/api/0/rules/{rule['id']}"
    assert await get_json(client, "/api/0/rules", headers=bearer(READER)) == [rule]
    assert await get_json(client, path, headers=bearer(READER)) == rule
    for method, target in (("POST", "/api/0/rules"), ("PUT", path), ("DELETE", path)):
        error = await send(client, method, target, body, 403, bearer(READER))
        assert error["code"] == "read_only_token"
    await send(client, "POST", "/api/0/rules", body, 401)
    assert await get_json(client, "/api/0/rules", headers=bearer(FULL)) == [rule]


async def test_changes_reach_listeners_and_event_clients(client: TestClient) -> None:
    heard: list[tuple[Change, int]] = []

    def listener(change: Change, rule: Rule) -> None:
        heard.append((change, rule.id))

    client.app[RULES].listeners.append(listener)
    async with client.ws_connect("/api/0/events?type=device&domain=win11") as ws:
        await next_message(ws, lambda m: m["type"] == "snapshot")
        rule = await send(client, "POST", "/api/0/rules", {"domain": "win11", "match": RECEIVER},
                          201)
        path = f"/api/0/rules/{rule['id']}"
        await send(client, "PUT", path, {"domain": "win11", "match": {"port": "1-4"}}, 200)
        await send(client, "DELETE", path, NO_BODY, 204)
        for change in ("added", "updated", "deleted"):
            event = await next_message(ws, lambda m: m["type"] == "rule-changed")
            assert (event["change"], event["rule"], event["domain"]) == (
                change, rule["id"], "win11")
    assert heard == [("added", rule["id"]), ("updated", rule["id"]), ("deleted", rule["id"])]


async def test_fifty_rules_at_once_all_land_with_their_own_ids(client: TestClient) -> None:
    async def create(n: int) -> Any:
        return await send(client, "POST", "/api/0/rules", {
            "domain": "win11", "match": {"vendor_id": "046d", "product_id": f"{n:04x}"}}, 201)

    rules = await asyncio.gather(*(create(n) for n in range(50)))
    assert len({r["id"] for r in rules}) == 50
    kept = await get_json(client, "/api/0/rules")
    assert sorted(r["match"]["product_id"] for r in kept) == [f"{n:04x}" for n in range(50)]


async def test_rules_outlive_a_restart(make_client: ClientFactory, tmp_path: Path) -> None:
    state = tmp_path / "kept"
    first = await make_client(state_dir=state)
    rule = await send(first, "POST", "/api/0/rules", {
        "domain": "win11", "match": {**RECEIVER, "serial": "ABC"}, "enabled": False}, 201)
    await first.close()
    second = await make_client(state_dir=state)
    assert await get_json(second, "/api/0/rules") == [rule]


async def test_the_state_folder_is_made_private(make_client: ClientFactory,
                                                tmp_path: Path) -> None:
    state = tmp_path / "new" / "state"
    await make_client(state_dir=state)
    assert state.stat().st_mode & 0o777 == 0o700
    assert (state / "rules.sqlite3").is_file()


async def test_the_spec_documents_the_rules(client: TestClient) -> None:
    spec = await get_json(client, "/api/0/openapi.json")
    assert set(spec["paths"]["/api/0/rules"]) == {"get", "post"}
    assert set(spec["paths"]["/api/0/rules/{id}"]) == {"get", "put", "delete"}
    body = spec["paths"]["/api/0/rules"]["post"]["requestBody"]
    assert body["required"] is True
    ref = body["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    match = spec["components"]["schemas"][ref]["properties"]["match"]
    assert [shape["required"] for shape in match["oneOf"]] == [
        ["vendor_id", "product_id"], ["port"]]
    assert {"201", "400", "404", "415"} <= set(spec["paths"]["/api/0/rules"]["post"]["responses"])
