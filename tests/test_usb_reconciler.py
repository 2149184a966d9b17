"""The reconciler's scheduling (retries, budgets, wakes, who gets a device) against a stand-in
for webvirt.host.Host whose world a test can change at will; libvirt itself is exercised on the
test driver (tests/test_usb_rules.py) and on the USB lab (tests/test_usb_rules_lab.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest

from tests.waiting import until
from webvirt import usb_reconciler
from webvirt.domain_cache import DomainEntry
from webvirt.errors import ApiError, CallTimeout, Conflict
from webvirt.hub import EventHub
from webvirt.rules import Rule, UsbIdMatch
from webvirt.usb_reconciler import (
    Holder,
    UsbReconciler,
    UsbWorld,
    attach_usb,
    detach_stale,
    detach_usb,
    read_usb_world,
)

WIN, LINUX = Holder("uuid-win", "win11"), Holder("uuid-linux", "linux")


def device(address: str, ids: str = "046d:c52b", port: str = "1-2") -> dict[str, Any]:
    vendor_id, product_id = ids.split(":")
    return {"name": f"usb_{address.replace(':', '_')}", "type": "usb",
            "vendor_id": vendor_id, "product_id": product_id, "vendor": "V", "product": "P",
            "address": address, "port": port, "serial": None}


class FakeRules:
    def __init__(self, rules: list[Rule]):
        self.rules = rules
        self.listeners: list[Any] = []

    async def list(self) -> list[Rule]:
        return list(self.rules)


class FakeHost:
    """Just enough of webvirt.host.Host for the reconciler: a world it can change."""

    def __init__(self, devices: list[dict[str, Any]], running: tuple[Holder, ...]):
        self.connected, self.local = True, False
        self.said = ""  # one host: log lines name none
        self.devices = devices
        self.running = {h.uuid: h.domain for h in running}
        self.held: dict[str, str] = {}  # address -> uuid
        self.attach_failures: dict[str, int] = {}  # uuid -> failures still to come (-1: always)
        self.read_failures = 0
        self.attaches: list[tuple[str, str]] = []
        self._busy: set[str] = set()

    @contextlib.contextmanager
    def exclusive(self, entry: DomainEntry) -> Iterator[None]:
        if entry.uuid in self._busy:
            raise Conflict("busy")
        self._busy.add(entry.uuid)
        try:
            yield
        finally:
            self._busy.discard(entry.uuid)

    async def call(self, fn: partial[Any], seconds: float | None = None) -> Any:
        await asyncio.sleep(0.01)  # a round trip
        kw = fn.keywords
        if fn.func is read_usb_world:
            if self.read_failures:
                self.read_failures -= 1
                raise CallTimeout("libvirt did not answer")
            held = {a: Holder(u, self.running[u]) for a, u in self.held.items()
                    if u in self.running}
            return UsbWorld([dict(d) for d in self.devices], dict(self.running), held)
        if fn.func is attach_usb:
            left = self.attach_failures.get(kw["uuid"], 0)
            if left:
                self.attach_failures[kw["uuid"]] = left - 1 if left > 0 else -1
                raise ApiError("unsupported configuration: no USB controller", status=422)
            if kw["uuid"] not in self.running:
                raise ApiError("domain is not running", status=409)
            self.held[kw["device"]["address"]] = kw["uuid"]
            self.attaches.append((kw["uuid"], kw["device"]["address"]))
            return None
        if fn.func is detach_usb:
            self.held.pop(kw["address"], None)
            return None
        if fn.func is detach_stale:
            return False
        raise AssertionError(fn)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(usb_reconciler, "ATTACH_RETRY_S", 0.02)
    monkeypatch.setattr(usb_reconciler, "BUSY_RETRY_S", 0.02)


async def settled(reconciler: UsbReconciler) -> None:
    await until(lambda: reconciler.idle, 5, "the reconciler is idle")


def rule(rule_id: int, holder: Holder, created: float | None = None) -> Rule:
    return Rule(rule_id, holder.domain, holder.uuid, UsbIdMatch("046d", "c52b"),
                created=float(rule_id) if created is None else created)


async def test_an_older_rule_libvirt_keeps_refusing_lets_the_younger_one_have_it() -> None:
    """linux's rule is older but linux cannot take the device (e.g. its USB controller is
    model='none'): win11's younger rule gets it rather than nobody, and is not told a lie."""
    host = FakeHost([device("1:5")], running=(WIN, LINUX))
    host.attach_failures[LINUX.uuid] = -1
    hub = EventHub()
    rules = FakeRules([rule(1, LINUX), rule(2, WIN)])
    reconciler = UsbReconciler(host, hub, rules)  # type: ignore[arg-type]
    events: list[dict[str, Any]] = []
    hub.listen(lambda e: events.append(e) if e["type"] == "rule" else None)
    reconciler.wake()
    await settled(reconciler)
    assert host.held.get("1:5") == WIN.uuid
    # While linux's rule still tries, win11's hears it goes to linux by the older rule (not
    # that linux holds it); then linux's rule gives up, and win11 gets it.
    assert [(e["rule"], e["result"]) for e in events] == [(2, "error"), (1, "error"),
                                                          (2, "ok")]
    assert "by rule 1, which is older" in events[0]["error"]
    await reconciler.close()


async def test_a_restart_of_the_domain_gives_its_rule_a_new_budget() -> None:
    """Six failed attaches (the guest was not ready), then the guest restarts: its next
    failure is tried again."""
    host = FakeHost([device("1:5")], running=(WIN,))
    host.attach_failures[WIN.uuid] = usb_reconciler.ATTACH_ATTEMPTS
    hub = EventHub()
    reconciler = UsbReconciler(host, hub, FakeRules([rule(1, WIN)]))  # type: ignore[arg-type]
    reconciler.wake()
    await settled(reconciler)
    assert host.held == {}
    host.attach_failures[WIN.uuid] = 1  # fails once more; a retry succeeds
    hub.publish("lifecycle", domain="win11", uuid=WIN.uuid, event="started", detail="booted",
                state="running")
    await settled(reconciler)
    assert host.held.get("1:5") == WIN.uuid
    await reconciler.close()


async def test_a_plug_during_a_failed_pass_is_handled_by_the_next_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(usb_reconciler, "FAILED_PASS_RETRY_S", 0.05)
    host = FakeHost([], running=(WIN,))
    host.read_failures = 1  # a slow daemon: the world read times out
    hub = EventHub()
    reconciler = UsbReconciler(host, hub, FakeRules([rule(1, WIN)]))  # type: ignore[arg-type]
    reconciler.wake()
    await asyncio.sleep(0)
    host.devices.append(device("1:5"))
    hub.publish("node-device-added", device="usb_1_5", device_type="usb")
    await settled(reconciler)
    assert host.held.get("1:5") == WIN.uuid
    await reconciler.close()


async def test_when_the_winner_stops_the_younger_rule_gets_the_device() -> None:
    host = FakeHost([device("1:5")], running=(WIN, LINUX))
    hub = EventHub()
    reconciler = UsbReconciler(host, hub,  # type: ignore[arg-type]
                               FakeRules([rule(1, LINUX), rule(2, WIN)]))
    reconciler.wake()
    await settled(reconciler)
    assert host.held == {"1:5": LINUX.uuid}
    del host.running[LINUX.uuid]  # linux shuts down: libvirt frees the device
    host.held.clear()
    hub.publish("lifecycle", domain="linux", uuid=LINUX.uuid, event="stopped",
                detail="shutdown", state="shutoff")
    await settled(reconciler)
    assert host.held.get("1:5") == WIN.uuid
    await reconciler.close()


async def test_with_several_hosts_a_reconciler_keeps_to_its_hosts_rules_and_events() -> None:
    """Host b's reconciler: a rule for win11@a is not its own even though a domain with that
    UUID runs on b (two copies of one host); its rule for linux@b is, and its events name b.
    Another host's events do not wake it."""
    host = FakeHost([device("1:5"), device("1:6", "1234:5678")], running=(WIN, LINUX))
    hub = EventHub()
    on_a = Rule(1, "win11@a", WIN.uuid, UsbIdMatch("046d", "c52b"), created=1.0)
    on_b = Rule(2, "linux@b", LINUX.uuid, UsbIdMatch("1234", "5678"), created=2.0)
    # Made while webvirt had one host: the first host's (a), not b's copy of win11.
    bare = Rule(3, "win11", WIN.uuid, UsbIdMatch("046d", "c52b"), created=3.0)
    reconciler = UsbReconciler(host, hub, FakeRules([on_a, on_b, bare]),  # type: ignore[arg-type]
                               {"host": "b"}, first=False)
    events: list[dict[str, Any]] = []
    hub.listen(lambda e: events.append(e) if e["type"] == "rule" else None)
    reconciler.wake()
    await settled(reconciler)
    assert host.attaches == [(LINUX.uuid, "1:6")]
    assert [(e["rule"], e["domain"], e["host"]) for e in events] == [(2, "linux", "b")]
    passes = reconciler.passes
    hub.publish("node-device-added", device_type="usb", host="a")
    assert reconciler.idle and reconciler.passes == passes
    hub.publish("node-device-added", device_type="usb", host="b")
    assert not reconciler.idle
    await settled(reconciler)
    await reconciler.close()


class GatedHost(FakeHost):
    """Holds a pass just after it has read the world, until the test opens the gate."""

    def __init__(self, devices: list[dict[str, Any]], running: tuple[Holder, ...]):
        super().__init__(devices, running)
        self.gate: asyncio.Event | None = None
        self.reached = asyncio.Event()

    async def call(self, fn: partial[Any], seconds: float | None = None) -> Any:
        answer = await super().call(fn, seconds)
        if fn.func is read_usb_world and self.gate is not None:
            self.reached.set()
            await self.gate.wait()
        return answer


async def test_what_the_rules_hold_is_told_unless_a_change_came_after_the_read() -> None:
    """The MQTT bridge's "attached" sensor takes each pass's reading. A reading taken before a
    VM stopped, told after the stop's event, turned the sensor back ON."""
    host = GatedHost([device("1:5")], running=(WIN,))
    host.held["1:5"] = WIN.uuid
    hub = EventHub()
    reconciler = UsbReconciler(host, hub, FakeRules([rule(1, WIN)]))  # type: ignore[arg-type]
    told: list[dict[int, frozenset[str]]] = []
    reconciler.holding_listeners.append(told.append)
    reconciler.wake()
    await settled(reconciler)
    assert told == [{1: frozenset({"1:5"})}]
    host.gate = asyncio.Event()
    hub.publish("node-device-added", device_type="usb")  # a pass reads: win11 holds 1:5
    await until(host.reached.is_set, 5, "the pass read the world")
    del host.running[WIN.uuid]  # then win11 stops
    hub.publish("state", domain="win11", uuid=WIN.uuid, state="shutoff", previous="running")
    host.gate.set()
    await settled(reconciler)
    assert told == [{1: frozenset({"1:5"})}, {1: frozenset()}]
    await reconciler.close()


async def test_a_device_attached_or_detached_by_hand_is_read_at_once() -> None:
    """libvirt's device-added and device-removed (the API, virsh) change what the rules hold:
    a pass reads it then, not at the next periodic one."""
    host = FakeHost([device("1:5"), device("1:6", "1234:5678")], running=(WIN,))
    hub = EventHub()
    reconciler = UsbReconciler(host, hub, FakeRules([rule(1, WIN)]))  # type: ignore[arg-type]
    other = Rule(2, WIN.domain, WIN.uuid, UsbIdMatch("1234", "5678"), created=2.0,
                 enabled=False)
    reconciler.rules.rules.append(other)  # type: ignore[union-attr]
    told: list[dict[int, frozenset[str]]] = []
    reconciler.holding_listeners.append(told.append)
    reconciler.wake()
    await settled(reconciler)
    assert told[-1] == {1: frozenset(), 2: frozenset()}  # then rule 1 attached 1:5
    host.held["1:6"] = WIN.uuid  # attached by hand
    hub.publish("device-added", domain="win11", uuid=WIN.uuid, device="hostdev1")
    await settled(reconciler)
    assert told[-1] == {1: frozenset({"1:5"}), 2: frozenset({"1:6"})}
    await reconciler.close()
