"""Reading devices out of libvirt XML: a domain's host devices, host node devices, and
whether a domain already has the device a template describes (for toggle)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any


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
        devices.append(entry)
    return devices


def node_device(xml: str) -> dict[str, Any] | None:
    """A host USB or PCI device from its node-device XML."""
    root = ET.fromstring(xml)
    capability = root.find("capability")
    if capability is None:
        return None
    kind = {"usb_device": "usb", "pci": "pci"}.get(capability.get("type", ""))
    if kind is None:
        return None
    vendor, product = capability.find("vendor"), capability.find("product")
    entry: dict[str, Any] = {
        "name": root.findtext("name"),
        "type": kind,
        "vendor_id": _id_text(vendor),
        "vendor": vendor.text if vendor is not None else None,
        "product_id": _id_text(product),
        "product": product.text if product is not None else None,
    }
    if kind == "usb":
        entry["address"] = usb_address(capability.findtext("bus"), capability.findtext("device"))
    else:
        entry["address"] = pci_address({k: capability.findtext(k) for k in PCI_FIELDS})
        group = capability.find("iommuGroup")
        entry["iommu_group"] = _int(group.get("number")) if group is not None else None
    return entry


def _id_text(element: ET.Element | None) -> str | None:
    value = _hex(element.get("id")) if element is not None else None
    return f"{value:04x}" if value is not None else None


def holds(hostdev: dict[str, Any], device: dict[str, Any]) -> bool:
    """Whether a domain's hostdev entry is this host device."""
    if hostdev["type"] != device["type"]:
        return False
    if device["type"] == "pci":
        return hostdev["address"] is not None and hostdev["address"] == device["address"]
    if hostdev.get("vendor_id") and hostdev.get("product_id"):
        return (hostdev["vendor_id"], hostdev["product_id"]) == (device["vendor_id"],
                                                                 device["product_id"])
    return hostdev.get("address") is not None and hostdev["address"] == device["address"]


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
