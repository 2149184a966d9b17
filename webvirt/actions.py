"""A domain action as every caller asks for it (REST handlers, the MQTT bridge): resolve the
domain, hold it exclusively, act through the host, log what happened. One code path, so locks,
errors and events are the same whoever asks."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import libvirt

from webvirt.domain_cache import DomainEntry
from webvirt.host import Host

# The log lines keep the name they had when this lived in the HTTP handlers.
log = logging.getLogger("webvirt.api_domains")
Operation = Callable[[libvirt.virDomain], str]


async def perform(host: Host, entry: DomainEntry, action: str, operation: Operation,
                  *, exclusive: bool = True) -> str:
    """Run operation on the domain; answers what it did. Raises ApiError (409 busy or refused,
    503 not connected, 504 timeout); the caller resolved the domain (Hosts.resolve: 404,
    409 ambiguous)."""
    with host.exclusive(entry) if exclusive else contextlib.nullcontext():
        result = await host.act(entry, operation)
    log.info("%s %s%s: %s", action, entry.name, host.said, result)
    return result
