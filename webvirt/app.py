"""The application factory and the start-up/clean-up of what the app owns."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from webvirt import api_devices, api_domains, api_server, stream
from webvirt.appkeys import (
    DOMAIN_LOCKS,
    EVENT_HUB,
    EVENT_SOURCE,
    HYPERVISOR,
    SETTINGS,
    TEMPLATES,
)
from webvirt.config import Settings
from webvirt.domains import DomainLocks
from webvirt.events import EventHub
from webvirt.hypervisor import Hypervisor
from webvirt.libvirt_events import LibvirtEventSource
from webvirt.middlewares import json_errors, path_parameters
from webvirt.openapi import setup_openapi
from webvirt.security import Guard
from webvirt.templates import TemplateStore


async def libvirt_connection(app: web.Application) -> AsyncIterator[None]:
    hypervisor = app[HYPERVISOR]
    await hypervisor.open()
    yield
    await hypervisor.close()


async def event_stream(app: web.Application) -> AsyncIterator[None]:
    heartbeats = asyncio.create_task(send_heartbeats(app[EVENT_HUB], app[SETTINGS].heartbeat_s))
    yield
    heartbeats.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await heartbeats
    await app[EVENT_SOURCE].unregister()


async def send_heartbeats(hub: EventHub, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        hub.heartbeat()


async def end_event_streams(app: web.Application) -> None:
    # Streams never end by themselves; without this, shutdown waits for its timeout.
    app[EVENT_HUB].end_all()


async def dashboard(request: web.Request) -> web.FileResponse:
    return web.FileResponse(request.app[SETTINGS].static_dir / "index.html")


def create_app(settings: Settings) -> web.Application:
    guard = Guard(settings)
    app = web.Application(middlewares=[json_errors, guard.middleware, path_parameters])
    app[SETTINGS] = settings
    app[HYPERVISOR] = hypervisor = Hypervisor(settings.uri, call_timeout=settings.call_timeout)
    app[TEMPLATES] = TemplateStore(settings.devices_dir)
    app[DOMAIN_LOCKS] = DomainLocks()
    app[EVENT_HUB] = hub = EventHub()
    app[EVENT_SOURCE] = source = LibvirtEventSource(hub, hypervisor)
    hypervisor.add_listener(source)
    # Entered in this order, left in reverse: callbacks go before the connection closes.
    app.cleanup_ctx.extend([libvirt_connection, event_stream])
    app.on_shutdown.append(end_event_streams)

    for module in (api_domains, api_devices, api_server, stream):
        app.router.add_routes(module.routes)
    app.router.add_get("/", dashboard, allow_head=False)
    app.router.add_static("/static", settings.static_dir)
    setup_openapi(app)
    return app
