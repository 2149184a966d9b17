"""The OpenAPI spec is valid OpenAPI 3 and the docs pages work with no internet."""

from __future__ import annotations

import re

from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate
from playwright.async_api import Page, expect

from tests.conftest import ClientFactory, blocked_by_csp

SEED_PATHS = {
    "/api/0/state/{domain}", "/api/0/start/{domain}", "/api/0/shutdown/{domain}",
    "/api/0/attach/{domain}/{xml_name}", "/api/0/detach/{domain}/{xml_name}", "/api/0/version",
}


async def fetch_spec(client: TestClient) -> dict:
    response = await client.get("/api/0/openapi.json")
    assert response.status == 200
    return await response.json()


async def test_spec_is_valid_openapi_3(client: TestClient) -> None:
    spec = await fetch_spec(client)
    assert spec["openapi"] == "3.0.3"
    validate(spec)


async def test_spec_documents_the_seed_endpoints(client: TestClient) -> None:
    spec = await fetch_spec(client)
    assert SEED_PATHS <= set(spec["paths"])
    for path in SEED_PATHS:
        # GET as in the seed; actions may add POST; never a duplicate HEAD operation.
        assert "get" in spec["paths"][path], path
        assert set(spec["paths"][path]) <= {"get", "post"}, path


async def test_every_operation_declares_responses(client: TestClient) -> None:
    spec = await fetch_spec(client)
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            assert any(status in operation["responses"] for status in ("200", "201", "204",
                                                                       "101")), (path, method)
            assert operation.get("summary"), (path, method)


async def test_spec_says_what_the_guard_answers(make_client: ClientFactory) -> None:
    open_spec = await fetch_spec(await make_client())
    assert {} in open_spec["security"]  # no token: auth optional
    spec = await fetch_spec(await make_client(token="s3cret"))
    assert spec["security"] == [{"bearer": []}, {"token": []}]
    validate(spec)
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            assert {"401", "403"} <= set(operation["responses"]), (path, method)
            if "{" in path:
                assert "400" in operation["responses"], (path, method)


def external_urls(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)=["'](https?://[^"']+)""", html)


async def assets_of(client: TestClient, page: str) -> list[str]:
    response = await client.get(page)
    assert response.status == 200
    html = await response.text()
    assert external_urls(html) == []
    return re.findall(r"""(?:src|href)=["']([^"'#]+)""", html)


async def test_swagger_ui_is_served_locally(client: TestClient) -> None:
    assets = await assets_of(client, "/docs")
    assert any(a.endswith("swagger-ui-bundle.js") for a in assets)
    for asset in assets:
        assert (await client.get(asset)).status == 200, asset


async def test_redoc_is_served_locally(client: TestClient) -> None:
    assets = await assets_of(client, "/redoc")
    assert "/static/vendor/redoc.standalone.js" in assets
    response = await client.get("/static/vendor/redoc.standalone.js")
    assert response.status == 200
    assert len(await response.read()) > 500_000
    html = await (await client.get("/redoc")).text()
    assert 'spec-url="/api/0/openapi.json"' in html


async def test_swagger_ui_works_under_its_content_security_policy(
        client: TestClient, page: Page) -> None:
    response = await page.goto(str(client.make_url("/docs")))
    assert response is not None
    assert "'sha256-" in response.headers["content-security-policy"]  # its inline script
    version = page.locator(".opblock", has_text="/api/0/version")
    await version.locator(".opblock-summary").click()
    await version.get_by_role("button", name="Try it out").click()
    await version.get_by_role("button", name="Execute").click()
    await expect(version.locator(".live-responses-table td.response-col_status")).to_have_text(
        ["Code", "200"])
    assert await blocked_by_csp(page) == []


async def test_redoc_works_under_its_content_security_policy(
        client: TestClient, page: Page) -> None:
    await page.goto(str(client.make_url("/redoc")))
    await expect(page.get_by_role("heading", name="Get domain state")).to_be_visible()
    # Its search runs in a worker made from a blob.
    await page.get_by_placeholder("Search...").fill("domain state")
    await expect(page.locator("[role=search]").get_by_text("Get domain state")).to_be_visible()
    assert await blocked_by_csp(page) == []
