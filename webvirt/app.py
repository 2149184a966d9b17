"""The application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from webvirt import api_seed
from webvirt.appkeys import DOMAIN_LOCKS, HYPERVISOR, SETTINGS, TEMPLATES
from webvirt.config import Settings
from webvirt.domains import DomainLocks
from webvirt.hypervisor import Hypervisor
from webvirt.middlewares import json_errors
from webvirt.openapi import setup_openapi
from webvirt.templates import TemplateStore

log = logging.getLogger(__name__)


async def libvirt_connection(app: web.Application) -> AsyncIterator[None]:
    hypervisor = app[HYPERVISOR]
    await hypervisor.open()
    yield
    await hypervisor.close()


def create_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[json_errors])
    app[SETTINGS] = settings
    app[HYPERVISOR] = Hypervisor(settings.uri, call_timeout=settings.call_timeout)
    app[TEMPLATES] = TemplateStore(settings.devices_dir)
    app[DOMAIN_LOCKS] = DomainLocks()
    app.cleanup_ctx.append(libvirt_connection)

    app.router.add_routes(api_seed.routes)
    app.router.add_static("/static/vendor", settings.static_dir / "vendor")
    setup_openapi(app)
    return app
