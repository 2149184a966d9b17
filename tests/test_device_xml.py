"""Reading device XML: hostdevs, node devices and toggle's presence test."""

from __future__ import annotations

from webvirt.device_xml import has_device, hostdevs, node_device

DOMAIN = """<domain><devices>
  <hostdev mode='subsystem' type='usb' managed='yes'>
    <source><vendor id='0x046d'/><product id='0xC52B'/><address bus='1' device='4'/></source>
    <alias name='hostdev0'/>
  </hostdev>
  <hostdev mode='subsystem' type='pci' managed='yes'>
    <source><address domain='0x0000' bus='0x0f' slot='0x00' function='0x1'/></source>
  </hostdev>
  <input type='tablet' bus='usb'><alias name='input2'/></input>
</devices></domain>"""


def test_hostdevs() -> None:
    assert hostdevs(DOMAIN) == [
        {"type": "usb", "mode": "subsystem", "alias": "hostdev0", "vendor_id": "046d",
         "product_id": "c52b", "address": "1:4"},
        {"type": "pci", "mode": "subsystem", "alias": None, "address": "0000:0f:00.1"},
    ]


def test_has_device_matches_usb_by_ids_whatever_the_spelling() -> None:
    usb = ("<hostdev mode='subsystem' type='usb'><source><vendor id='0x46D'/>"
           "<product id='0xc52b'/></source></hostdev>")
    assert has_device(DOMAIN, usb)
    assert not has_device(DOMAIN, usb.replace("c52b", "c52c"))


def test_has_device_matches_pci_by_address() -> None:
    pci = ("<hostdev mode='subsystem' type='pci'><source><address domain='0' bus='15' "
           "slot='0' function='1'/></source></hostdev>")
    assert has_device(DOMAIN, pci)
    assert not has_device(DOMAIN, pci.replace("function='1'", "function='0'"))


def test_has_device_matches_other_devices_by_attributes() -> None:
    assert has_device(DOMAIN, "<input type='tablet' bus='usb'/>")
    assert not has_device(DOMAIN, "<input type='mouse' bus='usb'/>")


def test_node_device_without_usb_or_pci_capability_is_skipped() -> None:
    assert node_device("<device><name>computer</name><capability type='system'/></device>") \
        is None
