"""What Home Assistant sees of webvirt over MQTT: the topic layout, the discovery payloads and
the inventory of what was published. Pure: no I/O (webvirt/mqtt_bridge.py publishes them).

PREFIX is --mqtt-prefix (default webvirt), DISCOVERY is --mqtt-discovery-prefix (default
homeassistant), UUID a domain's UUID; with several libvirt hosts (--connect), HOST-UUID instead
(a VM copied to a second machine may keep its UUID). A domain's name never goes into a topic
or an id: it may hold characters a topic level or a Home Assistant object id cannot (/, +, #,
spaces, unicode), and a UUID survives a rename.

    PREFIX/status                        online / offline (retained; offline is the last will)
    PREFIX/host/HOST/status              online while webvirt is connected to that libvirt host
                                         (retained); a domain is available in Home Assistant
                                         while both its host's status and PREFIX/status are
    PREFIX/inventory                     what this webvirt has configs for (retained JSON:
                                         {"domains": {KEY: HOST}, "rules": [[KEY, ID]]}), to
                                         remove at the next connect what is gone meanwhile;
                                         an entry webvirt cannot have written is dropped
    PREFIX/echo/TOKEN                    private: a marker the bridge sends itself at connect
    PREFIX/UUID/state                    the state as GET /api/0/state says it, e.g. "shut off"
    PREFIX/UUID/power                    ON while the domain is active, else OFF (retained)
    PREFIX/UUID/set                      commands: ON (start), OFF (ACPI shutdown), FORCE_OFF,
                                         REBOOT, RESET; UUID may also be a name, if it is one
                                         topic level; a retained command is never obeyed
                                         (and is removed)
    PREFIX/UUID/error                    a command that failed: JSON {action, error, status,
                                         message} (not retained)
    PREFIX/UUID/rule/ID/attached         ON once USB rule ID attached its device, OFF when it
                                         failed, was detached or the domain stopped (retained)
    DISCOVERY/COMPONENT/NODE/OBJECT/config   Home Assistant discovery (retained), NODE being
                                         PREFIX's letters, "_" and the UUID

One Home Assistant device per domain, with a switch (power), a sensor (state), three buttons
(force off, reboot, reset) and a binary sensor per USB rule of the domain.
"""

from __future__ import annotations

import json
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any

from webvirt import __version__
from webvirt.config import HOST_NAME
from webvirt.domains import SEED_TEXT_BY_NAME

ON, OFF = "ON", "OFF"
ONLINE, OFFLINE = "online", "offline"
# States in which the domain runs a guest (the switch is on): OFF asks it to stop.
ACTIVE_STATES = frozenset({"running", "blocked", "paused", "shutdown", "pmsuspended"})
# Home Assistant object ids (and node ids): letters, digits, _ and -.
_NOT_ID = re.compile(r"[^A-Za-z0-9_-]")
MAX_TOPIC_BYTES = 65535  # MQTT's limit: paho refuses to publish to a longer topic
# What MqttBridge.key makes: a UUID as libvirt writes it, or HOST-UUID; rule ids are SQLite's.
_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_DOMAIN_KEY = re.compile(rf"(?:{HOST_NAME}-)?{_UUID}")
_HOST = re.compile(HOST_NAME)
MAX_RULE_ID = 2**63 - 1
# For a log line, what the broker sent: escaped (no newline), cut short, nested a few levels.
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 40

# A domain's entities: (component, object id, what differs from one to another).
BUTTONS = (
    ("force_off", "Force off", "FORCE_OFF", {"icon": "mdi:power-plug-off"}),
    ("reboot", "Reboot", "REBOOT", {"device_class": "restart"}),
    ("reset", "Reset", "RESET", {"icon": "mdi:restart-alert"}),
)
DOMAIN_OBJECTS = (("switch", "power"), ("sensor", "state"),
                  *(("button", object_id) for object_id, *_ in BUTTONS))


def state_text(state: str) -> str:
    return SEED_TEXT_BY_NAME.get(state) or state


def power(state: str) -> str:
    return ON if state in ACTIVE_STATES else OFF


@dataclass(frozen=True, slots=True)
class Layout:
    prefix: str = "webvirt"
    discovery_prefix: str = "homeassistant"

    # Topics.

    @property
    def status(self) -> str:
        return f"{self.prefix}/status"

    @property
    def commands(self) -> str:
        """The subscription that takes every domain's commands (and nothing else)."""
        return f"{self.prefix}/+/set"

    @property
    def home_assistant_status(self) -> str:
        return f"{self.discovery_prefix}/status"

    @property
    def inventory(self) -> str:
        return f"{self.prefix}/inventory"

    def echo(self, token: str) -> str:
        return f"{self.prefix}/echo/{token}"

    def host_status(self, host: str) -> str:
        return f"{self.prefix}/host/{host}/status"

    def state(self, uuid: str) -> str:
        return f"{self.prefix}/{uuid}/state"

    def power(self, uuid: str) -> str:
        return f"{self.prefix}/{uuid}/power"

    def command(self, uuid: str) -> str:
        return f"{self.prefix}/{uuid}/set"

    def error(self, ref: str) -> str:
        return f"{self.prefix}/{ref}/error"

    def attached(self, uuid: str, rule_id: int) -> str:
        return f"{self.prefix}/{uuid}/rule/{rule_id}/attached"

    def command_ref(self, topic: str) -> str | None:
        """The domain a command topic names (its one level between PREFIX and set)."""
        head, tail = f"{self.prefix}/", "/set"
        if not (topic.startswith(head) and topic.endswith(tail)):
            return None
        ref = topic[len(head):-len(tail)]
        # PREFIX/REF/error is published: one topic level, and not over MQTT's length limit.
        if not ref or any(c in ref for c in "/+#\0") or (
                len(self.error(ref).encode()) > MAX_TOPIC_BYTES):
            return None
        return ref

    def node(self, uuid: str) -> str:
        return f"{_NOT_ID.sub('_', self.prefix)}_{uuid}"

    def config(self, component: str, uuid: str, object_id: str) -> str:
        return f"{self.discovery_prefix}/{component}/{self.node(uuid)}/{object_id}/config"

    def domain_config_topics(self, uuid: str) -> list[str]:
        return [self.config(component, uuid, object_id)
                for component, object_id in DOMAIN_OBJECTS]

    def rule_config_topic(self, uuid: str, rule_id: int) -> str:
        return self.config("binary_sensor", uuid, f"usb_rule_{rule_id}")

    # Discovery payloads.

    def domain_configs(self, uuid: str, name: str, host: str) -> dict[str, dict[str, Any]]:
        """Config topic -> payload, for the domain's switch, sensor and buttons."""
        node = self.node(uuid)
        command = self.command(uuid)
        configs = {
            self.config("switch", uuid, "power"): {
                "name": "Power", "state_topic": self.power(uuid), "command_topic": command,
                "payload_on": ON, "payload_off": OFF, "icon": "mdi:power"},
            self.config("sensor", uuid, "state"): {
                "name": "State", "state_topic": self.state(uuid), "icon": "mdi:monitor"},
        }
        for object_id, label, payload, extra in BUTTONS:
            configs[self.config("button", uuid, object_id)] = {
                "name": label, "command_topic": command, "payload_press": payload, **extra}
        return {topic: self._entity(payload, uuid, name, host,
                                    f"{node}_{topic.split('/')[-2]}")
                for topic, payload in configs.items()}

    def rule_config(self, uuid: str, name: str, host: str, rule_id: int,
                    device: str) -> dict[str, Any]:
        return self._entity(
            {"name": f"USB rule {rule_id} attached ({device})",
             "state_topic": self.attached(uuid, rule_id), "payload_on": ON,
             "payload_off": OFF, "device_class": "plug"},
            uuid, name, host, f"{self.node(uuid)}_usb_rule_{rule_id}")

    def _entity(self, payload: dict[str, Any], uuid: str, name: str, host: str,
                unique_id: str) -> dict[str, Any]:
        return {
            **payload,
            "unique_id": unique_id,
            # Available while webvirt is online and sees the domain's libvirt host.
            "availability": [{"topic": topic, "payload_available": ONLINE,
                              "payload_not_available": OFFLINE}
                             for topic in (self.status, self.host_status(host))],
            "availability_mode": "all",
            "device": {"identifiers": [self.node(uuid)], "name": name,
                       "manufacturer": "libvirt", "model": "Virtual machine",
                       "sw_version": f"webvirt {__version__}"},
            "origin": {"name": "webvirt", "sw_version": __version__},
        }


@dataclass
class Inventory:
    """What the broker holds configs of, from this webvirt: domain key -> host name, and
    (domain key, rule id) of the rules' binary sensors. Retained on PREFIX/inventory."""

    domains: dict[str, str] = field(default_factory=dict)
    rules: set[tuple[str, int]] = field(default_factory=set)

    def payload(self) -> str:
        return json.dumps({"domains": dict(sorted(self.domains.items())),
                           "rules": sorted(self.rules)})

    @classmethod
    def load(cls, payload: Any) -> tuple[Inventory, list[str]]:
        """What was retained, and what of it was dropped (short texts to log). Whoever may
        publish under PREFIX can retain anything there, and the bridge publishes to topics
        made of these keys: only entries that webvirt can have written are kept (a key of
        "+" made every publish at connect fail, and the bridge reconnect for ever)."""
        short = _SHORT.repr
        try:
            data = json.loads(bytes(payload)) if payload else {}
        except (TypeError, ValueError, RecursionError):  # RecursionError: [[[[...
            return cls(), [f"all of it: not JSON ({short(payload)})"]
        if not isinstance(data, dict):
            return cls(), [f"all of it: not an object ({short(data)})"]
        inventory, dropped = cls(), []
        domains, rules = data.get("domains", {}), data.get("rules", [])
        if not isinstance(domains, dict):
            dropped.append(f"domains {short(domains)}")
            domains = {}
        if not isinstance(rules, list):
            dropped.append(f"rules {short(rules)}")
            rules = []
        for key, host in domains.items():
            if _DOMAIN_KEY.fullmatch(key) and isinstance(host, str) and _HOST.fullmatch(host):
                inventory.domains[key] = host
            else:
                dropped.append(f"domain {short(key)}: {short(host)}")
        for rule in rules:
            match rule:
                case [str(key), int(rule_id)] if (
                        _DOMAIN_KEY.fullmatch(key) and not isinstance(rule_id, bool)
                        and 0 < rule_id <= MAX_RULE_ID):
                    inventory.rules.add((key, rule_id))
                case _:
                    dropped.append(f"rule {short(rule)}")
        return inventory, dropped

    def forget(self, key: str, rules: set[tuple[str, int]]) -> None:
        self.domains.pop(key, None)
        self.rules -= rules

    def merge(self, other: Inventory) -> None:
        self.domains = {**other.domains, **self.domains}
        self.rules |= other.rules
