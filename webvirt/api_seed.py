"""The seed's endpoints, same paths and answers: state, start, shutdown, attach, detach, version."""

from __future__ import annotations

import logging
from functools import partial

from aiohttp import web
from aiohttp_apigami import docs, match_info_schema, querystring_schema

from webvirt import __version__, domains
from webvirt.appkeys import DOMAIN_LOCKS, EVENT_HUB, HYPERVISOR, TEMPLATES
from webvirt.errors import ApiError
from webvirt.schemas import (
    DeviceQuery,
    DeviceResult,
    DomainPath,
    TemplatePath,
    error_responses,
    parse_query,
    string_enum,
)

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

SEED_STATES = string_enum(*domains.SEED_STATE_TEXT.values())


@routes.get("/api/0/state/{domain}", allow_head=False)
@docs(
    tags=["domains"],
    summary="Get domain state",
    description="The domain state as the seed's text, e.g. \"running\" or \"shut off\" "
    "(see libvirt's virDomainState).",
    responses={200: {"description": "State text", "schema": SEED_STATES},
               **error_responses(404, 503, 504)},
)
@match_info_schema(DomainPath)
async def get_state(request: web.Request) -> web.Response:
    name = request.match_info["domain"]
    code = await request.app[HYPERVISOR].call(partial(domains.state, name=name))
    return web.json_response(domains.SEED_STATE_TEXT.get(code, ""))


@routes.get("/api/0/start/{domain}", allow_head=False)
@docs(
    tags=["domains"],
    summary="Start domain",
    description="Boots a shut-off domain; answers \"already running\" if it runs.",
    responses={200: {"description": "What happened",
                     "schema": string_enum("starting", "already running")},
               **error_responses(404, 409, 503, 504)},
)
@match_info_schema(DomainPath)
async def start(request: web.Request) -> web.Response:
    name = request.match_info["domain"]
    with request.app[DOMAIN_LOCKS].hold(name):
        result = await request.app[HYPERVISOR].call(partial(domains.start, name=name))
    log.info("start %s: %s", name, result)
    return web.json_response(result)


@routes.get("/api/0/shutdown/{domain}", allow_head=False)
@docs(
    tags=["domains"],
    summary="Shutdown domain",
    description="Asks the guest to shut down (ACPI); answers \"not running\" if it is not.",
    responses={200: {"description": "What happened",
                     "schema": string_enum("shutting down", "not running")},
               **error_responses(404, 409, 503, 504)},
)
@match_info_schema(DomainPath)
async def shutdown(request: web.Request) -> web.Response:
    name = request.match_info["domain"]
    with request.app[DOMAIN_LOCKS].hold(name):
        result = await request.app[HYPERVISOR].call(partial(domains.shutdown, name=name))
    log.info("shutdown %s: %s", name, result)
    return web.json_response(result)


DEVICE_DESCRIPTION = (
    "Fills devices/{xml_name}.xml: every $UPPER_CASE variable takes the value of the query "
    "parameter of the same name, case-insensitively (vendor_id fills $VENDOR_ID). Values are "
    "XML-escaped. `live` and `persistent` are reserved: they choose what is changed."
)


async def change_device(request: web.Request, action: str) -> web.Response:
    name = request.match_info["domain"]
    template = request.app[TEMPLATES].load(request.match_info["xml_name"])
    query = parse_query(request, DeviceQuery)
    xml, variables = template.render(request.query)
    flags = domains.device_flags(live=bool(query["live"]), persistent=bool(query["persistent"]))
    operation = domains.attach if action == "attached" else domains.detach
    parameters = {k.lower(): v for k, v in variables.items()}
    # Tell event clients which template did it: libvirt's own events only name an alias.
    event = {"domain": name, "template": template.name, "variables": parameters}
    hub = request.app[EVENT_HUB]
    try:
        with request.app[DOMAIN_LOCKS].hold(name):
            await request.app[HYPERVISOR].call(
                partial(operation, name=name, xml=xml, flags=flags))
    except ApiError as err:
        hub.publish(action.removesuffix("ed"), **event, result="error", error=err.detail)
        raise
    hub.publish(action.removesuffix("ed"), **event, result="ok")
    log.info("%s %s on %s %s", action, template.name, name, parameters)
    return web.json_response({
        "device": action, "xml": xml, "domain": name, "template": template.name,
        "variables": parameters,
    })


@routes.get("/api/0/attach/{domain}/{xml_name}", allow_head=False)
@docs(
    tags=["devices"],
    summary="Attach host device",
    description=DEVICE_DESCRIPTION,
    responses={200: {"description": "Attached", "schema": DeviceResult},
               **error_responses(400, 403, 404, 409, 422, 501, 503, 504)},
)
@match_info_schema(TemplatePath)
@querystring_schema(DeviceQuery)
async def attach(request: web.Request) -> web.Response:
    return await change_device(request, "attached")


@routes.get("/api/0/detach/{domain}/{xml_name}", allow_head=False)
@docs(
    tags=["devices"],
    summary="Detach host device",
    description=DEVICE_DESCRIPTION,
    responses={200: {"description": "Detached", "schema": DeviceResult},
               **error_responses(400, 403, 404, 409, 422, 501, 503, 504)},
)
@match_info_schema(TemplatePath)
@querystring_schema(DeviceQuery)
async def detach(request: web.Request) -> web.Response:
    return await change_device(request, "detached")


@routes.get("/api/0/version", allow_head=False)
@docs(
    tags=["server"],
    summary="Get API version",
    description="The server version (semantic versioning).",
    responses={200: {"description": "Version", "schema": {"type": "string"}}},
)
async def version(request: web.Request) -> web.Response:
    return web.json_response(__version__)
