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
import dataclasses
import logging
from collections.abc import Callable, Sequence
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
from webvirt.hosts import split_ref
from webvirt.hub import EventHub
from webvirt.rules import Rule, matches
from webvirt.tasks import cancel_and_wait

log = logging.getLogger(__name__)
BUSY_RETRY_S = 0.5  # a domain busy with another operation is tried again after this
# libvirt attaches a USB device found in sysfs, and its node-device list learns of the device
# from udev a moment later: an entry is stale only if its address is still absent after this.
SETTLE_S = 1.0
ATTACH_ATTEMPTS = 6
ATTACH_RETRY_S = 0.5
FAILED_PASS_RETRY_S = 2.0
# Lifecycle events after which rules may want something else.
LIFECYCLE_WAKES = frozenset({"started", "resumed", "stopped", "shutdown", "crashed",
                             "undefined"})


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
    # lost: the older rule that gets it in this pass (None: `other` holds it already).
    winner: Rule | None = None


def plan(rules: Sequence[Rule], world: UsbWorld,
         given_up: frozenset[tuple[int, str]] = frozenset()) -> list[Decision]:
    """Pure: what each enabled rule of a running domain gets, the older rule first. A rule
    that gave up on a device (libvirt refused it again and again) claims it no more, so a
    younger rule may have it."""
    enabled = sorted((r for r in rules if r.enabled), key=lambda r: r.seniority)
    decisions: list[Decision] = []
    claimed: dict[str, tuple[Holder, Rule]] = {}  # address -> who gets it in this pass
    for rule in enabled:
        if rule.domain_uuid not in world.running:
            continue
        me = Holder(rule.domain_uuid, world.running[rule.domain_uuid])
        for device in world.devices:
            address = device["address"]
            if not matches(rule.match, device) or (rule.id, address) in given_up:
                continue
            if address in claimed:
                taker, winner = claimed[address]
                if taker.uuid != me.uuid:
                    decisions.append(Decision(rule, device, "lost", taker, winner))
                continue
            holder = world.held.get(address)
            if holder is None:
                decisions.append(Decision(rule, device, "attach"))
            elif holder.uuid == me.uuid:
                decisions.append(Decision(rule, device, "keep"))
            elif _by_younger_rule(holder, device, rule, enabled):
                decisions.append(Decision(rule, device, "attach", other=holder))
            else:
                decisions.append(Decision(rule, device, "lost", other=holder))
                continue
            claimed[address] = (me, rule)
    return decisions


def holdings(rules: Sequence[Rule], world: UsbWorld) -> dict[int, frozenset[str]]:
    """Pure: each rule's present devices (by address) that its VM holds now, whoever attached
    them and whether or not the rule is on."""
    holders = {address: holder.uuid for address, holder in world.held.items()}
    return {rule.id: frozenset(
        device["address"] for device in world.devices
        if holders.get(device["address"]) == rule.domain_uuid and matches(rule.match, device))
        for rule in rules}


def _by_younger_rule(holder: Holder, device: Description, rule: Rule,
                     rules: Sequence[Rule]) -> bool:
    """Whether the holder has the device by a rule younger than `rule` (then it yields it);
    a device a domain holds by hand, or by an older rule, is never taken."""
    own = [r for r in rules if r.domain_uuid == holder.uuid and matches(r.match, device)]
    return bool(own) and min(r.seniority for r in own) > rule.seniority


class UsbReconciler:
    __slots__ = ("_attempts", "_pending", "_periodic", "_reported", "_rule_domains",
                 "_stop_listening", "_task", "_waiting", "first", "holding",
                 "holding_listeners", "host", "hub", "passes", "rules", "tags")

    def __init__(self, host: Host, hub: EventHub, rules: RuleSource | None = None,
                 tags: dict[str, str] | None = None, *, first: bool = True):
        self.host = host
        self.hub = hub
        # With several hosts, one reconciler per host: {"host": name} (Host.tags). The first
        # host's also takes the rules without @HOST (made while webvirt had one host).
        self.tags = tags or {}
        self.first = first
        self.rules = rules
        self._pending = False
        self._task: asyncio.Task[None] | None = None
        self._periodic: asyncio.Task[None] | None = None
        self._waiting: set[asyncio.TimerHandle] = set()  # passes asked for later (retries)
        self.passes = 0  # passes done, for tests and logs
        # (rule id, device address) -> failed attaches so far; and losses already reported.
        # Kept per plug: a replug is a new address (see _forget_unplugged).
        self._attempts: dict[tuple[int, str], int] = {}
        self._reported: set[tuple[int, str]] = set()
        self._rule_domains: dict[int, str] = {}  # rule id -> domain UUID, as last read
        # What each of this host's rules holds, as the latest pass read it (holdings()), and
        # who wants to know: the MQTT bridge, whose events since start miss what was attached
        # before webvirt started or while libvirt was away.
        self.holding: dict[int, frozenset[str]] | None = None  # None: no pass yet
        self.holding_listeners: list[Callable[[dict[int, frozenset[str]]], None]] = []
        self._stop_listening = hub.listen(self._on_event)
        if rules is not None:
            rules.listeners.append(self._on_rule_change)

    def start(self) -> None:
        """A first pass (stale entries and unmet rules from before webvirt started), then one
        every reconcile_s as a safety net under the events."""
        self.wake()
        self._periodic = asyncio.get_running_loop().create_task(self._every_while())

    async def _every_while(self) -> None:
        while True:
            await asyncio.sleep(self.host.reconcile_s)
            self.wake()

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("host") not in (None, self.tags.get("host")):
            return  # another host's: its own reconciler takes it
        kind = event["type"]
        if kind == "lifecycle" and event.get("event") == "started":
            self._fresh_start(lambda key: self._rule_domains.get(key[0]) == event.get("uuid"))
        if ((kind in ("node-device-added", "node-device-removed")
             and event.get("device_type") == "usb")
                # A device attached or detached by hand (the API, virsh): what rules hold.
                or kind in ("device-added", "device-removed")
                or (kind == "connection" and event.get("state") == "restored")
                # A start wants devices; a stop frees what a younger rule may have now.
                or kind == "state"
                or (kind == "lifecycle" and event.get("event") in LIFECYCLE_WAKES)):
            self.wake()

    def _on_rule_change(self, _change: str, rule: Rule) -> None:
        self._fresh_start(lambda key: key[0] == rule.id)
        self.wake()

    def _fresh_start(self, forget: Callable[[tuple[int, str]], bool]) -> None:
        """A domain that starts, or a rule that changes, gets a new budget of attempts, and
        its failures are reported again."""
        self._attempts = {k: v for k, v in self._attempts.items() if not forget(k)}
        self._reported = {k for k in self._reported if not forget(k)}

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
        await cancel_and_wait(self._task, self._periodic)

    async def _run(self) -> None:
        while self._pending:
            self._pending = False
            if not self.host.connected:
                return  # the reconnect's "restored" asks again
            try:
                await self._pass()
                self.passes += 1
            except ApiError as err:
                if not self.host.connected:
                    # Lost (or webvirt stops) during the pass: the reconnect's "restored" asks
                    # again, as for a pass asked for while away.
                    log.debug("USB reconciliation stopped%s: %s", self.host.said, err.detail)
                    return
                log.warning("USB reconciliation failed%s: %s; trying again", self.host.said,
                            err.detail)
            except Exception:  # a bug here must not end reconciling for good
                log.exception("USB reconciliation failed; trying again")
            else:
                continue
            # What asked for this pass, and whatever came during it, is not lost.
            self._pending = False
            self._wake_later(FAILED_PASS_RETRY_S)
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
        rules = self._mine(await self.rules.list())
        self._rule_domains = {r.id: r.domain_uuid for r in rules}
        if not self._pending:  # else a change came since the read: the next pass tells
            self._tell_holding(holdings(rules, world))
        given_up = frozenset(k for k, n in self._attempts.items() if n >= ATTACH_ATTEMPTS)
        for decision in plan(rules, world, given_up):
            if decision.action == "attach":
                await self._attach(decision)
            elif decision.action == "lost":
                self._report_loss(decision)

    def _tell_holding(self, holding: dict[int, frozenset[str]]) -> None:
        """Before this pass acts: its attaches and detaches follow as events."""
        self.holding = holding
        for listener in self.holding_listeners:
            try:
                listener(holding)
            except Exception:  # one listener's bug must not stop the pass
                log.exception("a listener of what the USB rules hold failed")

    def _mine(self, rules: Sequence[Rule]) -> list[Rule]:
        """With several hosts, a rule names its domain NAME@HOST: this host's rules, by the
        bare name. A rule without @HOST (made with one host) is the first host's, as the MQTT
        bridge shows it: a copy of the VM on another host (the same UUID) is not its own."""
        if not self.tags:
            return list(rules)
        mine = []
        for rule in rules:
            name, host = split_ref(rule.domain)
            if host == self.tags["host"] or (host is None and self.first):
                mine.append(dataclasses.replace(rule, domain=name))
        return mine

    def _forget_unplugged(self, present: set[str]) -> None:
        """What is kept per (rule, device address) ends with the plug: a replug is a new
        address, so nothing here grows over weeks of plugs."""
        self._fresh_start(lambda key: key[1] not in present)

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
                await self.host.call(partial(attach_usb, uuid=rule.domain_uuid, device=device))
        except Conflict:
            self._wake_later(BUSY_RETRY_S)
            return
        except ApiError as err:
            attempts = self._attempts[key] = self._attempts.get(key, 0) + 1
            if attempts < ATTACH_ATTEMPTS:
                log.debug("rule %d: attach %s failed (%s); trying again", rule.id,
                          device["name"], err.detail)
                self._wake_later(ATTACH_RETRY_S)
            else:
                log.warning("rule %d: could not attach %s to %s: %s", rule.id, device["name"],
                            rule.domain, err.detail)
                self._publish(rule, device, "attach", result="error", error=err.detail)
                self.wake()  # a younger rule may have it now
            return
        self._attempts.pop(key, None)
        log.info("rule %d: attached %s (%s:%s, port %s) to %s", rule.id, device["name"],
                 device["vendor_id"], device["product_id"], device["port"], rule.domain)
        self._publish(rule, device, "attach", result="ok")

    def _report_loss(self, decision: Decision) -> None:
        rule, device, holder = decision.rule, decision.device, decision.other
        assert holder is not None
        key = (rule.id, device["address"])
        if key in self._reported:
            return
        self._reported.add(key)
        if decision.winner is None:
            error = f"{device['name']} is held by {holder.domain}"
        else:
            error = (f"{device['name']} goes to {holder.domain} by rule {decision.winner.id}, "
                     f"which is older")
        log.warning("rule %d: %s wants %s, but %s", rule.id, rule.domain, device["name"], error)
        self._publish(rule, device, "attach", result="error", error=error)

    def _publish(self, rule: Rule, device: Description, action: str,
                 domain: Holder | None = None, **fields: Any) -> None:
        self.hub.publish(
            "rule", rule=rule.id, domain=domain.domain if domain else rule.domain,
            uuid=domain.uuid if domain else rule.domain_uuid, device=device["name"],
            vendor_id=device["vendor_id"], product_id=device["product_id"],
            vendor=device["vendor"], product=device["product"], port=device["port"],
            address=device["address"], action=action, **fields, **self.tags)

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
            log.warning("could not detach stale USB device %s (was %s) from %s%s: %s",
                        hostdev["alias"], hostdev["address"], item.domain, self.host.said,
                        err.detail)
            self.hub.publish("detach", **event, **self.tags, result="error",
                             error=err.detail)
            return
        if detached:
            log.info("detached stale USB device %s (was %s, unplugged) from %s%s",
                     hostdev["alias"], hostdev["address"], item.domain, self.host.said)
            self.hub.publish("detach", **event, **self.tags, result="ok")


# Blocking helpers; each runs on a connection's thread.

def present_usb_devices(conn: libvirt.virConnect, local: bool = False) -> list[Description]:
    flags = libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_USB_DEV
    return [d for d in read_node_devices(conn, flags, local) if d["type"] == "usb"]


def read_usb_world(conn: libvirt.virConnect, local: bool) -> UsbWorld:
    devices = present_usb_devices(conn, local)
    present = {d["address"]: d for d in devices}
    running: dict[str, str] = {}
    held: dict[str, Holder] = {}
    stale = []
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        try:
            uuid, name, live = dom.UUIDString(), dom.name(), dom.XMLDesc()
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                continue  # gone while listed
            raise
        running[uuid] = name
        for hostdev in device_xml.hostdevs(live):
            if hostdev["type"] != "usb" or not hostdev["address"]:
                continue
            device = present.get(hostdev["address"])
            if device is not None and device_xml.holds(hostdev, device):
                held[hostdev["address"]] = Holder(uuid, name)
            elif hostdev["alias"]:
                stale.append(StaleHostdev(uuid, name, hostdev))
    # libvirt names a root hub usb_usbN (the kernel's usbN): it cannot be passed through.
    passable = [d for d in devices if not d["name"].startswith("usb_usb")]
    return UsbWorld(passable, running, held, stale)


def usb_hostdev_xml(device: Description) -> str:
    """A USB hostdev for this device: its ids and the address it has now (libvirt then finds
    it by both, so two alike devices are told apart)."""
    vendor, product = quoteattr("0x" + device["vendor_id"]), quoteattr("0x" + device["product_id"])
    bus, number = (quoteattr(n) for n in device["address"].split(":"))
    return (f"<hostdev mode='subsystem' type='usb' managed='yes'><source>"
            f"<vendor id={vendor}/><product id={product}/><address bus={bus} device={number}/>"
            f"</source></hostdev>")


def attach_usb(conn: libvirt.virConnect, uuid: str, device: Description) -> None:
    dom = conn.lookupByUUIDString(uuid)
    if not any(device_xml.holds(h, device) for h in device_xml.hostdevs(dom.XMLDesc())):
        dom.attachDeviceFlags(usb_hostdev_xml(device), libvirt.VIR_DOMAIN_AFFECT_LIVE)


def _detach_alias(dom: libvirt.virDomain, live: str, alias: str) -> None:
    xml = device_xml.hostdev_xml(live, alias)
    assert xml is not None
    dom.detachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)


def detach_usb(conn: libvirt.virConnect, uuid: str, address: str) -> None:
    """Detaches, live, the USB hostdev at this address."""
    dom = conn.lookupByUUIDString(uuid)
    live = dom.XMLDesc()
    for hostdev in device_xml.hostdevs(live):
        if hostdev["type"] == "usb" and hostdev["address"] == address and hostdev["alias"]:
            _detach_alias(dom, live, hostdev["alias"])


def detach_stale(conn: libvirt.virConnect, uuid: str, alias: str, address: str) -> bool:
    """Detaches the live hostdev `alias` if it is still there at `address` and no present
    host device is what it names; whether it did."""
    dom = conn.lookupByUUIDString(uuid)
    live = dom.XMLDesc()
    entries = [h for h in device_xml.hostdevs(live)
               if h["alias"] == alias and h["address"] == address]
    if not entries or any(device_xml.holds(entries[0], d) for d in present_usb_devices(conn)):
        return False
    _detach_alias(dom, live, alias)
    return True
