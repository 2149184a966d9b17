"""libvirt's events, registered on every (re)connect and turned into hub messages.

libvirtaio runs these callbacks on the event loop thread; they only read what the domain
object already holds (name, UUID), so no libvirt RPC happens on the loop.
"""

from __future__ import annotations

import logging
from typing import Any

import libvirt

from webvirt.domains import state_name
from webvirt.errors import ApiError
from webvirt.events import EventHub
from webvirt.hypervisor import SHUTDOWN_CALL_S, Hypervisor

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


def read_domains(conn: libvirt.virConnect) -> list[dict[str, str]]:
    """Blocking: every domain's name, UUID and state, for the cache and snapshots."""
    return [{"name": d.name(), "uuid": d.UUIDString(), "state": state_name(d.state()[0])}
            for d in conn.listAllDomains()]


class LibvirtEventSource:
    """A Hypervisor listener: registers libvirt's callbacks and feeds the hub."""

    def __init__(self, hub: EventHub, hypervisor: Hypervisor):
        self.hub = hub
        self.hypervisor = hypervisor
        self._conn: libvirt.virConnect | None = None
        self._domain_callbacks: list[int] = []
        self._node_callbacks: list[int] = []
        self._ever_connected = False

    async def connected(self, conn: libvirt.virConnect) -> None:
        self._conn = conn
        await self.hypervisor.run_blocking(lambda: self._register(conn))
        self.hub.replace_domains(await self.hypervisor.run_blocking(lambda: read_domains(conn)))
        self.hub.connected = True
        if self._ever_connected:
            self.hub.publish("connection", state="restored", uri=self.hypervisor.connected_uri)
            self.hub.broadcast_snapshot()
        self._ever_connected = True

    def disconnected(self, reason: str) -> None:
        # The callbacks died with the connection.
        self._conn = None
        self._domain_callbacks, self._node_callbacks = [], []
        self.hub.connected = False
        self.hub.publish("connection", state="lost", reason=reason)

    async def unregister(self) -> None:
        """Before an orderly close, so libvirt does not keep callbacks of a closed connection."""
        conn = self._conn
        if conn is None:
            return
        domain_ids, node_ids = self._domain_callbacks, self._node_callbacks
        self._domain_callbacks, self._node_callbacks = [], []

        def unregister_all() -> None:
            for callback_id in domain_ids:
                conn.domainEventDeregisterAny(callback_id)
            for callback_id in node_ids:
                conn.nodeDeviceEventDeregisterAny(callback_id)

        try:
            await self.hypervisor.run_blocking(unregister_all, seconds=SHUTDOWN_CALL_S)
        except (libvirt.libvirtError, ApiError) as err:  # closing anyway; just say so
            log.debug("could not unregister libvirt callbacks: %s", err)

    def _register(self, conn: libvirt.virConnect) -> None:
        domain_callbacks = {
            libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE: self._on_lifecycle,
            libvirt.VIR_DOMAIN_EVENT_ID_REBOOT: self._on_reboot,
            libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED: self._on_device("device-added"),
            libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED: self._on_device("device-removed"),
            libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED:
                self._on_device("device-removal-failed"),
        }
        for event_id, callback in domain_callbacks.items():
            try:
                self._domain_callbacks.append(
                    conn.domainEventRegisterAny(None, event_id, callback, None))
            except libvirt.libvirtError as err:
                log.warning("libvirt event %d unavailable: %s", event_id, err.get_error_message())
        try:
            self._node_callbacks.append(conn.nodeDeviceEventRegisterAny(
                None, libvirt.VIR_NODE_DEVICE_EVENT_ID_LIFECYCLE, self._on_node_device, None))
        except libvirt.libvirtError as err:
            log.info("host device events unavailable: %s", err.get_error_message())

    def _on_lifecycle(self, _conn: Any, dom: libvirt.virDomain, event: int, detail: int,
                      _opaque: Any) -> None:
        name, uuid = dom.name(), dom.UUIDString()
        state = STATE_AFTER.get(event) or self.hub.cached_state(name)
        if event == libvirt.VIR_DOMAIN_EVENT_DEFINED and state is None:
            state = "shutoff"
        if event == libvirt.VIR_DOMAIN_EVENT_UNDEFINED and state == "shutoff":
            state = None  # gone for good; a running transient domain stays until it stops
        self.hub.set_state(name, uuid, state)
        self.hub.publish(
            "lifecycle", domain=name, uuid=uuid,
            event=LIFECYCLE_EVENTS.get(event, str(event)),
            detail=LIFECYCLE_DETAILS.get(event, {}).get(detail, str(detail)),
            state=state or "undefined",
        )

    def _on_reboot(self, _conn: Any, dom: libvirt.virDomain, _opaque: Any) -> None:
        self.hub.publish("reboot", domain=dom.name(), uuid=dom.UUIDString())

    def _on_device(self, kind: str) -> Any:
        def callback(_conn: Any, dom: libvirt.virDomain, alias: str, _opaque: Any) -> None:
            self.hub.publish(kind, domain=dom.name(), uuid=dom.UUIDString(), device=alias)
        return callback

    def _on_node_device(self, _conn: Any, dev: libvirt.virNodeDevice, event: int, _detail: int,
                        _opaque: Any) -> None:
        kind = NODE_DEVICE_EVENTS.get(event)
        if kind is not None:
            self.hub.publish(kind, device=dev.name())
