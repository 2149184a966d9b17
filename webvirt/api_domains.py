"""Domains and their power: the seed's state/start/shutdown, plus list, reboot, force off,
reset, suspend and resume. Actions answer with a JSON string saying what happened, as the
seed's did, and take GET (Stream Deck buttons) as well as POST."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp_apigami import docs, match_info_schema, querystring_schema

from webvirt import device_xml, domain_stats, domains
from webvirt.actions import Operation, perform
from webvirt.appkeys import EVENT_HUB, HOST
from webvirt.domain_cache import DomainEntry
from webvirt.schemas import (
    DomainPath,
    DomainStatus,
    DomainSummary,
    RebootQuery,
    ShutdownQuery,
    error_responses,
    parse_query,
    string_enum,
)

log = logging.getLogger(__name__)
POWER_ERRORS = error_responses(404, 409, 501, 503, 504)


async def run_action(request: web.Request, action: str, operation: Operation,
                     *, exclusive: bool = True, entry: DomainEntry | None = None) -> str:
    return await perform(request.app[HOST], entry or request.match_info["domain"], action,
                         operation, exclusive=exclusive)


@docs(
    tags=["domains"],
    summary="Get domain state",
    description="The domain state as the seed's text, e.g. \"running\" or \"shut off\" "
    "(see libvirt's virDomainState).",
    responses={200: {"description": "State text",
                     "schema": string_enum(*domains.SEED_STATE_TEXT.values())},
               **error_responses(404, 503, 504)},
)
@match_info_schema(DomainPath)
async def get_state(request: web.Request) -> web.Response:
    # libvirt's events and the reads they trigger keep the cache current (re-read on every
    # reconnect), so most requests need no libvirt call; unknown names ask libvirt.
    entry = await request.app[HOST].resolve(request.match_info["domain"])
    return web.json_response(domains.SEED_TEXT_BY_NAME.get(entry.state, ""))


@docs(
    tags=["domains"],
    summary="List domains",
    description="Every domain with its state, UUID, vCPUs, memory, autostart and persistence.",
    responses={200: {"description": "Domains, by name", "schema": DomainSummary(many=True)},
               **error_responses(503, 504)},
)
async def list_domains(request: web.Request) -> web.Response:
    # One bulk read (and two listings), whatever the number of domains.
    return web.json_response(await request.app[HOST].call(domain_stats.list_summaries))


def power_docs(summary: str, *answers: str) -> Callable[[Handler], Handler]:
    """Documents an action that is done when libvirt returns, answering one of `answers`."""

    def document(handler: Handler) -> Handler:
        return docs(
            tags=["power"], summary=summary,
            responses={200: {"description": "What happened", "schema": string_enum(*answers)},
                       **POWER_ERRORS},
        )(match_info_schema(DomainPath)(handler))

    return document


@power_docs("Start domain", "starting", "already running")
async def start(request: web.Request) -> web.Response:
    return web.json_response(await run_action(request, "start", domains.start))


@docs(
    tags=["power"],
    summary="Power button: start, shut down or resume",
    description="One button for a Stream Deck key: starts a shut-off (or crashed) domain, asks "
    "a running one to shut down (ACPI), resumes a paused one; answers what it did.",
    responses={200: {"description": "What it did",
                     "schema": string_enum("starting", "shutting down", "resumed")},
               **POWER_ERRORS},
)
@match_info_schema(DomainPath)
async def power(request: web.Request) -> web.Response:
    return web.json_response(await run_action(request, "power", domains.power))


@docs(
    tags=["domains"],
    summary="Domain status for a key or an icon",
    description="Flat JSON: the state, booleans for running and paused, and the host devices "
    "the domain holds (USB vendor:product or PCI address), e.g. to light a Stream Deck key "
    "by a JSON path such as `running`.",
    responses={200: {"description": "Status", "schema": DomainStatus},
               **error_responses(404, 503, 504)},
)
@match_info_schema(DomainPath)
async def status(request: web.Request) -> web.Response:
    host = request.app[HOST]
    entry = await host.resolve(request.match_info["domain"])
    xml = await host.call(partial(domains.xml_for, uuid=entry.uuid, live=True))
    return web.json_response({
        "domain": entry.name,
        "state": entry.state,
        "running": entry.state == "running",
        "paused": entry.state == "paused",
        "devices": [device_label(d) for d in device_xml.hostdevs(xml)],
    })


def device_label(hostdev: dict[str, Any]) -> str:
    if hostdev.get("vendor_id") and hostdev.get("product_id"):
        return f"{hostdev['vendor_id']}:{hostdev['product_id']}"
    return str(hostdev.get("address") or hostdev.get("type"))


@power_docs("Force off (destroy) domain", "forced off", "not running")
async def destroy(request: web.Request) -> web.Response:
    # Force off must work even while a slow action holds the domain.
    return web.json_response(await run_action(request, "destroy", domains.destroy,
                                              exclusive=False))


@power_docs("Reset domain (hard reset, like the reset button)", "reset")
async def reset(request: web.Request) -> web.Response:
    return web.json_response(await run_action(request, "reset", domains.reset))


@power_docs("Pause domain", "paused", "already paused")
async def suspend(request: web.Request) -> web.Response:
    return web.json_response(await run_action(request, "suspend", domains.suspend))


@power_docs("Resume paused domain", "resumed", "already running")
async def resume(request: web.Request) -> web.Response:
    return web.json_response(await run_action(request, "resume", domains.resume))


@docs(
    tags=["power"],
    summary="Shutdown domain",
    description=(
        "Asks the guest to shut down (ACPI). Without parameters it answers at once: "
        "\"shutting down\", or \"not running\". With `wait` (or `timeout`) it waits up to "
        "`timeout` seconds: \"shut off\" or \"still running\". With `force` it forces the "
        "domain off when the timeout passes: \"shut off\" or \"forced off\"."
    ),
    responses={200: {"description": "What happened",
                     "schema": string_enum("shutting down", "not running", "shut off",
                                           "still running", "forced off")},
               **error_responses(400, 404, 409, 503, 504)},
)
@match_info_schema(DomainPath)
@querystring_schema(ShutdownQuery)
async def shutdown(request: web.Request) -> web.Response:
    query = parse_query(request, ShutdownQuery)
    host = request.app[HOST]
    entry = await host.resolve(request.match_info["domain"])
    result = await run_action(request, "shutdown", domains.shutdown, entry=entry)
    if not (query["wait"] or query["force"] or "timeout" in request.query):
        return web.json_response(result)
    if result == "not running":
        return web.json_response(result)
    # On the cache, not on events: a guest that stopped while libvirt was away is seen off
    # by the re-read after the reconnect.
    if await host.wait_for_state(entry, lambda state: state in (None, "shutoff"),
                                 query["timeout"]):
        return web.json_response("shut off")
    if not query["force"]:
        return web.json_response("still running")
    log.warning("shutdown %s: guest did not stop within %g s; forcing it off", entry.name,
                query["timeout"])
    forced = await run_action(request, "destroy", domains.destroy, exclusive=False,
                              entry=entry)
    return web.json_response("forced off" if forced == "forced off" else "shut off")


@docs(
    tags=["power"],
    summary="Reboot domain",
    description=(
        "Asks the guest to reboot (ACPI). With `wait` it waits up to `timeout` seconds for "
        "the guest to reset: \"rebooted\", or \"rebooting\" if it did not in time."
    ),
    responses={200: {"description": "What happened",
                     "schema": string_enum("rebooting", "rebooted")},
               **error_responses(400, 404, 409, 501, 503, 504)},
)
@match_info_schema(DomainPath)
@querystring_schema(RebootQuery)
async def reboot(request: web.Request) -> web.Response:
    query = parse_query(request, RebootQuery)
    entry = await request.app[HOST].resolve(request.match_info["domain"])
    if not query["wait"]:
        return web.json_response(await run_action(request, "reboot", domains.reboot,
                                                  entry=entry))

    def rebooted(message: dict[str, Any]) -> bool:
        return message["type"] == "reboot" and message.get("uuid") == entry.uuid

    # Watching starts first, so a fast reboot event is not missed.
    watched = request.app[EVENT_HUB].watch(rebooted)
    try:
        await run_action(request, "reboot", domains.reboot, entry=entry)
        async with asyncio.timeout(query["timeout"]):
            await watched
        return web.json_response("rebooted")
    except TimeoutError:
        return web.json_response("rebooting")
    finally:
        watched.cancel()
