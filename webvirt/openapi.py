"""OpenAPI spec (aiohttp-apigami), Swagger UI at /docs and ReDoc at /redoc, all served locally."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp_apigami import setup_aiohttp_apispec
from aiohttp_apigami.constants import SWAGGER_DICT

from webvirt import __version__
from webvirt.appkeys import SETTINGS
from webvirt.config import Settings

SPEC_URL = "/api/0/openapi.json"
REDOC_PAGE = """<!DOCTYPE html>
<html>
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>webvirt API (ReDoc)</title>
</head>
<body>
  <redoc spec-url="{spec_url}"></redoc>
  <script src="/static/vendor/redoc.standalone.js"></script>
</body>
</html>
"""


def setup_openapi(app: web.Application) -> None:
    """Call after every route is added: the spec is built from the routes right away."""
    setup_aiohttp_apispec(
        app,
        title="webvirt",
        version=__version__,
        info={"description": "A REST-inspired API for managing libvirt virtual machines"},
        url=SPEC_URL,
        swagger_path="/docs",
        static_path="/static/swagger",
        openapi_version="3.0.3",
        in_place=True,
    )
    _finish_spec(app[SWAGGER_DICT], app[SETTINGS])
    page = REDOC_PAGE.format(spec_url=SPEC_URL)

    async def redoc(_request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    app.router.add_get("/redoc", redoc, allow_head=False)


def _finish_spec(spec: dict[str, Any], settings: Settings) -> None:
    # apigami's @docs adds Swagger 2's "produces" to every operation; OpenAPI 3 forbids it.
    for path, path_item in spec.get("paths", {}).items():
        for operation in path_item.values():
            if isinstance(operation, dict):
                operation.pop("produces", None)
                _add_common_errors(path, operation, token=bool(settings.token))
    spec.setdefault("components", {})["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer",
                   "description": "The --token / WEBVIRT_TOKEN value, if the server has one"},
        "token": {"type": "apiKey", "in": "query", "name": "token"},
    }
    # The token is optional: only a server started with --token asks for it (and says so).
    spec["security"] = [{"bearer": []}, {"token": []}]
    if not settings.token:
        spec["security"].insert(0, {})


def _add_common_errors(path: str, operation: dict[str, Any], *, token: bool) -> None:
    """Errors any operation can answer, before its handler runs: the guard (security.py) and the
    path parameter check (schemas.check_path, from the Guard)."""

    def error(description: str) -> dict[str, Any]:
        schema = {"$ref": "#/components/schemas/Error"}
        return {"description": description, "content": {"application/json": {"schema": schema}}}

    responses = operation.setdefault("responses", {})
    if "{" in path:
        responses.setdefault("400", error("Bad or missing parameter"))
    responses.setdefault("403", error("Refused: a Host name not allowed, or a cross-site request"))
    if token:
        responses.setdefault("401", error("A valid token is required"))
