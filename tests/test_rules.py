"""USB rules, the pure part (webvirt/rules.py): what a rule body may be, and which device a
match means."""

from __future__ import annotations

from typing import Any

import pytest

from webvirt.rules import (
    PortMatch,
    Rule,
    RuleError,
    RuleSpec,
    UsbIdMatch,
    matches,
    parse_rule_body,
)

RECEIVER = {"type": "usb", "vendor_id": "046d", "product_id": "c52b", "port": "1-4.2",
            "serial": "ABC123"}
IDS = {"vendor_id": "046d", "product_id": "c52b"}

# (body, words the error must contain): every way a body can be wrong, each with an error
# that names the problem. tests/test_rules_api.py sends each of them too.
BAD_BODIES: list[tuple[Any, str]] = [
    ([], "must be a JSON object"),
    ("win11", "must be a JSON object"),
    (None, "must be a JSON object"),
    ({"match": IDS}, "missing key 'domain'"),
    ({"domain": "win11"}, "missing key 'match'"),
    ({"domain": "win11", "match": IDS, "id": 3}, "unknown key \"id\""),
    ({"domain": 7, "match": IDS}, "domain: must be"),
    ({"domain": "", "match": IDS}, "domain: must be"),
    ({"domain": "win\x0011", "match": IDS}, "domain: must be"),
    ({"domain": "win\ud80011", "match": IDS}, "domain: must be"),
    ({"domain": "win11", "match": "046d:c52b"}, "match: must be an object"),
    ({"domain": "win11", "match": {}}, "vendor_id is missing"),
    ({"domain": "win11", "match": {"vendor_id": "046d"}}, "product_id is missing"),
    ({"domain": "win11", "match": {**IDS, "port": "1-4"}}, "or port, not both"),
    ({"domain": "win11", "match": {"port": "1-4", "serial": "x"}}, "or port, not both"),
    ({"domain": "win11", "match": {**IDS, "bus": 1}}, "match.unknown key \"bus\""),
    ({"domain": "win11", "match": {**IDS, "vendor_id": "46d"}}, "match.vendor_id: must be 4"),
    ({"domain": "win11", "match": {**IDS, "vendor_id": "046g"}}, "match.vendor_id"),
    ({"domain": "win11", "match": {**IDS, "vendor_id": "046d\n"}}, "match.vendor_id"),
    ({"domain": "win11", "match": {**IDS, "vendor_id": 1133}}, "match.vendor_id"),
    ({"domain": "win11", "match": {**IDS, "product_id": "0xc52b5"}}, "match.product_id"),
    ({"domain": "win11", "match": {**IDS, "serial": ""}}, "match.serial"),
    ({"domain": "win11", "match": {**IDS, "serial": None}}, "match.serial"),
    ({"domain": "win11", "match": {**IDS, "serial": "a\nb"}}, "match.serial"),
    ({"domain": "win11", "match": {**IDS, "serial": "x" * 256}}, "match.serial"),
    ({"domain": "win11", "match": {"port": "1"}}, "match.port: must be a USB port path"),
    ({"domain": "win11", "match": {"port": "1-4."}}, "match.port"),
    ({"domain": "win11", "match": {"port": "a-4"}}, "match.port"),
    ({"domain": "win11", "match": {"port": "1-\u0664"}}, "match.port"),  # an Arabic-Indic 4
    ({"domain": "win11", "match": {"port": 14}}, "match.port"),
    ({"domain": "win11", "match": IDS, "enabled": "yes"}, "enabled: must be true or false"),
    ({"domain": "win11", "match": IDS, "enabled": 1}, "enabled: must be true or false"),
    ({"domain": "win11", "match": IDS, "persistent": None}, "persistent: must be true or false"),
    ({"domain": "win11", "match": IDS, "persistent": True}, "persistent: not supported"),
]


@pytest.mark.parametrize(("body", "problem"), BAD_BODIES)
def test_bad_bodies_are_refused_with_the_reason(body: Any, problem: str) -> None:
    with pytest.raises(RuleError) as refused:
        parse_rule_body(body)
    assert problem in str(refused.value)


def test_ids_are_kept_in_lower_case_without_0x() -> None:
    spec = parse_rule_body({"domain": "win11",
                            "match": {"vendor_id": "0x046D", "product_id": "C52B"}})
    assert spec == RuleSpec("win11", UsbIdMatch("046d", "c52b"), enabled=True, persistent=False)
    assert spec.match.as_dict() == IDS


def test_a_full_body() -> None:
    spec = parse_rule_body({"domain": "win11", "match": {**IDS, "serial": "ABC123"},
                            "enabled": False, "persistent": False})
    assert spec == RuleSpec("win11", UsbIdMatch("046d", "c52b", "ABC123"), False, False)
    assert spec.match.as_dict() == {**IDS, "serial": "ABC123"}


@pytest.mark.parametrize("port", ["1-4", "1-4.2", "12-1.2.3.4.5.6.7", "3-10"])
def test_port_matches(port: str) -> None:
    spec = parse_rule_body({"domain": "win11", "match": {"port": port}})
    assert spec.match == PortMatch(port)
    assert matches(spec.match, {**RECEIVER, "port": port})
    assert not matches(spec.match, {**RECEIVER, "port": port + "0"})


def test_a_match_by_ids_ignores_the_port_and_the_serial_unless_it_names_one() -> None:
    by_ids = UsbIdMatch("046d", "c52b")
    assert matches(by_ids, RECEIVER)
    assert matches(by_ids, {**RECEIVER, "port": "2-1", "serial": None})
    assert matches(by_ids, {**RECEIVER, "vendor_id": "0x046D"})  # however the device says it
    assert not matches(by_ids, {**RECEIVER, "product_id": "c52c"})
    assert not matches(by_ids, {**RECEIVER, "vendor_id": None})
    assert not matches(by_ids, {**RECEIVER, "type": "pci"})
    with_serial = UsbIdMatch("046d", "c52b", "ABC123")
    assert matches(with_serial, RECEIVER)
    assert not matches(with_serial, {**RECEIVER, "serial": "abc123"})
    assert not matches(with_serial, {**RECEIVER, "serial": None})


def test_the_older_rule_is_the_one_made_first_whatever_the_clock_said() -> None:
    def rule(rule_id: int, created: float) -> Rule:
        return Rule(rule_id, "win11", "uuid", PortMatch("1-4"), created=created)

    # Rule 3 was made last, after the clock had been stepped back.
    rules = [rule(3, 10.0), rule(1, 20.0), rule(2, 15.0)]
    assert [r.id for r in sorted(rules, key=lambda r: r.seniority)] == [1, 2, 3]
