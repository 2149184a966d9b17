"""Typed keys for what the application object carries."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    pass

SETTINGS = web.AppKey("settings", "Settings")
HYPERVISOR = web.AppKey("hypervisor", "Hypervisor")
TEMPLATES = web.AppKey("templates", "TemplateStore")
DOMAIN_LOCKS = web.AppKey("domain_locks", "DomainLocks")
EVENT_HUB = web.AppKey("event_hub", "EventHub")
EVENT_SOURCE = web.AppKey("event_source", "LibvirtEventSource")
