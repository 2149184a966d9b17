"""Keeps running domains' USB host devices true to the host.

libvirt leaves a USB hostdev in a running domain when its device is unplugged from the host,
pointing at a bus/device address that no device has any more; a replug gets a new address,
so a second attach leaves two entries, and a toggle's first press removes only the stale one.
The reconciler detaches such stale entries and says so in a `detach` event (reason
"unplugged"). It is a consumer of the hub's events and acts through the host like any caller:
a pass runs at start, after every reconnect and after every USB unplug.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

import libvirt

from webvirt import device_xml
from webvirt.domain_cache import DomainEntry
from webvirt.errors import ApiError, Conflict
from webvirt.host import Host
from webvirt.host_devices import read_node_devices
from webvirt.hub import EventHub

log = logging.getLogger(__name__)
BUSY_RETRY_S = 0.5  # a domain busy with another operation is tried again after this
# libvirt attaches a USB device found in sysfs, and its node-device list learns of the device
# from udev a moment later: an entry is stale only if its address is still absent after this.
SETTLE_S = 1.0


@dataclass(frozen=True, slots=True)
class StaleHostdev:
    uuid: str
    domain: str
    hostdev: dict[str, Any]  # as device_xml.hostdevs describes it


class UsbReconciler:
    __slots__ = ("_pending", "_stop_listening", "_task", "host", "hub")

    def __init__(self, host: Host, hub: EventHub):
        self.host = host
        self.hub = hub
        self._pending = False
        self._task: asyncio.Task[None] | None = None
        self._stop_listening = hub.listen(self._on_event)

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if ((kind == "node-device-removed" and event.get("device_type") == "usb")
                or (kind == "connection" and event.get("state") == "restored")):
            self.wake()

    def wake(self) -> None:
        """Asks for a pass; passes asked for while one runs are done as one more."""
        self._pending = True
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        self._stop_listening()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while self._pending:
            self._pending = False
            if not self.host.connected:
                return  # the reconnect's "restored" asks again
            try:
                stale = await self.host.call(find_stale_usb_hostdevs)
            except ApiError as err:
                log.warning("could not look for stale USB host devices: %s", err.detail)
                return
            if stale:
                await asyncio.sleep(SETTLE_S)
            for item in stale:
                await self._detach(item)

    async def _detach(self, item: StaleHostdev) -> None:
        entry = DomainEntry(item.uuid, item.domain, "running")
        hostdev = item.hostdev
        event = {"domain": item.domain, "uuid": item.uuid, "device": hostdev["alias"],
                 "vendor_id": hostdev.get("vendor_id"),
                 "product_id": hostdev.get("product_id"), "address": hostdev["address"],
                 "reason": "unplugged"}
        try:
            with self.host.exclusive(entry):
                detached = await self.host.call(partial(
                    detach_stale, uuid=item.uuid, alias=hostdev["alias"],
                    address=hostdev["address"]))
        except Conflict:
            asyncio.get_running_loop().call_later(BUSY_RETRY_S, self.wake)
            return
        except ApiError as err:
            log.warning("could not detach stale USB device %s (was %s) from %s: %s",
                        hostdev["alias"], hostdev["address"], item.domain, err.detail)
            self.hub.publish("detach", **event, result="error", error=err.detail)
            return
        if detached:
            log.info("detached stale USB device %s (was %s, unplugged) from %s",
                     hostdev["alias"], hostdev["address"], item.domain)
            self.hub.publish("detach", **event, result="ok")


# Blocking helpers; each runs on a connection's thread.

def present_usb_addresses(conn: libvirt.virConnect) -> set[str]:
    flags = libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_USB_DEV
    return {d["address"] for d in read_node_devices(conn, flags) if d["type"] == "usb"}


def find_stale_usb_hostdevs(conn: libvirt.virConnect) -> list[StaleHostdev]:
    """USB hostdevs of running domains whose bus/device address no host device has."""
    present = present_usb_addresses(conn)
    stale = []
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        for hostdev in device_xml.hostdevs(dom.XMLDesc()):
            if (hostdev["type"] == "usb" and hostdev["alias"] and hostdev["address"]
                    and hostdev["address"] not in present):
                stale.append(StaleHostdev(dom.UUIDString(), dom.name(), hostdev))
    return stale


def detach_stale(conn: libvirt.virConnect, uuid: str, alias: str, address: str) -> bool:
    """Detaches the live hostdev `alias` if it still points at `address` and no host device
    has that address; whether it did."""
    if address in present_usb_addresses(conn):
        return False
    dom = conn.lookupByUUIDString(uuid)
    live = dom.XMLDesc()
    if not any(h["alias"] == alias and h["address"] == address
               for h in device_xml.hostdevs(live)):
        return False
    xml = device_xml.hostdev_xml(live, alias)
    assert xml is not None
    dom.detachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    return True
