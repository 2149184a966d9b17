"""USB rules: which host USB device belongs to which domain. Pure: parsing, checking and
matching, no I/O. webvirt/rules_store.py keeps rules; the reconciler acts on them.

A rule's match is one of two kinds: the device's USB ids, `{"vendor_id": "046d",
"product_id": "c52b"}`, optionally with its `"serial"` (to tell two alike devices apart), or
the port it is plugged into, `{"port": "1-4.2"}` (the kernel's bus-port.port path, as in
/sys/bus/usb/devices). Ids are 4 hexadecimal digits; "0x046d" is accepted too, as libvirt's
XML and `lsusb -v` write them, and both are kept as "046d" (lower case, no prefix).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# The JSON Schema patterns the API documents; checked here with fullmatch.
HEX_ID_PATTERN = r"^(?:0[xX])?[0-9a-fA-F]{4}$"
# Bus, then up to 7 ports (USB allows at most 5 hubs between a root port and a device).
PORT_PATTERN = r"^[0-9]{1,3}-[0-9]{1,3}(?:\.[0-9]{1,3}){0,6}$"
SERIAL_PATTERN = r"^[^\x00-\x1f\x7f]+$"
SERIAL_MAX_LENGTH = 255
# libvirt takes names as C strings.
DOMAIN_PATTERN = r"^[^\x00]+$"

_HEX_ID = re.compile(HEX_ID_PATTERN)
_PORT = re.compile(PORT_PATTERN)
_SERIAL = re.compile(SERIAL_PATTERN)
_DOMAIN = re.compile(DOMAIN_PATTERN)

RULE_KEYS = ("domain", "match", "enabled", "persistent")
ID_KEYS = ("vendor_id", "product_id", "serial")
MATCH_SHAPES = '{"vendor_id": "046d", "product_id": "c52b"} (optionally with "serial") ' \
               'or {"port": "1-4.2"}'


class RuleError(ValueError):
    """A rule that cannot be: the message names the key and what is wrong with it."""


@dataclass(frozen=True, slots=True)
class UsbIdMatch:
    """The device with these USB ids (and this serial, when given), on any port."""

    vendor_id: str
    product_id: str
    serial: str | None = None

    def as_dict(self) -> dict[str, str]:
        ids = {"vendor_id": self.vendor_id, "product_id": self.product_id}
        return ids if self.serial is None else {**ids, "serial": self.serial}


@dataclass(frozen=True, slots=True)
class PortMatch:
    """Whatever device is plugged into this port."""

    port: str

    def as_dict(self) -> dict[str, str]:
        return {"port": self.port}


Match = UsbIdMatch | PortMatch


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """A rule as a client asks for it: before it has an id, with the domain as given."""

    domain: str
    match: Match
    enabled: bool = True
    persistent: bool = False


@dataclass(frozen=True, slots=True)
class Rule:
    """A kept rule. `domain` is the domain's name, `domain_uuid` what it meant when the rule
    was made or last replaced (it outlives a rename). `persistent` is kept for a later
    version and always false (see parse_rule_body). Of two rules that want one device, the
    older wins: see `seniority`."""

    id: int
    domain: str
    domain_uuid: str
    match: Match
    enabled: bool = True
    persistent: bool = False
    created: float = field(default_factory=time.time)

    @property
    def seniority(self) -> int:
        """Sorts the older rule first: by id, which only grows (the wall clock may step
        back, e.g. after an NTP correction or on a board without a clock)."""
        return self.id

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "domain": self.domain, "domain_uuid": self.domain_uuid,
                "match": self.match.as_dict(), "enabled": self.enabled,
                "persistent": self.persistent, "created": self.created}


def parse_rule_body(body: object) -> RuleSpec:
    """A rule from a request body (parsed JSON); RuleError says what is wrong."""
    if not isinstance(body, dict):
        raise RuleError('the body must be a JSON object: {"domain": "win11", "match": '
                        f"{MATCH_SHAPES}, optional \"enabled\" and \"persistent\"}}")
    _no_unknown_keys(body, RULE_KEYS, "")
    for key in ("domain", "match"):
        if key not in body:
            raise RuleError(f"missing key {key!r}")
    domain = body["domain"]
    if not isinstance(domain, str) or not _DOMAIN.fullmatch(domain) or not _is_text(domain):
        raise RuleError("domain: must be the domain's name or UUID: non-empty text without "
                        "NUL characters")
    if _flag(body, "persistent", False):
        # A USB hostdev in the saved definition is claimed by libvirt at start: the VM then
        # fails to start while another VM holds the device, or when two alike devices are
        # plugged, and libvirt cannot save a port at all. The reconciler attaches at every
        # start instead.
        raise RuleError("persistent: not supported: webvirt attaches the device at every "
                        "start of the VM; saved in its definition, the device would keep the "
                        "VM from starting while another VM holds it")
    return RuleSpec(domain=domain, match=parse_match(body["match"]),
                    enabled=_flag(body, "enabled", True))


def parse_match(value: object) -> Match:
    """A match from its JSON form, normalised (ids in lower case, no 0x)."""
    if not isinstance(value, dict):
        raise RuleError(f"match: must be an object: {MATCH_SHAPES}")
    _no_unknown_keys(value, (*ID_KEYS, "port"), "match.")
    if "port" in value:
        if value.keys() & set(ID_KEYS):
            raise RuleError("match: give vendor_id and product_id, or port, not both")
        port = value["port"]
        if not isinstance(port, str) or not _PORT.fullmatch(port):
            raise RuleError('match.port: must be a USB port path like "1-4.2" (bus, a dash, '
                            f"then ports joined by dots), not {_show(port)}")
        return PortMatch(port)
    for key in ("vendor_id", "product_id"):
        if key not in value:
            raise RuleError(f"match: needs vendor_id and product_id, or port; {key} is missing")
    return UsbIdMatch(_hex_id(value, "vendor_id"), _hex_id(value, "product_id"),
                      _serial(value["serial"]) if "serial" in value else None)


def matches(match: Match, device: Mapping[str, Any]) -> bool:
    """Whether a host USB device, as {"type": "usb", "vendor_id", "product_id", "port",
    "serial", ...}, is the one the match means. The serial counts only when the match has one."""
    if device.get("type") != "usb":
        return False
    if isinstance(match, PortMatch):
        return device.get("port") == match.port
    return (normal_id(device.get("vendor_id")) == match.vendor_id
            and normal_id(device.get("product_id")) == match.product_id
            and (match.serial is None or device.get("serial") == match.serial))


def normal_id(value: object) -> str | None:
    """A USB vendor or product id as rules keep it ("046d"), or None if it is not one."""
    if not isinstance(value, str) or not _HEX_ID.fullmatch(value):
        return None
    return value[-4:].lower()


def _hex_id(match: Mapping[str, object], key: str) -> str:
    value = normal_id(match[key])
    if value is None:
        raise RuleError(f'match.{key}: must be 4 hexadecimal digits like "046d" (or '
                        f'"0x046d"), not {_show(match[key])}')
    return value


def _serial(value: object) -> str:
    if not (isinstance(value, str) and _SERIAL.fullmatch(value)
            and len(value) <= SERIAL_MAX_LENGTH and _is_text(value)):
        raise RuleError(f"match.serial: must be text of 1 to {SERIAL_MAX_LENGTH} characters "
                        f"without control characters, not {_show(value)}")
    return value


def _flag(body: Mapping[str, object], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise RuleError(f"{key}: must be true or false, not {_show(value)}")
    return value


def _no_unknown_keys(value: Mapping[str, object], known: tuple[str, ...], prefix: str) -> None:
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise RuleError(f"{prefix}unknown key {_show(unknown[0])}; known: {', '.join(known)}")


def _is_text(value: str) -> bool:
    # JSON may carry lone surrogates (\ud800), which no UTF-8 file or C string can.
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _show(value: object) -> str:
    """A JSON value for an error message, cut short."""
    if isinstance(value, dict | list):
        return "an object" if isinstance(value, dict) else "an array"
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
