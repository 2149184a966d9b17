"""Keeps the right USB devices in the right running domains.

Two jobs, one loop:
- Rules (webvirt/rules.py): "while domain D runs, it holds every present host USB device that
  matches M". What is missing is attached, by vendor/product and the bus/device address the
  device has now (so two alike devices are told apart). When two running domains' rules want
  one device, the older rule wins and the loser is reported.
- Stale entries: libvirt leaves a USB hostdev in a running domain when its device is unplugged,
  pointing at an address no device has any more (a replug gets a new one, and a second attach
  would leave two). They are detached, and a `detach` event (reason "unplugged") says so.

A reconciler, not a pile of callbacks: every trigger (a USB plug or unplug, a domain start, a
reconnect, a rule change, webvirt's own start) asks for a pass, and a pass compares what the
rules want with what the running domains hold, read fresh from libvirt in one call. Passes run
one at a time; triggers during a pass ask for one more. A failed attach is tried again a few
times within about 3 s (udev and libvirt need a moment after a plug). It consumes the hub's
events and acts through the host, like any other caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, Protocol
from xml.sax.saxutils import quoteattr

import libvirt

from webvirt import device_xml
from webvirt.domain_cache import DomainEntry
from webvirt.errors import ApiError, Conflict
from webvirt.host import Host
from webvirt.host_devices import Description, read_node_devices
from webvirt.hub import EventHub
from webvirt.rules import Rule, matches

log = logging.getLogger(__name__)
BUSY_RETRY_S = 0.5  # a domain busy with another operation is tried again after this
# libvirt attaches a USB device found in sysfs, and its node-device list learns of the device
# from udev a moment later: an entry is stale only if its address is still absent after this.
SETTLE_S = 1.0
ATTACH_ATTEMPTS = 6
ATTACH_RETRY_S = 0.5


class RuleSource(Protocol):
    """Where the rules come from (webvirt.rules_store.RuleStore)."""

    listeners: list[Any]

    async def list(self) -> Sequence[Rule]: ...


@dataclass(frozen=True, slots=True)
class StaleHostdev:
    uuid: str
    domain: str
    hostdev: dict[str, Any]  # as device_xml.hostdevs describes it


@dataclass(frozen=True, slots=True)
class Holder:
    uuid: str
    domain: str


@dataclass(frozen=True, slots=True)
class UsbWorld:
    """What a pass works from: read in one call."""

    devices: list[Description]  # present USB devices that can be passed (root hubs cannot)
    running: dict[str, str]  # UUID -> name of each running (or paused) domain
    held: dict[str, Holder]  # USB address -> the running domain whose live definition has it
    stale: list[StaleHostdev] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Decision:
    """What one rule gets of one device in a pass."""

    rule: Rule
    device: Description
    action: Literal["attach", "keep", "lost"]
    # attach: the domain of a younger rule it is taken from; lost: the domain that has it.
    other: Holder | None = None


def plan(rules: Sequence[Rule], world: UsbWorld) -> list[Decision]:
    """Pure: what each enabled rule of a running domain gets, the older rule first."""
    enabled = sorted((r for r in rules if r.enabled), key=lambda r: r.seniority)
    decisions: list[Decision] = []
    claimed: dict[str, Holder] = {}  # address -> who has it after this pass
    for rule in enabled:
        if rule.domain_uuid not in world.running:
            continue
        me = Holder(rule.domain_uuid, world.running[rule.domain_uuid])
        for device in world.devices:
            if not matches(rule.match, device):
                continue
            address = device["address"]
            holder = claimed.get(address) or world.held.get(address)
            if holder is None:
                decisions.append(Decision(rule, device, "attach"))
            elif holder.uuid == me.uuid:
                decisions.append(Decision(rule, device, "keep"))
            elif address not in claimed and _by_younger_rule(holder, device, rule, enabled):
                decisions.append(Decision(rule, device, "attach", other=holder))
            else:
                decisions.append(Decision(rule, device, "lost", other=holder))
                claimed[address] = holder
                continue
            claimed[address] = me
    return decisions


def _by_younger_rule(holder: Holder, device: Description, rule: Rule,
                     rules: Sequence[Rule]) -> bool:
    """Whether the holder has the device by a rule younger than `rule` (then it yields it);
    a device a domain holds by hand, or by an older rule, is never taken."""
    own = [r for r in rules if r.domain_uuid == holder.uuid and matches(r.match, device)]
    return bool(own) and min(r.seniority for r in own) > rule.seniority


class UsbReconciler:
    __slots__ = ("_attempts", "_pending", "_reported", "_saved", "_stop_listening", "_task",
                 "_waiting", "host", "hub", "passes", "rules")

    def __init__(self, host: Host, hub: EventHub, rules: RuleSource | None = None):
        self.host = host
        self.hub = hub
        self.rules = rules
        self._pending = False
        self._task: asyncio.Task[None] | None = None
        self._waiting: set[asyncio.TimerHandle] = set()  # passes asked for later (retries)
        self.passes = 0  # passes done, for tests and logs
        # (rule id, device address) -> failed attaches so far; and losses already reported.
        self._attempts: dict[tuple[int, str], int] = {}
        self._reported: set[tuple[int, str]] = set()
        self._saved: set[tuple[int, str]] = set()  # persistent rules' devices saved
        self._stop_listening = hub.listen(self._on_event)
        if rules is not None:
            rules.listeners.append(self._on_rule_change)

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if ((kind in ("node-device-added", "node-device-removed")
             and event.get("device_type") == "usb")
                or (kind == "connection" and event.get("state") == "restored")
                or (kind == "lifecycle" and event.get("event") in ("started", "resumed"))):
            self.wake()

    def _on_rule_change(self, _change: str, _rule: Rule) -> None:
        self.wake()

    def wake(self) -> None:
        """Asks for a pass; passes asked for while one runs are done as one more."""
        self._pending = True
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def _wake_later(self, seconds: float) -> None:
        def wake() -> None:
            self._waiting.discard(handle)
            self.wake()

        handle = asyncio.get_running_loop().call_later(seconds, wake)
        self._waiting.add(handle)

    @property
    def idle(self) -> bool:
        """No pass runs, none is asked for, none will be by a retry."""
        return not self._pending and not self._waiting and (
            self._task is None or self._task.done())

    async def close(self) -> None:
        self._stop_listening()
        for handle in self._waiting:
            handle.cancel()
        if self.rules is not None:
            with contextlib.suppress(ValueError):
                self.rules.listeners.remove(self._on_rule_change)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while self._pending:
            self._pending = False
            if not self.host.connected:
                return  # the reconnect's "restored" asks again
            try:
                await self._pass()
                self.passes += 1
            except ApiError as err:
                log.warning("USB reconciliation failed: %s", err.detail)
                return
            except Exception:  # a bug here must not end reconciling for good
                log.exception("USB reconciliation failed")
                return

    async def _pass(self) -> None:
        world = await self.host.call(partial(read_usb_world, local=self.host.local))
        self._forget_unplugged({d["address"] for d in world.devices})
        if world.stale:
            await asyncio.sleep(SETTLE_S)
            for item in world.stale:
                await self._detach_stale(item)
        if self.rules is None:
            return
        for decision in plan(await self.rules.list(), world):
            if decision.action == "attach":
                await self._attach(decision)
            elif decision.action == "lost":
                self._report_loss(decision)
            elif decision.rule.persistent:
                await self._save(decision)

    def _forget_unplugged(self, present: set[str]) -> None:
        """What is kept per (rule, device address) ends with the plug: a replug is a new
        address, so nothing here grows over weeks of plugs."""
        self._attempts = {k: v for k, v in self._attempts.items() if k[1] in present}
        self._reported = {k for k in self._reported if k[1] in present}
        self._saved = {k for k in self._saved if k[1] in present}

    # Rules.

    async def _attach(self, decision: Decision) -> None:
        rule, device, taken_from = decision.rule, decision.device, decision.other
        key = (rule.id, device["address"])
        entry = DomainEntry(rule.domain_uuid, rule.domain, "running")
        try:
            with self.host.exclusive(entry):
                if taken_from is not None:
                    await self.host.call(partial(detach_usb, uuid=taken_from.uuid,
                                                 address=device["address"]))
                    self._publish(rule, device, "detach", domain=taken_from, result="ok",
                                  reason=f"rule {rule.id} of {rule.domain} is older")
                await self.host.call(partial(attach_usb, uuid=rule.domain_uuid, device=device,
                                             persistent=rule.persistent))
        except Conflict:
            self._wake_later(BUSY_RETRY_S)
            return
        except ApiError as err:
            attempts = self._attempts[key] = self._attempts.get(key, 0) + 1
            if attempts < ATTACH_ATTEMPTS:
                log.debug("rule %d: attach %s failed (%s); trying again", rule.id,
                          device["name"], err.detail)
                self._wake_later(ATTACH_RETRY_S)
            elif attempts == ATTACH_ATTEMPTS:
                log.warning("rule %d: could not attach %s to %s: %s", rule.id, device["name"],
                            rule.domain, err.detail)
                self._publish(rule, device, "attach", result="error", error=err.detail)
            return
        self._attempts.pop(key, None)
        if rule.persistent:
            self._saved.add(key)
        log.info("rule %d: attached %s (%s:%s, port %s) to %s", rule.id, device["name"],
                 device["vendor_id"], device["product_id"], device["port"], rule.domain)
        self._publish(rule, device, "attach", result="ok")

    async def _save(self, decision: Decision) -> None:
        """A persistent rule's device, held already (e.g. an attach whose saving failed, or a
        rule made persistent later), goes into the saved definition too: once per plug."""
        rule, device = decision.rule, decision.device
        key = (rule.id, device["address"])
        if key in self._saved:
            return
        try:
            await self.host.call(partial(save_usb, uuid=rule.domain_uuid, device=device))
        except ApiError as err:
            log.warning("rule %d: could not save %s in %s's definition: %s", rule.id,
                        device["name"], rule.domain, err.detail)
        self._saved.add(key)  # tried: not again at every pass

    def _report_loss(self, decision: Decision) -> None:
        rule, device, holder = decision.rule, decision.device, decision.other
        assert holder is not None
        key = (rule.id, device["address"])
        if key in self._reported:
            return
        self._reported.add(key)
        error = f"{device['name']} is held by {holder.domain}"
        log.warning("rule %d: %s wants %s, but %s", rule.id, rule.domain, device["name"], error)
        self._publish(rule, device, "attach", result="error", error=error)

    def _publish(self, rule: Rule, device: Description, action: str,
                 domain: Holder | None = None, **fields: Any) -> None:
        self.hub.publish(
            "rule", rule=rule.id, domain=domain.domain if domain else rule.domain,
            uuid=domain.uuid if domain else rule.domain_uuid, device=device["name"],
            vendor_id=device["vendor_id"], product_id=device["product_id"],
            vendor=device["vendor"], product=device["product"], port=device["port"],
            address=device["address"], action=action, **fields)

    # Stale entries.

    async def _detach_stale(self, item: StaleHostdev) -> None:
        entry = DomainEntry(item.uuid, item.domain, "running")
        hostdev = item.hostdev
        event = {"domain": item.domain, "uuid": item.uuid, "device": hostdev["alias"],
                 "vendor_id": hostdev.get("vendor_id"),
                 "product_id": hostdev.get("product_id"), "address": hostdev["address"],
                 "reason": "unplugged"}
        try:
            with self.host.exclusive(entry):
                detached = await self.host.call(partial(
                    detach_stale, uuid=item.uuid, alias=hostdev["alias"],
                    address=hostdev["address"]))
        except Conflict:
            self._wake_later(BUSY_RETRY_S)
            return
        except ApiError as err:
            log.warning("could not detach stale USB device %s (was %s) from %s: %s",
                        hostdev["alias"], hostdev["address"], item.domain, err.detail)
            self.hub.publish("detach", **event, result="error", error=err.detail)
            return
        if detached:
            log.info("detached stale USB device %s (was %s, unplugged) from %s",
                     hostdev["alias"], hostdev["address"], item.domain)
            self.hub.publish("detach", **event, result="ok")


# Blocking helpers; each runs on a connection's thread.

def present_usb_devices(conn: libvirt.virConnect, local: bool = False) -> list[Description]:
    flags = libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_USB_DEV
    return [d for d in read_node_devices(conn, flags, local) if d["type"] == "usb"]


def read_usb_world(conn: libvirt.virConnect, local: bool) -> UsbWorld:
    devices = present_usb_devices(conn, local)
    present = {d["address"] for d in devices}
    running: dict[str, str] = {}
    held: dict[str, Holder] = {}
    stale = []
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        uuid, name = dom.UUIDString(), dom.name()
        running[uuid] = name
        for hostdev in device_xml.hostdevs(dom.XMLDesc()):
            if hostdev["type"] != "usb" or not hostdev["address"]:
                continue
            if hostdev["address"] in present:
                held[hostdev["address"]] = Holder(uuid, name)
            elif hostdev["alias"]:
                stale.append(StaleHostdev(uuid, name, hostdev))
    # libvirt names a root hub usb_usbN (the kernel's usbN): it cannot be passed through.
    passable = [d for d in devices if not d["name"].startswith("usb_usb")]
    return UsbWorld(passable, running, held, stale)


def usb_hostdev_xml(device: Description, *, address: bool = True) -> str:
    """A USB hostdev for this device: its ids and, live, the address it has now (libvirt then
    finds it by both, so two alike devices are told apart). Saved without the address (it
    changes at every plug) and optional at start (the device may be absent then)."""
    vendor, product = quoteattr("0x" + device["vendor_id"]), quoteattr("0x" + device["product_id"])
    if address:
        bus, number = device["address"].split(":")
        where, policy = f"<address bus={quoteattr(bus)} device={quoteattr(number)}/>", ""
    else:
        where, policy = "", " startupPolicy='optional'"
    return (f"<hostdev mode='subsystem' type='usb' managed='yes'><source{policy}>"
            f"<vendor id={vendor}/><product id={product}/>{where}</source></hostdev>")


def attach_usb(conn: libvirt.virConnect, uuid: str, device: Description,
               persistent: bool) -> None:
    dom = conn.lookupByUUIDString(uuid)
    if not any(h["type"] == "usb" and h["address"] == device["address"]
               for h in device_xml.hostdevs(dom.XMLDesc())):  # never twice
        dom.attachDeviceFlags(usb_hostdev_xml(device), libvirt.VIR_DOMAIN_AFFECT_LIVE)
    if persistent:
        save_usb(conn, uuid, device)


def save_usb(conn: libvirt.virConnect, uuid: str, device: Description) -> None:
    """Into the saved definition (of a persistent domain), unless it names the device."""
    dom = conn.lookupByUUIDString(uuid)
    saved = usb_hostdev_xml(device, address=False)
    if dom.isPersistent() and not device_xml.has_device(
            dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), saved):
        dom.attachDeviceFlags(saved, libvirt.VIR_DOMAIN_AFFECT_CONFIG)


def detach_usb(conn: libvirt.virConnect, uuid: str, address: str) -> None:
    """Detaches, live, the USB hostdev at this address."""
    dom = conn.lookupByUUIDString(uuid)
    live = dom.XMLDesc()
    for hostdev in device_xml.hostdevs(live):
        if hostdev["type"] == "usb" and hostdev["address"] == address and hostdev["alias"]:
            xml = device_xml.hostdev_xml(live, hostdev["alias"])
            assert xml is not None
            dom.detachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)


def detach_stale(conn: libvirt.virConnect, uuid: str, alias: str, address: str) -> bool:
    """Detaches the live hostdev `alias` if it still points at `address` and no host device
    has that address; whether it did."""
    if any(d["address"] == address for d in present_usb_devices(conn)):
        return False
    dom = conn.lookupByUUIDString(uuid)
    live = dom.XMLDesc()
    if not any(h["alias"] == alias and h["address"] == address
               for h in device_xml.hostdevs(live)):
        return False
    xml = device_xml.hostdev_xml(live, alias)
    assert xml is not None
    dom.detachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    return True
