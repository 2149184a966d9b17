"""Device templates: filling, escaping and refusing hostile names and values."""

from __future__ import annotations

import os
from pathlib import Path
from xml.etree import ElementTree

import libvirt
import pytest
from aiohttp.test_utils import TestClient

from tests.libvirt_daemon import guest_xml
from webvirt.errors import ApiError
from webvirt.templates import DeviceTemplate, TemplateStore

SEED_USB = (Path(__file__).resolve().parent.parent / "devices" / "usb.xml").read_text()


def render(text: str, **params: str) -> str:
    return DeviceTemplate("t", text).render(params)[0]


def test_seed_usb_example() -> None:
    xml = render(SEED_USB, vendor_id="1234", product_id="5678")
    assert "<vendor id='0x1234'/>" in xml
    assert "<product id='0x5678'/>" in xml


def test_seed_pci_with_rom_example(devices_dir: Path) -> None:
    template = TemplateStore(devices_dir).load("pci_with_rom")
    xml, used = template.render({"domain": "0000", "bus": "0f", "slot": "00", "function": "0",
                                 "arbitrary_variable_name": "/usr/share/vgabios/1080ti.rom"})
    assert "<address domain='0x0000' bus='0x0f' slot='0x00' function='0x0'/>" in xml
    assert '<rom file="/usr/share/vgabios/1080ti.rom"/>' in xml
    assert used["ARBITRARY_VARIABLE_NAME"] == "/usr/share/vgabios/1080ti.rom"


def test_parameters_are_case_insensitive() -> None:
    assert render("<a v='$VENDOR_ID'/>", VeNdOr_Id="ab") == "<a v='ab'/>"


def test_whole_names_only() -> None:
    text = "<a x='$VENDOR' y='$VENDOR_ID'/>"
    assert render(text, vendor="v", vendor_id="id") == "<a x='v' y='id'/>"
    with pytest.raises(ApiError) as caught:
        render(text, vendor="v")
    assert caught.value.status == 400
    assert "vendor_id" in caught.value.detail


def test_values_are_escaped_against_injection() -> None:
    xml = render("<rom file='$F'/>", f="x'/><evil a='1")
    assert xml == "<rom file='x&apos;/&gt;&lt;evil a=&apos;1'/>"
    xml = render('<rom file="$F"/>', f='a"&<b')
    assert xml == '<rom file="a&quot;&amp;&lt;b"/>'


def test_missing_variables_are_all_named() -> None:
    with pytest.raises(ApiError) as caught:
        render(SEED_USB)
    assert caught.value.status == 400
    assert "vendor_id, product_id" in caught.value.detail


@pytest.mark.parametrize(("value", "reason"), [
    ("", "empty"),
    ("x" * 1025, "longer than 1024"),
    ("a\x00b", "not valid UTF-8"),
    ("a\x07b", "not valid UTF-8"),
    ("bad\ufffdbytes", "not valid UTF-8"),
])
def test_bad_values_are_400(value: str, reason: str) -> None:
    with pytest.raises(ApiError) as caught:
        render("<a v='$V'/>", v=value)
    assert caught.value.status == 400
    assert reason in caught.value.detail


def test_same_parameter_twice_with_different_values_is_400() -> None:
    template = DeviceTemplate("t", "<a v='$V'/>")
    from multidict import MultiDict
    with pytest.raises(ApiError) as caught:
        template.render(MultiDict([("v", "1"), ("V", "2")]))
    assert caught.value.code == "ambiguous_variable"


def test_template_that_is_not_xml_is_422(devices_dir: Path) -> None:
    (devices_dir / "broken.xml").write_text("<hostdev>$X")
    with pytest.raises(ApiError) as caught:
        TemplateStore(devices_dir).load("broken").render({"x": "1"})
    assert caught.value.status == 422


def test_reserved_variable_names_are_refused(devices_dir: Path) -> None:
    (devices_dir / "clash.xml").write_text("<a v='$LIVE'/>")
    with pytest.raises(ApiError) as caught:
        TemplateStore(devices_dir).load("clash")
    assert caught.value.status == 422
    assert "$LIVE" in caught.value.detail


def test_names_lists_the_templates(devices_dir: Path) -> None:
    assert TemplateStore(devices_dir).names() == ["pci", "pci_with_rom", "usb", "usb_address",
                                                 "usb_tablet"]


@pytest.mark.parametrize("name", ["..", "../usb", "a/../usb", "/etc/passwd", ".hidden", "u sb"])
def test_path_tricks_in_the_name_are_400(devices_dir: Path, name: str) -> None:
    with pytest.raises(ApiError) as caught:
        TemplateStore(devices_dir).load(name)
    assert caught.value.status == 400


def test_symlink_out_of_devices_is_403(devices_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.xml"
    outside.write_text("<secret/>")
    os.symlink(outside, devices_dir / "sneaky.xml")
    with pytest.raises(ApiError) as caught:
        TemplateStore(devices_dir).load("sneaky")
    assert caught.value.status == 403
    assert "sneaky" not in TemplateStore(devices_dir).names()


@pytest.mark.parametrize("path", [
    "/api/0/attach/linux-dev/..%2Fdevices%2Fusb",
    "/api/0/attach/linux-dev/%2Fetc%2Fpasswd",
    "/api/0/attach/linux-dev/..",
])
async def test_path_tricks_over_http_are_4xx(client: TestClient, path: str) -> None:
    response = await client.get(path + "?vendor_id=1&product_id=2")
    assert 400 <= response.status < 500
    assert "detail" in await response.json()


async def test_non_utf8_value_over_http_is_400(client: TestClient) -> None:
    response = await client.get("/api/0/attach/linux-dev/usb?vendor_id=%FF%FE&product_id=1")
    assert response.status == 400
    assert (await response.json())["code"] == "invalid_variable"


ROM_TEMPLATE = """<hostdev mode='subsystem' type='pci' managed='yes'>
  <source><address domain='0x0000' bus='0x00' slot='0x1f' function='0x0'/></source>
  <rom file='$ROM'/>
</hostdev>"""


@pytest.mark.qemu
async def test_injection_over_http_reaches_libvirt_as_plain_text(
        qemu_client: TestClient, qemu_conn: libvirt.virConnect, devices_dir: Path) -> None:
    # Saved (not live) to a shut-off guest: libvirt keeps the device as it received it.
    (devices_dir / "rom.xml").write_text(ROM_TEMPLATE)
    dom = qemu_conn.defineXML(guest_xml("escaped"))
    value = "/x'/><evil/><x a='&\""
    response = await qemu_client.get("/api/0/attach/escaped/rom", params={
        "rom": value, "live": "0", "persistent": "1"})
    assert response.status == 200, await response.text()
    saved = ElementTree.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    assert [rom.get("file") for rom in saved.iter("rom")] == [value]
    assert saved.find(".//evil") is None
