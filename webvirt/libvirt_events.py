"""libvirt's event callbacks: registered on a connection, turned into plain facts for a sink.

A callback may run on the loop thread or on a connection's thread, so it only reads what the
objects libvirt hands it already hold (names, UUIDs: no RPC) and hops to the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

import libvirt

log = logging.getLogger(__name__)


def _constants(prefix: str) -> dict[int, str]:
    """libvirt's constants under a prefix, by value: ..._STOPPED_SHUTDOWN -> "shutdown"."""
    return {getattr(libvirt, n): n.removeprefix(prefix).lower()
            for n in dir(libvirt) if n.startswith(prefix)}


LIFECYCLE_EVENTS = {
    getattr(libvirt, f"VIR_DOMAIN_EVENT_{name.upper()}"): name
    for name in ("defined", "undefined", "started", "suspended", "resumed", "stopped",
                 "shutdown", "pmsuspended", "crashed")
}
LIFECYCLE_DETAILS = {event: _constants(f"VIR_DOMAIN_EVENT_{name.upper()}_")
                     for event, name in LIFECYCLE_EVENTS.items()}
STATE_AFTER = {
    libvirt.VIR_DOMAIN_EVENT_STARTED: "running",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "running",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "paused",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "shutoff",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}
NODE_DEVICE_EVENTS = {
    libvirt.VIR_NODE_DEVICE_EVENT_CREATED: "node-device-added",
    libvirt.VIR_NODE_DEVICE_EVENT_DELETED: "node-device-removed",
}
DEVICE_EVENTS = {
    libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED: "device-added",
    libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED: "device-removed",
    libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED: "device-removal-failed",
}


class EventSink(Protocol):
    """Receives libvirt's events on the loop thread."""

    def lifecycle(self, uuid: str, name: str, event: int, detail: int) -> None: ...

    def domain_event(self, kind: str, uuid: str, name: str, **fields: Any) -> None: ...

    def node_device(self, kind: str, device: str) -> None: ...


def register(conn: libvirt.virConnect, sink: EventSink, loop: asyncio.AbstractEventLoop,
             current: Callable[[], bool], ids: list[tuple[str, int]]) -> None:
    """Blocking, on the connection's thread. Each callback's id goes into `ids` as soon as it
    is registered, so that the connection can deregister them all before it closes, also
    when registering fails halfway (a callback left behind keeps the connection alive).
    Events are passed on only while current() holds (checked on the loop): a retired
    connection keeps its callbacks until its thread is free to deregister them, and its
    events would double those of the session that replaced it."""

    def deliver(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if current():
            fn(*args, **kwargs)

    def hop(fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            loop.call_soon_threadsafe(deliver, fn, args, kwargs)
        except RuntimeError:  # the loop is closed; nobody listens any more
            pass

    def on_lifecycle(_c: Any, dom: libvirt.virDomain, event: int, detail: int, _o: Any) -> None:
        hop(sink.lifecycle, dom.UUIDString(), dom.name(), event, detail)

    def on_reboot(_c: Any, dom: libvirt.virDomain, _o: Any) -> None:
        hop(sink.domain_event, "reboot", dom.UUIDString(), dom.name())

    def on_device(kind: str) -> Any:
        def callback(_c: Any, dom: libvirt.virDomain, alias: str, _o: Any) -> None:
            hop(sink.domain_event, kind, dom.UUIDString(), dom.name(), device=alias)
        return callback

    def on_node_device(_c: Any, dev: libvirt.virNodeDevice, event: int, _d: int,
                       _o: Any) -> None:
        kind = NODE_DEVICE_EVENTS.get(event)
        if kind is not None:
            hop(sink.node_device, kind, dev.name())

    callbacks: dict[int, Any] = {
        libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE: on_lifecycle,
        libvirt.VIR_DOMAIN_EVENT_ID_REBOOT: on_reboot,
        **{event_id: on_device(kind) for event_id, kind in DEVICE_EVENTS.items()},
    }
    for event_id, callback in callbacks.items():
        try:
            ids.append(("domain", conn.domainEventRegisterAny(None, event_id, callback, None)))
        except libvirt.libvirtError as err:
            log.warning("libvirt event %d unavailable: %s", event_id, err.get_error_message())
    try:
        ids.append(("node", conn.nodeDeviceEventRegisterAny(
            None, libvirt.VIR_NODE_DEVICE_EVENT_ID_LIFECYCLE, on_node_device, None)))
    except libvirt.libvirtError as err:
        log.info("host device events unavailable: %s", err.get_error_message())
