"""Devices: the seed's attach/detach from templates, toggle, what a domain holds, the
templates, and the host's USB/PCI devices with who holds them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import libvirt
from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp_apigami import docs, match_info_schema, querystring_schema

from webvirt import device_xml, domains
from webvirt.appkeys import HOSTS, TEMPLATES
from webvirt.errors import ApiError
from webvirt.host_devices import read_node_devices
from webvirt.schemas import (
    DeviceQuery,
    DeviceResult,
    DomainPath,
    HostDevice,
    HostQuery,
    NodeDevice,
    TemplateInfo,
    TemplatePath,
    error_responses,
    parse_query,
)
from webvirt.templates import DeviceTemplate

log = logging.getLogger(__name__)

TEMPLATE_DESCRIPTION = (
    "Fills devices/{xml_name}.xml: every $UPPER_CASE variable takes the value of the query "
    "parameter of the same name, case-insensitively (vendor_id fills $VENDOR_ID). Values are "
    "XML-escaped. `live` and `persistent` are reserved: they choose what is changed."
)
DEVICE_ERRORS = error_responses(400, 403, 404, 409, 422, 501, 503, 504)


def device_docs(summary: str, extra: str = "") -> Callable[[Handler], Handler]:
    """Documents /api/0/{action}/{domain}/{xml_name}."""

    def document(handler: Handler) -> Handler:
        return docs(
            tags=["devices"], summary=summary, description=TEMPLATE_DESCRIPTION + extra,
            responses={200: {"description": "Done", "schema": DeviceResult}, **DEVICE_ERRORS},
        )(match_info_schema(TemplatePath)(querystring_schema(DeviceQuery)(handler)))

    return document


async def change_device(request: web.Request, action: str | None) -> web.Response:
    """Attach ("attach"), detach ("detach"), or whichever of the two applies (None: toggle)."""
    template: DeviceTemplate = request.app[TEMPLATES].load(request.match_info["xml_name"])
    query = parse_query(request, DeviceQuery)
    xml, variables = template.render(request.query)
    live, persistent = bool(query["live"]), bool(query["persistent"])
    flags = domains.device_flags(live=live, persistent=persistent)
    parameters = {k.lower(): v for k, v in variables.items()}
    host, entry = await request.app[HOSTS].resolve(request.match_info["domain"])
    with host.exclusive(entry):
        if action is None:
            # A toggle that cannot tell which it is has not tried anything: no event.
            current = await host.call(partial(domains.xml_for, uuid=entry.uuid, live=live))
            action = "detach" if device_xml.has_device(current, xml) else "attach"
        event = {"domain": entry.name, "uuid": entry.uuid, "template": template.name,
                 "variables": parameters}
        operation = domains.attach if action == "attach" else domains.detach
        try:
            await host.call(partial(operation, uuid=entry.uuid, xml=xml, flags=flags))
        except ApiError as err:
            # Tell event clients which template it was: libvirt's events only name an alias.
            host.publish(action, **event, result="error", error=err.detail)
            raise
    host.publish(action, **event, result="ok")
    log.info("%s %s on %s %s", action, template.name, entry.name, parameters)
    return web.json_response({"device": f"{action}ed", "xml": xml, "domain": entry.name,
                              "template": template.name, "variables": parameters,
                              **host.tags})


@device_docs("Attach host device")
async def attach(request: web.Request) -> web.Response:
    return await change_device(request, "attach")


@device_docs("Detach host device")
async def detach(request: web.Request) -> web.Response:
    return await change_device(request, "detach")


@device_docs("Toggle host device (attach if absent, detach if present)",
             " Host devices are matched by USB vendor/product (or address) and PCI address;"
              " other devices by element name and the template's attributes.")
async def toggle(request: web.Request) -> web.Response:
    return await change_device(request, None)


@docs(
    tags=["devices"],
    summary="List a domain's host devices",
    description="USB and PCI host devices in the domain's live definition (saved definition "
    "when it is shut off).",
    responses={200: {"description": "Host devices", "schema": HostDevice(many=True)},
               **error_responses(404, 503, 504)},
)
@match_info_schema(DomainPath)
async def domain_devices(request: web.Request) -> web.Response:
    host, entry = await request.app[HOSTS].resolve(request.match_info["domain"])
    xml = await host.call(partial(domains.xml_for, uuid=entry.uuid, live=True))
    return web.json_response(device_xml.hostdevs(xml))


@docs(
    tags=["devices"],
    summary="List device templates",
    description="Every devices/NAME.xml with the query parameters it needs.",
    responses={200: {"description": "Templates, by name", "schema": TemplateInfo(many=True)}},
)
async def list_templates(request: web.Request) -> web.Response:
    store = request.app[TEMPLATES]
    listing = []
    for name in store.names():
        try:
            variables = [v.lower() for v in store.load(name).variables]
            listing.append({"name": name, "variables": variables})
        except ApiError as err:
            listing.append({"name": name, "variables": [], "error": err.detail})
    return web.json_response(listing)


def host_inventory(conn: libvirt.virConnect, local: bool) -> list[dict[str, Any]]:
    """Blocking: host USB and PCI devices, each with the running domains that hold it now
    (their live definition) and the domains whose saved definition names it."""
    flags = (libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_USB_DEV
             | libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_PCI_DEV)
    devices = [d for d in read_node_devices(conn, flags, local) if device_xml.is_host_device(d)]
    held, configured = [], []
    for dom in conn.listAllDomains():
        if dom.isActive():
            held.append((dom.name(), device_xml.hostdevs(dom.XMLDesc())))
        if dom.isPersistent():
            saved = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            configured.append((dom.name(), device_xml.hostdevs(saved)))
    for device in devices:
        for key, definitions in (("held_by", held), ("configured_in", configured)):
            device[key] = sorted(name for name, hostdevs in definitions
                                 if any(device_xml.holds(h, device) for h in hostdevs))
    return sorted(devices, key=lambda d: (d["type"], d["address"] or ""))


@docs(
    tags=["host"],
    summary="List host USB and PCI devices",
    description="The host's USB and PCI devices (libvirt node devices) with vendor and "
    "product names, the USB port path, the PCI IOMMU group, the running domains that hold "
    "each now (`held_by`) and the domains whose saved definition names it (`configured_in`). "
    "With several hosts, say which with `?host=NAME` (400 host_required without it).",
    responses={200: {"description": "Host devices", "schema": NodeDevice(many=True)},
               **error_responses(400, 404, 501, 503, 504)},
)
@querystring_schema(HostQuery)
async def host_devices(request: web.Request) -> web.Response:
    host = request.app[HOSTS].pick(request.query.get("host"))
    return web.json_response(await host.call(partial(host_inventory, local=host.local)))
