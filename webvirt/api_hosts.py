"""GET /api/0/hosts: the libvirt hosts webvirt manages, and whether each is connected."""

from __future__ import annotations

from aiohttp import web
from aiohttp_apigami import docs

from webvirt.appkeys import HOSTS
from webvirt.schemas import HostInfo


@docs(
    tags=["host"],
    summary="List libvirt hosts",
    description="Every host (one per --connect) with its name, URI, whether it is connected "
    "now, and the libvirt and hypervisor versions read when it last connected. Answered from "
    "what webvirt knows: no libvirt call, so a frozen host delays nothing.",
    responses={200: {"description": "Hosts, in --connect order",
                     "schema": HostInfo(many=True)}},
)
async def list_hosts(request: web.Request) -> web.Response:
    return web.json_response([{"name": host.name, "uri": host.uri, "connected": host.connected,
                               **host.versions} for host in request.app[HOSTS]])
