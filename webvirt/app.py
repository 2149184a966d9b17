"""The application factory and the start-up/clean-up of what the app owns."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from webvirt import api_devices, api_domains, api_server, stream
from webvirt.appkeys import EVENT_HUB, HOST, SETTINGS, TEMPLATES
from webvirt.config import Settings
from webvirt.events import EventHub
from webvirt.host import Host
from webvirt.middlewares import json_errors, path_parameters
from webvirt.openapi import setup_openapi
from webvirt.security import Guard
from webvirt.templates import TemplateStore


async def libvirt_connection(app: web.Application) -> AsyncIterator[None]:
    host = app[HOST]
    await host.open()
    yield
    await host.close()


async def event_stream(app: web.Application) -> AsyncIterator[None]:
    heartbeats = asyncio.create_task(send_heartbeats(app[EVENT_HUB], app[SETTINGS].heartbeat_s))
    yield
    heartbeats.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await heartbeats


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
    app[EVENT_HUB] = hub = EventHub()
    app[HOST] = Host(settings.uri, hub, call_timeout=settings.call_timeout,
                     reconcile_s=settings.reconcile_s)
    app[TEMPLATES] = TemplateStore(settings.devices_dir)
    app.cleanup_ctx.extend([libvirt_connection, event_stream])
    app.on_shutdown.append(end_event_streams)

    for module in (api_domains, api_devices, api_server, stream):
        app.router.add_routes(module.routes)
    app.router.add_get("/", dashboard, allow_head=False)
    app.router.add_static("/static", settings.static_dir)
    setup_openapi(app)
    return app
