"""Reading device XML: hostdevs, node devices and toggle's presence test."""

from __future__ import annotations

from pathlib import Path

from webvirt.device_xml import (
    describe_node_device,
    has_device,
    holds,
    hostdev_xml,
    hostdevs,
    node_device,
)
from webvirt.host_devices import HostDevices, event_fields, is_local, read_serial, reported

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


# As the lab host's libvirt 9.0 writes them (tests/test_usb_lab.py plugs the real thing).
USB_DEVICE = """<device>
  <name>usb_1_4_2</name>
  <path>/sys/devices/pci0000:00/0000:00:02.0/usb1/1-4/1-4.2</path>
  <devnode type='dev'>/dev/bus/usb/001/005</devnode>
  <parent>usb_1_4</parent>
  <driver><name>usb</name></driver>
  <capability type='usb_device'>
    <bus>1</bus><device>5</device>
    <product id='0x0000'>PenPartner</product>
    <vendor id='0x056a'>Wacom Co., Ltd</vendor>
  </capability>
</device>"""
USB_INTERFACE = """<device>
  <name>usb_1_4_2_1_0</name>
  <path>/sys/devices/pci0000:00/0000:00:02.0/usb1/1-4/1-4.2/1-4.2:1.0</path>
  <parent>usb_1_4_2</parent>
  <capability type='usb'><number>0</number><class>3</class></capability>
</device>"""


def test_a_usb_device_has_its_port_path_from_the_kernel_name() -> None:
    assert describe_node_device(USB_DEVICE) == {
        "name": "usb_1_4_2", "type": "usb", "vendor_id": "056a", "vendor": "Wacom Co., Ltd",
        "product_id": "0000", "product": "PenPartner", "address": "1:5", "port": "1-4.2"}


def test_a_root_hub_has_no_port_and_an_interface_is_not_a_usb_device() -> None:
    root_hub = USB_DEVICE.replace("/1-4/1-4.2</path>", "</path>")
    assert describe_node_device(root_hub)["port"] is None
    assert describe_node_device(USB_INTERFACE) == {"name": "usb_1_4_2_1_0",
                                                   "type": "usb_interface"}
    assert node_device(USB_INTERFACE) is None


def test_a_usb_hostdev_holds_the_device_at_its_address_not_any_with_its_ids() -> None:
    device = node_device(USB_DEVICE)
    assert device is not None
    live = {"type": "usb", "vendor_id": "056a", "product_id": "0000", "address": "1:5"}
    assert holds(live, device)
    # The same ids at another address: the entry left from before a replug.
    assert not holds({**live, "address": "1:3"}, device)
    # A saved definition names only the ids.
    assert holds({**live, "address": None}, device)
    assert not holds({**live, "address": None, "product_id": "0001"}, device)


def test_hostdev_xml_is_the_element_with_that_alias() -> None:
    xml = hostdev_xml(DOMAIN, "hostdev0")
    assert xml is not None and "<address bus=\"1\" device=\"4\" />" in xml
    assert hostdev_xml(DOMAIN, "hostdev9") is None


def test_host_devices_tell_what_came_and_went_between_two_reads() -> None:
    table = HostDevices()
    wacom, interface = describe_node_device(USB_DEVICE), describe_node_device(USB_INTERFACE)
    assert table.replace_all([wacom, interface]) == ([wacom, interface], [])
    assert not table.add(wacom)  # told already
    replugged = {**wacom, "address": "1:6"}
    assert table.replace_all([replugged]) == ([replugged], [interface])
    assert table.remove("usb_1_4_2") == replugged and table.remove("usb_1_4_2") is None
    assert [reported(d) for d in (wacom, interface)] == [True, False]
    assert event_fields(wacom) == {
        "device": "usb_1_4_2", "device_type": "usb", "vendor_id": "056a",
        "vendor": "Wacom Co., Ltd", "product_id": "0000", "product": "PenPartner",
        "address": "1:5", "port": "1-4.2"}


def test_a_usb_serial_is_read_from_sysfs_only_where_libvirt_runs_here(tmp_path: Path) -> None:
    device_dir = tmp_path / "1-4.2"
    device_dir.mkdir()
    (device_dir / "serial").write_text("A1B2C3\n")
    xml = USB_DEVICE.replace("/sys/devices/pci0000:00/0000:00:02.0/usb1/1-4/1-4.2",
                             str(device_dir))
    assert read_serial(xml) == "A1B2C3"
    assert read_serial(USB_INTERFACE) is None  # no such file here
    assert [is_local(u) for u in (None, "qemu:///system", "qemu+ssh://gamer@tower/system",
                                  "qemu+tcp://127.0.0.1:16509/system")] == [
        True, True, False, False]


def test_a_placeholder_for_a_device_missing_at_start_holds_nothing() -> None:
    placeholder = DOMAIN.replace("<source>", "<source startupPolicy='optional' missing='yes'>",
                                 1).replace("<address bus='1' device='4'/>", "")
    [entry, _pci] = hostdevs(placeholder)
    assert entry["missing"] is True and entry["address"] is None
    wacom_like = {"type": "usb", "vendor_id": "046d", "product_id": "c52b", "address": "1:9"}
    assert not holds(entry, wacom_like)
    assert "missing" not in hostdevs(DOMAIN)[0]
