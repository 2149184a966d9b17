"""About the server itself."""

from __future__ import annotations

from aiohttp import web
from aiohttp_apigami import docs

from webvirt import __version__

routes = web.RouteTableDef()


@routes.get("/api/0/version", allow_head=False)
@docs(
    tags=["server"],
    summary="Get API version",
    description="The server version (semantic versioning).",
    responses={200: {"description": "Version", "schema": {"type": "string"}}},
)
async def version(request: web.Request) -> web.Response:
    return web.json_response(__version__)
