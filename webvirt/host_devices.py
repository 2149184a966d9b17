"""The host's node devices as libvirt last told: what host-device events carry (a removed
device can no longer be read), and what the reconciler matches against."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import libvirt

from webvirt import device_xml

Description = dict[str, Any]


class HostDevices:
    """Node devices by name, each described by device_xml.describe_node_device."""

    __slots__ = ("_by_name",)

    def __init__(self) -> None:
        self._by_name: dict[str, Description] = {}

    def add(self, description: Description) -> bool:
        """Whether it is new (or changed): only then is it worth an event."""
        before = self._by_name.get(description["name"])
        self._by_name[description["name"]] = description
        return before != description

    def remove(self, name: str) -> Description | None:
        return self._by_name.pop(name, None)

    def replace_all(self, descriptions: list[Description]) -> tuple[list[Description],
                                                                    list[Description]]:
        """After a full read: (added, removed), e.g. while the connection was lost."""
        fresh = {d["name"]: d for d in descriptions}
        added = [d for name, d in fresh.items() if self._by_name.get(name) != d]
        removed = [d for name, d in self._by_name.items() if name not in fresh]
        self._by_name = fresh
        return added, removed


def reported(description: Description) -> bool:
    """Interfaces are parts of a USB device, not devices of their own: no events for them."""
    return bool(description["type"] != "usb_interface")


def event_fields(description: Description) -> dict[str, Any]:
    """A node-device event's fields: `device` is libvirt's node-device name, `device_type`
    its kind (usb, pci, net, ...: `type` is the event's)."""
    fields = {k: v for k, v in description.items() if k not in ("name", "type")}
    return {"device": description["name"], "device_type": description["type"], **fields}


# Blocking helpers; each runs on a connection's thread.

def is_local(uri: str | None) -> bool:
    """Whether libvirt at this URI runs on this machine (its sysfs is ours to read): only a URI
    without a host says so (a loopback address may be forwarded elsewhere, as in the USB lab)."""
    return uri is None or not urlsplit(uri).hostname


def read_serial(xml: str) -> str | None:
    """A USB device's serial number from sysfs (libvirt's node-device XML has none): only
    for a libvirt on this machine, and not every device has one."""
    path = ET.fromstring(xml).findtext("path")
    if not path or not path.startswith("/"):
        return None
    try:
        serial = (Path(path) / "serial").read_text(errors="replace").strip()
    except OSError:
        return None
    return serial or None


def _describe(xml: str, local: bool) -> Description:
    description = device_xml.describe_node_device(xml)
    if description["type"] == "usb":
        description["serial"] = read_serial(xml) if local else None
    return description


def read_node_device(conn: libvirt.virConnect, name: str, local: bool = False
                     ) -> Description | None:
    """None when it is gone again already. `local`: see is_local."""
    try:
        return _describe(conn.nodeDeviceLookupByName(name).XMLDesc(), local)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_NODE_DEVICE:
            return None
        raise


def read_node_devices(conn: libvirt.virConnect, flags: int = 0, local: bool = False
                      ) -> list[Description]:
    """Every node device (or those of the capabilities in `flags`); one unplugged while
    listed is left out."""
    descriptions = []
    for device in conn.listAllDevices(flags):
        try:
            descriptions.append(_describe(device.XMLDesc(), local))
        except libvirt.libvirtError as err:
            if err.get_error_code() != libvirt.VIR_ERR_NO_NODE_DEVICE:
                raise
    return descriptions
