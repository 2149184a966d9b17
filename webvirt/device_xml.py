"""Reading devices out of libvirt XML: a domain's host devices, host node devices, and
whether a domain already has the device a template describes (for toggle)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

# A USB device's kernel name is its port path: bus 1, port 4, hub port 2 is "1-4.2". Root hubs
# ("usb1") and interfaces ("1-4.2:1.0") are not ports.
USB_PORT = re.compile(r"^\d+-\d+(\.\d+)*$")


def _hex(value: str | None) -> int | None:
    try:
        return int(value, 16) if value is not None else None
    except ValueError:
        return None


def _int(value: str | None) -> int | None:
    """libvirt writes numbers as decimal or 0x-hex."""
    try:
        return int(value, 0) if value is not None else None
    except ValueError:
        return None


PCI_FIELDS = ("domain", "bus", "slot", "function")


def pci_address(numbers: dict[str, str | None] | ET.Element | None) -> str | None:
    """0000:0f:00.0 from an <address> element or the node device's number fields."""
    if numbers is None:
        return None
    parts = [_int(numbers.get(k)) for k in PCI_FIELDS]
    if None in parts:
        return None
    domain, bus, slot, function = parts
    return f"{domain:04x}:{bus:02x}:{slot:02x}.{function:x}"


def usb_address(bus: str | None, device: str | None) -> str | None:
    bus_number, device_number = _int(bus), _int(device)
    if bus_number is None or device_number is None:
        return None
    return f"{bus_number}:{device_number}"


def _usb_ids(source: ET.Element) -> tuple[int | None, int | None]:
    vendor, product = source.find("vendor"), source.find("product")
    return (_hex(vendor.get("id")) if vendor is not None else None,
            _hex(product.get("id")) if product is not None else None)


def hostdevs(domain_xml: str) -> list[dict[str, Any]]:
    """The USB and PCI host devices in a domain's XML."""
    devices = []
    for hostdev in ET.fromstring(domain_xml).iterfind("devices/hostdev"):
        source = hostdev.find("source")
        if source is None:
            continue
        kind = hostdev.get("type")
        if kind not in ("usb", "pci"):
            continue
        alias = hostdev.find("alias")
        entry: dict[str, Any] = {"type": kind, "mode": hostdev.get("mode"),
                                 "alias": alias.get("name") if alias is not None else None}
        if kind == "usb":
            entry |= {"vendor_id": _id_text(source.find("vendor")),
                      "product_id": _id_text(source.find("product"))}
        entry["address"] = _address_key(kind, source.find("address"))
        if source.get("missing") == "yes":
            # A startupPolicy='optional' device that was absent at start: a placeholder.
            entry["missing"] = True
        devices.append(entry)
    return devices


def node_device(xml: str) -> dict[str, Any] | None:
    """A host USB or PCI device from its node-device XML."""
    description = describe_node_device(xml)
    return description if is_host_device(description) else None


def is_host_device(description: dict[str, Any]) -> bool:
    """A device a domain can be given (USB or PCI), of those describe_node_device describes."""
    return description["type"] in ("usb", "pci")


def describe_node_device(xml: str) -> dict[str, Any]:
    """Any node device: USB and PCI devices with their ids, names, address (and the USB port
    path, the PCI IOMMU group); others by name and capability type ("usb_interface" for a USB
    device's interfaces, "net", "scsi_host", ...)."""
    root = ET.fromstring(xml)
    capability = root.find("capability")
    name = root.findtext("name")
    kind = capability.get("type", "") if capability is not None else ""
    kind = {"usb_device": "usb", "usb": "usb_interface"}.get(kind, kind)
    if capability is None or kind not in ("usb", "pci"):
        return {"name": name, "type": kind or None}
    vendor, product = capability.find("vendor"), capability.find("product")
    entry: dict[str, Any] = {
        "name": name,
        "type": kind,
        "vendor_id": _id_text(vendor),
        "vendor": vendor.text if vendor is not None else None,
        "product_id": _id_text(product),
        "product": product.text if product is not None else None,
    }
    if kind == "usb":
        entry["address"] = usb_address(capability.findtext("bus"), capability.findtext("device"))
        kernel_name = (root.findtext("path") or "").rstrip("/").rpartition("/")[2]
        entry["port"] = kernel_name if USB_PORT.match(kernel_name) else None
    else:
        entry["address"] = pci_address({k: capability.findtext(k) for k in PCI_FIELDS})
        group = capability.find("iommuGroup")
        entry["iommu_group"] = _int(group.get("number")) if group is not None else None
    return entry


def _id_text(element: ET.Element | None) -> str | None:
    value = _hex(element.get("id")) if element is not None else None
    return f"{value:04x}" if value is not None else None


def holds(hostdev: dict[str, Any], device: dict[str, Any]) -> bool:
    """Whether a domain's hostdev entry is this host device. A running domain's USB hostdev
    names the bus/device address it took, and a replugged device gets a new address: where the
    address is known it decides (with the ids, when the entry names them: device numbers
    wrap, and a stale entry's address may come to another device). A placeholder for a device
    that was missing at start holds nothing."""
    if hostdev["type"] != device["type"] or hostdev.get("missing"):
        return False
    same_ids = (hostdev.get("vendor_id"), hostdev.get("product_id")) == (
        device.get("vendor_id"), device.get("product_id"))
    if device["type"] == "pci" or hostdev.get("address"):
        return (hostdev["address"] is not None and hostdev["address"] == device["address"]
                and (device["type"] == "pci" or not hostdev.get("vendor_id") or same_ids))
    return bool(hostdev.get("vendor_id") and hostdev.get("product_id")) and same_ids


def has_device(domain_xml: str, device_xml: str) -> bool:
    """Whether the domain has the device: host devices by their identity (USB ids or address,
    PCI address), other devices by tag and the template's attributes."""
    wanted = ET.fromstring(device_xml)
    for present in ET.fromstring(domain_xml).iterfind(f"devices/{wanted.tag}"):
        if wanted.tag == "hostdev":
            if _same_hostdev(wanted, present):
                return True
        elif all(present.get(k) == v for k, v in wanted.attrib.items()):
            return True
    return False


def _same_hostdev(wanted: ET.Element, present: ET.Element) -> bool:
    if wanted.get("type") != present.get("type"):
        return False
    wanted_source, present_source = wanted.find("source"), present.find("source")
    if wanted_source is None or present_source is None:
        return False
    if wanted.get("type") == "usb" and None not in _usb_ids(wanted_source):
        return _usb_ids(wanted_source) == _usb_ids(present_source)
    wanted_address = _address_key(wanted.get("type"), wanted_source.find("address"))
    return wanted_address is not None and wanted_address == _address_key(
        present.get("type"), present_source.find("address"))


def _address_key(kind: str | None, address: ET.Element | None) -> str | None:
    if address is None:
        return None
    if kind == "usb":
        return usb_address(address.get("bus"), address.get("device"))
    return pci_address(address)


def hostdev_xml(domain_xml: str, alias: str) -> str | None:
    """The <hostdev> element with this alias, as XML (e.g. to detach exactly that one: with
    its bus/device address in it, libvirt matches by address, not by vendor/product)."""
    for hostdev in ET.fromstring(domain_xml).iterfind("devices/hostdev"):
        found = hostdev.find("alias")
        if found is not None and found.get("name") == alias:
            return ET.tostring(hostdev, encoding="unicode")
    return None
