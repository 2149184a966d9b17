"""OpenAPI spec (aiohttp-apigami), Swagger UI at /docs and ReDoc at /redoc, all served locally."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp_apigami import setup_aiohttp_apispec
from aiohttp_apigami.constants import SWAGGER_DICT

from webvirt import __version__

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
    _finish_spec(app[SWAGGER_DICT])
    page = REDOC_PAGE.format(spec_url=SPEC_URL)

    async def redoc(_request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    app.router.add_get("/redoc", redoc, allow_head=False)


def _finish_spec(spec: dict[str, Any]) -> None:
    # apigami's @docs adds Swagger 2's "produces" to every operation; OpenAPI 3 forbids it.
    for path_item in spec.get("paths", {}).values():
        for operation in path_item.values():
            if isinstance(operation, dict):
                operation.pop("produces", None)
    # The token is optional: only a server started with --token asks for it.
    spec.setdefault("components", {})["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer",
                   "description": "The --token / WEBVIRT_TOKEN value, if the server has one"},
        "token": {"type": "apiKey", "in": "query", "name": "token"},
    }
    spec["security"] = [{}, {"bearer": []}, {"token": []}]
