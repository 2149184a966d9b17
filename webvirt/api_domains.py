"""Domains and their power: the seed's state/start/shutdown, plus list, reboot, force off,
reset, suspend and resume. Actions answer with a JSON string saying what happened, as the
seed's did, and take GET (Stream Deck buttons) as well as POST."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp_apigami import docs, match_info_schema, querystring_schema

from webvirt import deadline, device_xml, domain_stats, domains
from webvirt.actions import Operation, perform
from webvirt.appkeys import EVENT_HUB, HOSTS
from webvirt.domain_cache import DomainEntry
from webvirt.host import Host
from webvirt.schemas import (
    DomainPath,
    DomainStatus,
    DomainSummary,
    HostQuery,
    RebootQuery,
    ShutdownQuery,
    error_responses,
    parse_query,
    string_enum,
)
from webvirt.tasks import arrives, cancel_and_wait

log = logging.getLogger(__name__)
POWER_ERRORS = error_responses(404, 409, 501, 503, 504)
T = TypeVar("T")


async def run_action(request: web.Request, action: str, operation: Operation,
                     *, exclusive: bool = True,
                     target: tuple[Host, DomainEntry] | None = None) -> str:
    host, entry = target or await request.app[HOSTS].resolve(request.match_info["domain"])
    return await perform(host, entry, action, operation, exclusive=exclusive)


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
    _host, entry = await request.app[HOSTS].resolve(request.match_info["domain"])
    return web.json_response(domains.SEED_TEXT_BY_NAME.get(entry.state, ""))


async def list_connected(host: Host) -> list[dict[str, Any]] | None:
    return await host.call(domain_stats.list_summaries) if host.connected else None


@docs(
    tags=["domains"],
    summary="List domains",
    description="Every domain with its state, UUID, vCPUs, memory, autostart and persistence. "
    "With several hosts, each names its `host`; `?host=NAME` lists one host's, and without it "
    "a host that is not connected is left out (see GET /api/0/hosts).",
    responses={200: {"description": "Domains, by name", "schema": DomainSummary(many=True)},
               **error_responses(404, 503, 504)},
)
@querystring_schema(HostQuery)
async def list_domains(request: web.Request) -> web.Response:
    # One bulk read (and two listings) per host, whatever the number of domains.
    hosts = request.app[HOSTS]
    if not hosts.several:
        return web.json_response(await hosts.default.call(domain_stats.list_summaries))
    if "host" in request.query:
        host = hosts.get(request.query["host"])
        found = await host.call(domain_stats.list_summaries)
        return web.json_response([{**summary, **host.tags} for summary in found])
    # A host that is not connected, or does not answer in time, is left out (GET
    # /api/0/hosts says which); the others are read side by side, so none waits for another.
    answer: list[dict[str, Any]] = []
    for host, summaries in await hosts.each(list_connected, "domain list"):
        answer.extend({**summary, **host.tags} for summary in summaries or ())
    return web.json_response(sorted(answer, key=lambda d: (d["name"], d["host"])))


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
    host, entry = await request.app[HOSTS].resolve(request.match_info["domain"])
    xml = await host.call(partial(domains.xml_for, uuid=entry.uuid, live=True))
    return web.json_response({
        "domain": entry.name,
        "state": entry.state,
        "running": entry.state == "running",
        "paused": entry.state == "paused",
        "devices": [device_label(d) for d in device_xml.hostdevs(xml)],
        **host.tags,
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
        "domain off when the timeout passes: \"shut off\" or \"forced off\". If webvirt "
        "stops meanwhile, it answers \"shutting down\" at once and forces nothing off."
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
    host, entry = await request.app[HOSTS].resolve(request.match_info["domain"])
    result = await run_action(request, "shutdown", domains.shutdown, target=(host, entry))
    if not (query["wait"] or query["force"] or "timeout" in request.query):
        return web.json_response(result)
    if result == "not running":
        return web.json_response(result)
    # On the cache, not on events: a guest that stopped while libvirt was away is seen off
    # by the re-read after the reconnect.
    deadline.extend(query["timeout"])
    stopped = await unless_stopping(request, host.wait_for_state(
        entry, lambda state: state in (None, "shutoff"), query["timeout"]))
    if stopped is None:  # webvirt is stopping: nothing confirmed, and nothing forced off
        return web.json_response("shutting down")
    if stopped:
        return web.json_response("shut off")
    if not query["force"]:
        return web.json_response("still running")
    log.warning("shutdown %s: guest did not stop within %g s; forcing it off", entry.name,
                query["timeout"])
    forced = await run_action(request, "destroy", domains.destroy, exclusive=False,
                              target=(host, entry))
    return web.json_response("forced off" if forced == "forced off" else "shut off")


@docs(
    tags=["power"],
    summary="Reboot domain",
    description=(
        "Asks the guest to reboot (ACPI). With `wait` it waits up to `timeout` seconds for "
        "the guest to reset: \"rebooted\", or \"rebooting\" if it did not in time (or "
        "webvirt stopped meanwhile)."
    ),
    responses={200: {"description": "What happened",
                     "schema": string_enum("rebooting", "rebooted")},
               **error_responses(400, 404, 409, 501, 503, 504)},
)
@match_info_schema(DomainPath)
@querystring_schema(RebootQuery)
async def reboot(request: web.Request) -> web.Response:
    query = parse_query(request, RebootQuery)
    host, entry = await request.app[HOSTS].resolve(request.match_info["domain"])
    if not query["wait"]:
        return web.json_response(await run_action(request, "reboot", domains.reboot,
                                                  target=(host, entry)))

    def rebooted(message: dict[str, Any]) -> bool:
        return (message["type"] == "reboot" and message.get("uuid") == entry.uuid
                and message.get("host") == host.tags.get("host"))

    # Watching starts first, so a fast reboot event is not missed.
    watched = request.app[EVENT_HUB].watch(rebooted)
    deadline.extend(query["timeout"])
    try:
        await run_action(request, "reboot", domains.reboot, target=(host, entry))
        seen = await unless_stopping(request, arrives(watched, query["timeout"]))
        return web.json_response("rebooted" if seen else "rebooting")
    finally:
        watched.cancel()


async def unless_stopping(request: web.Request,
                          waiting: Coroutine[Any, Any, T]) -> T | None:
    """What `waiting` answers, or None once webvirt begins to stop: a request may wait an
    hour for a guest, and aiohttp would hold up the stop for a minute, then cancel it."""
    hub = request.app[EVENT_HUB]
    task = asyncio.ensure_future(waiting)
    stopping = asyncio.ensure_future(hub.stopping.wait())
    try:
        await asyncio.wait((task, stopping), return_when=asyncio.FIRST_COMPLETED)
        # Both at once: stopping wins, so that a timeout never forces a guest off as
        # webvirt stops.
        return None if hub.stopping.is_set() else task.result()
    finally:
        await cancel_and_wait(*(t for t in (task, stopping) if not t.done()))
