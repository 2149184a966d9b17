"""The reconciler's plan (pure): which rule gets which device, the older rule first."""

from __future__ import annotations

from typing import Any

from webvirt.rules import PortMatch, Rule, UsbIdMatch
from webvirt.usb_reconciler import Holder, UsbWorld, holdings, plan, usb_hostdev_xml

WIN, LINUX = Holder("uuid-win", "win11"), Holder("uuid-linux", "linux")


def device(name: str, address: str, port: str, ids: str = "046d:c52b") -> dict[str, Any]:
    vendor_id, product_id = ids.split(":")
    return {"name": name, "type": "usb", "vendor_id": vendor_id, "product_id": product_id,
            "vendor": "Logitech", "product": "Receiver", "address": address, "port": port}


MOUSE = device("usb_1_2", "1:5", "1-2")
OTHER_MOUSE = device("usb_1_3", "1:6", "1-3")  # the same ids: two alike devices
KEYBOARD = device("usb_1_4", "1:7", "1-4", "04d9:0169")


def rule(rule_id: int, holder: Holder, match: Any, created: float = 0,
         enabled: bool = True) -> Rule:
    return Rule(rule_id, holder.domain, holder.uuid, match, enabled=enabled,
                created=created or float(rule_id))


def world(*devices: dict[str, Any], running: tuple[Holder, ...] = (WIN, LINUX),
          held: dict[str, Holder] | None = None) -> UsbWorld:
    return UsbWorld(list(devices), {h.uuid: h.domain for h in running}, held or {})


def summary(decisions: list[Any]) -> list[tuple[int, str, str, str | None]]:
    return [(d.rule.id, d.device["name"], d.action, d.other.domain if d.other else None)
            for d in decisions]


def test_a_rule_gets_every_present_matching_device_of_its_running_domain() -> None:
    rules = [rule(1, WIN, UsbIdMatch("046d", "c52b"))]
    assert summary(plan(rules, world(MOUSE, OTHER_MOUSE, KEYBOARD))) == [
        (1, "usb_1_2", "attach", None), (1, "usb_1_3", "attach", None)]
    # Held already: kept, not attached twice.
    assert summary(plan(rules, world(MOUSE, held={"1:5": WIN}))) == [
        (1, "usb_1_2", "keep", None)]
    # Shut off, or the rule switched off: nothing.
    assert plan(rules, world(MOUSE, running=(LINUX,))) == []
    assert plan([rule(1, WIN, UsbIdMatch("046d", "c52b"), enabled=False)], world(MOUSE)) == []


def test_a_port_rule_takes_whatever_is_plugged_into_its_port() -> None:
    rules = [rule(1, WIN, PortMatch("1-4"))]
    assert summary(plan(rules, world(MOUSE, KEYBOARD))) == [(1, "usb_1_4", "attach", None)]
    assert summary(plan(rules, world(device("usb_1_4", "1:9", "1-4", "0627:0001")))) == [
        (1, "usb_1_4", "attach", None)]


def test_of_two_rules_that_want_one_device_the_older_wins() -> None:
    older, younger = rule(1, LINUX, PortMatch("1-2")), rule(2, WIN, UsbIdMatch("046d", "c52b"))
    # Neither holds it: the older rule's domain gets it, whatever the order given.
    for rules in ([older, younger], [younger, older]):
        assert summary(plan(rules, world(MOUSE))) == [
            (1, "usb_1_2", "attach", None), (2, "usb_1_2", "lost", "linux")]
    # The younger rule's domain has it (it started first): the older rule takes it.
    assert summary(plan([older, younger], world(MOUSE, held={"1:5": WIN}))) == [
        (1, "usb_1_2", "attach", "win11"), (2, "usb_1_2", "lost", "linux")]
    # The older rule's domain is not running: the younger gets it.
    assert summary(plan([older, younger], world(MOUSE, running=(WIN,)))) == [
        (2, "usb_1_2", "attach", None)]


def test_a_device_held_by_hand_is_never_taken() -> None:
    rules = [rule(1, WIN, UsbIdMatch("046d", "c52b"))]
    assert summary(plan(rules, world(MOUSE, held={"1:5": LINUX}))) == [
        (1, "usb_1_2", "lost", "linux")]


def test_the_attached_hostdev_names_ids_and_address() -> None:
    assert usb_hostdev_xml(MOUSE) == (
        "<hostdev mode='subsystem' type='usb' managed='yes'><source><vendor id=\"0x046d\"/>"
        "<product id=\"0xc52b\"/><address bus=\"1\" device=\"5\"/></source></hostdev>")


def test_a_rule_that_gave_up_on_a_device_lets_a_younger_one_have_it() -> None:
    older, younger = rule(1, LINUX, PortMatch("1-2")), rule(2, WIN, UsbIdMatch("046d", "c52b"))
    assert summary(plan([older, younger], world(MOUSE), frozenset({(1, "1:5")}))) == [
        (2, "usb_1_2", "attach", None)]


def test_the_loser_is_told_which_older_rule_won() -> None:
    older, younger = rule(1, LINUX, PortMatch("1-2")), rule(2, WIN, UsbIdMatch("046d", "c52b"))
    lost = plan([older, younger], world(MOUSE))[1]
    assert (lost.action, lost.other, lost.winner) == ("lost", LINUX, older)
    # Held by hand: no winner rule, the holder is named.
    held = plan([younger], world(MOUSE, held={"1:5": LINUX}))[0]
    assert (held.action, held.other, held.winner) == ("lost", LINUX, None)


def test_the_rule_made_first_is_the_older_whatever_the_clock_said() -> None:
    first, second = rule(1, LINUX, UsbIdMatch("046d", "c52b"), created=2_000_000.0), rule(
        2, WIN, UsbIdMatch("046d", "c52b"), created=1_000_000.0)
    assert summary(plan([first, second], world(MOUSE)))[0] == (1, "usb_1_2", "attach", None)


def test_what_each_rule_holds_is_what_its_vm_holds_of_what_it_matches() -> None:
    """Whoever attached it (a rule, a person, libvirt at the VM's start), and whether or not
    the rule is on: what the MQTT bridge's "attached" sensor says."""
    rules = [rule(1, WIN, UsbIdMatch("046d", "c52b")), rule(2, LINUX, PortMatch("1-4")),
             rule(3, WIN, PortMatch("1-4"), enabled=False)]
    held = {"1:5": WIN, "1:6": LINUX, "1:7": WIN}
    assert holdings(rules, world(MOUSE, OTHER_MOUSE, KEYBOARD, held=held)) == {
        1: frozenset({"1:5"}), 2: frozenset(), 3: frozenset({"1:7"})}
