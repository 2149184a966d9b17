"""Every domain's numbers for /metrics, the live `stats` messages and /api/0/domains, in as few
libvirt calls as their cost allows. Blocking, except read_spread: each function runs on a
connection's thread (Host.call).

What costs what (libvirt 9.0, QEMU; bench/usage.py): each stats group that needs the QEMU
monitor (balloon, vcpu, block) is a monitor round trip per running domain, asked of one QEMU
after the other, and cpu.total takes about as long: 50 running guests took 260 ms in one
getAllDomainStats of six groups. dom.info() (state, CPU time, memory, vCPUs) reads /proc, 0.2 ms
a domain, and the live XML as little. So a read is one bulk call of the cheap groups (state,
interfaces), info() and the XML of each domain, and the monitor only where the domain has what
it is asked about: block stats of domains with disks, balloon stats (RSS, the guest's own
memory use) of domains without a balloon (VFIO guests: no monitor needed), or of all when the
guest's figures are asked for (a single disk by blockStats(), one monitor command where the
block group makes two). /metrics spreads the domains over the host's connections: each domain is
read by the first connection to claim it, so a connection that finishes early takes on more.

Drivers report different amounts: libvirt's test driver reports only the state, so what a
group leaves out is read per device (the stats of each disk and interface the XML names) and
the answer has the same shape. A domain whose read fails is left out (and named in `failed`),
never the whole answer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TypeVar

import libvirt

from webvirt.domains import state_name
from webvirt.errors import is_connection_error

log = logging.getLogger(__name__)
T = TypeVar("T")

# Groups read from libvirt's own records and /proc, never from the QEMU monitor.
BULK_GROUPS = libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_INTERFACE
# A domain busy with a job (a migration, a stuck monitor) answers what it can at once
# instead of holding up everyone's numbers.
NOWAIT = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
ACTIVE = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE

BLOCK_FIELDS = ("rd.bytes", "rd.reqs", "wr.bytes", "wr.reqs")
NET_FIELDS = ("rx.bytes", "rx.pkts", "rx.errs", "rx.drop",
              "tx.bytes", "tx.pkts", "tx.errs", "tx.drop")
Records = list[tuple[libvirt.virDomain, dict[str, Any]]]


@dataclass(slots=True)
class Device:
    """A disk or an interface: its target name and libvirt's counters by field name."""

    name: str
    counters: dict[str, int]


@dataclass(slots=True)
class DomainStats:
    name: str
    uuid: str
    state: int
    cpu_time_ns: int
    vcpus: int
    max_memory_kib: int
    memory_kib: int
    # Balloon figures, when read: the QEMU process's resident memory, and what the guest says
    # it uses (needs a balloon driver in the guest; VFIO guests have none).
    rss_kib: int | None = None
    guest_used_kib: int | None = None
    disks: list[Device] = field(default_factory=list)
    interfaces: list[Device] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return bool(self.state != libvirt.VIR_DOMAIN_SHUTOFF)


@dataclass(slots=True)
class Sample:
    """One read: the domains, the domains that could not be read, and when the read began
    and ended (monotonic seconds, on the connection's thread). libvirt reads each domain's
    counters somewhere in between."""

    domains: list[DomainStats]
    failed: list[str]
    started: float
    ended: float

    @property
    def when(self) -> float:
        return (self.started + self.ended) / 2

    @property
    def spent(self) -> float:
        return self.ended - self.started


def read(conn: libvirt.virConnect, flags: int = 0, *, devices: bool = True,
         guest_memory: bool = False) -> Sample:
    """Every domain libvirt lists (with `flags`, e.g. ACTIVE, only those), on one connection.
    `devices`: disk and interface counters and the RSS of domains without a balloon;
    `guest_memory`: the balloon driver's figures too (a monitor round trip per ballooned
    domain)."""
    sample, asks = survey(conn, flags, devices=devices, guest_memory=guest_memory)
    complete(sample, ask_monitor(conn, asks))
    return sample


async def read_spread(call_each: EachCaller, connections: int, flags: int = 0) -> Sample:
    """As read(), spread over `connections` connections (each a thread of its own:
    CVE-2024-4418), side by side: each lists the domains and reads, info, XML and monitor,
    each domain it claims first. libvirt asks each QEMU in turn, so 50 running guests with a
    disk take about half the time over three (bench/usage.py); claiming domain by domain keeps
    the three busy to the end, where a fixed share of random UUIDs gave one of them 23 of 50."""
    claims = Claims()
    parts = await call_each([partial(read_claimed, claims=claims, part=i, parts=connections,
                                     flags=flags) for i in range(connections)])
    sample = Sample([], [], min(p.started for p in parts), max(p.ended for p in parts))
    for part in parts:
        # Disjoint by UUID, whatever each listing held: a domain defined or undefined
        # between the listings is read by one connection or by none, never twice.
        sample.domains += part.domains
        sample.failed += part.failed
    sample.domains.sort(key=lambda d: d.name)
    return sample


class Claims:
    """The domains the connections of one read_spread have taken, by UUID: a domain is read
    by the first connection to claim it. Strings only cross threads, never libvirt objects."""

    __slots__ = ("_lock", "_taken")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._taken: set[str] = set()

    def claim(self, uuid: str) -> bool:
        with self._lock:
            if uuid in self._taken:
                return False
            self._taken.add(uuid)
            return True


def read_claimed(conn: libvirt.virConnect, claims: Claims, part: int, parts: int,
                 flags: int = 0) -> Sample:
    """read()'s work, domain by domain, for each domain this connection claims first. The
    connections walk one order (by UUID) from `part`/`parts` of the way along it, so each
    starts on domains of its own. What needs the monitor is read as each domain is claimed;
    the balloon stats of domains without a balloon (no monitor) in one call at the end."""
    started = time.monotonic()
    records = sorted(_bulk(conn, BULK_GROUPS, flags), key=lambda r: str(r[0].UUIDString()))
    start = part * len(records) // parts
    sample = Sample([], [], started, started)
    answers = Answers()
    grouped: list[Ask] = []
    for record in records[start:] + records[:start]:
        if not claims.claim(record[0].UUIDString()):
            continue
        some, asks = _survey([record], started, devices=True, guest_memory=False)
        sample.domains += some.domains
        sample.failed += some.failed
        for ask in read_single_disks(asks, answers):
            if ask.groups & libvirt.VIR_DOMAIN_STATS_BLOCK:
                ask_groups(conn, [ask], answers)  # the monitor's: now, while others claim on
            else:
                grouped.append(ask)  # balloon stats of domains without one: no monitor
    ask_groups(conn, grouped, answers)
    answers.ended = time.monotonic()
    complete(sample, answers)
    return sample


class EachCaller(Protocol):
    """Host.call_each: runs each function on a connection thread of its own."""

    def __call__(self, fns: Sequence[Callable[[libvirt.virConnect], T]], /) -> Awaitable[
        list[T]]: ...


@dataclass(slots=True, frozen=True)
class Ask:
    """Monitor-bound groups one active domain is to be asked for, and its live devices."""

    dom: libvirt.virDomain
    uuid: str
    groups: int
    devices: ET.Element


@dataclass(slots=True)
class Answers:
    """What ask_monitor read: devices and balloon figures by UUID, what failed, and when."""

    disks: dict[str, list[Device]] = field(default_factory=dict)
    balloons: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # UUID -> name
    ended: float = 0.0


def survey(conn: libvirt.virConnect, flags: int = 0, *, devices: bool,
           guest_memory: bool) -> tuple[Sample, list[Ask]]:
    """What needs no QEMU monitor: one bulk call (state, interfaces), then each domain's
    info() and, for what `devices` asks of active domains, its live XML. Answers the sample so
    far and what the monitor is still to be asked."""
    started = time.monotonic()
    return _survey(_bulk(conn, BULK_GROUPS, flags), started, devices=devices,
                   guest_memory=guest_memory)


def _survey(records: Records, started: float, *, devices: bool,
            guest_memory: bool) -> tuple[Sample, list[Ask]]:
    """survey()'s work on records already read; `started`: when their read began."""
    domains, failed, asks = [], [], []
    for dom, stats in records:
        try:
            domain = _from_info(dom, stats)
            if devices and domain.active:
                found = ET.fromstring(dom.XMLDesc(0)).find("devices")
                xml = ET.Element("devices") if found is None else found
                domain.interfaces = _devices(stats, "net", NET_FIELDS)
                if "net.count" not in stats:  # a driver without the group, not no interface
                    _read_interfaces(dom, domain, xml)
                groups = (libvirt.VIR_DOMAIN_STATS_BLOCK if xml.find("disk") is not None
                          else 0)
                if guest_memory or not _has_balloon(xml):
                    groups |= libvirt.VIR_DOMAIN_STATS_BALLOON
                if groups:
                    asks.append(Ask(dom, domain.uuid, groups, xml))
        except libvirt.libvirtError as err:
            if is_connection_error(err):
                raise
            failed.append(_name(dom))
            log.debug("stats of domain %s failed: %s", _name(dom), err)
            continue
        domains.append(domain)
    return Sample(domains, failed, started, time.monotonic()), asks


def ask_monitor(conn: libvirt.virConnect, asks: list[Ask]) -> Answers:
    """The monitor-bound groups of the asked domains (on this connection)."""
    answers = Answers()
    ask_groups(conn, read_single_disks(asks, answers), answers)
    answers.ended = time.monotonic()
    return answers


def read_single_disks(asks: list[Ask], answers: Answers) -> list[Ask]:
    """The block stats of each domain with a single disk, by one blockStats() call: libvirt's
    block group adds a second monitor command (capacity, allocation) that nothing here reports.
    Answers what is still to be asked by group."""
    rest = []
    for ask in asks:
        if ask.groups & libvirt.VIR_DOMAIN_STATS_BLOCK and _one_disk(ask.devices):
            disks = _single_disk(ask)
            if disks is not None:
                answers.disks[ask.uuid] = disks
                ask = dataclasses.replace(
                    ask, groups=ask.groups & ~libvirt.VIR_DOMAIN_STATS_BLOCK)
        if ask.groups:
            rest.append(ask)
    return rest


def ask_groups(conn: libvirt.virConnect, asks: list[Ask], answers: Answers) -> None:
    """One call per set of groups the asked domains need."""
    for groups in sorted({ask.groups for ask in asks}):
        wanted = {ask.uuid: ask for ask in asks if ask.groups == groups}
        for dom, stats in _of(conn, [ask.dom for ask in wanted.values()], groups):
            ask = wanted[dom.UUIDString()]
            try:
                _answer(dom, ask, stats, answers)
            except libvirt.libvirtError as err:
                _failed(ask, err, answers)


def _one_disk(devices: ET.Element) -> bool:
    """A single block device, and a disk: what _read_disks reads as the block group would
    (it leaves out CD-ROMs and the like)."""
    disks = devices.findall("disk")
    return len(disks) == 1 and disks[0].get("device", "disk") == "disk"


def _single_disk(ask: Ask) -> list[Device] | None:
    """The counters of a domain's single disk, by blockStats(), or None for the block group
    to read: blockStats() waits for a job the domain is busy with (up to libvirt's 30 s job
    timeout), where the group, asked NOWAIT, skips it; and a disk QEMU keeps no block
    statistics for (vhost-user) fails it, where the group names the disk without counters."""
    try:
        if ask.dom.controlInfo()[0] != libvirt.VIR_DOMAIN_CONTROL_OK:
            return None
        return _read_disks(ask.dom, ask.devices)
    except libvirt.libvirtError as err:
        if is_connection_error(err):
            raise
        return None


def _answer(dom: libvirt.virDomain, ask: Ask, stats: dict[str, Any], answers: Answers) -> None:
    if ask.groups & libvirt.VIR_DOMAIN_STATS_BLOCK:
        disks = _devices(stats, "block", BLOCK_FIELDS)
        if "block.count" not in stats:  # a driver without the group
            disks = _read_disks(dom, ask.devices)
        answers.disks[ask.uuid] = disks
    if ask.groups & libvirt.VIR_DOMAIN_STATS_BALLOON:
        guest_used = None
        if "balloon.available" in stats and "balloon.unused" in stats:
            guest_used = max(0, stats["balloon.available"] - stats["balloon.unused"])
        answers.balloons[ask.uuid] = (stats.get("balloon.rss"), guest_used)


def _failed(ask: Ask, err: libvirt.libvirtError, answers: Answers) -> None:
    if is_connection_error(err):
        raise err
    answers.failed[ask.uuid] = _name(ask.dom)
    log.debug("stats of domain %s failed: %s", _name(ask.dom), err)


def complete(sample: Sample, answers: Answers) -> None:
    """Adds what ask_monitor read to the sample; a domain that failed leaves it."""
    for domain in sample.domains:
        domain.disks = answers.disks.get(domain.uuid, domain.disks)
        domain.rss_kib, domain.guest_used_kib = answers.balloons.get(
            domain.uuid, (domain.rss_kib, domain.guest_used_kib))
    sample.domains = [d for d in sample.domains if d.uuid not in answers.failed]
    sample.failed += answers.failed.values()
    sample.ended = max(sample.ended, answers.ended)


def _bulk(conn: libvirt.virConnect, groups: int, flags: int) -> Records:
    try:
        return list(conn.getAllDomainStats(groups, flags | NOWAIT))
    except libvirt.libvirtError as err:
        if is_connection_error(err):
            raise
        # QEMU fails the whole call when one domain's stats fail: ask domain by domain.
        log.debug("bulk domain stats failed (%s); reading domain by domain", err)
        return list(_one_by_one(conn, conn.listAllDomains(flags), groups))


def _of(conn: libvirt.virConnect, doms: list[libvirt.virDomain], groups: int) -> Records:
    """`groups` of the given domains, in one call when they all answer."""
    if not doms:
        return []
    try:
        return list(conn.domainListGetStats(doms, groups, NOWAIT))
    except libvirt.libvirtError as err:
        if is_connection_error(err):
            raise
        log.debug("domain stats failed (%s); reading domain by domain", err)
        return list(_one_by_one(conn, doms, groups))


def _one_by_one(conn: libvirt.virConnect, doms: Iterable[libvirt.virDomain],
                groups: int) -> Iterable[tuple[libvirt.virDomain, dict[str, Any]]]:
    for dom in doms:
        try:
            yield from conn.domainListGetStats([dom], groups, NOWAIT)
        except libvirt.libvirtError as err:
            if is_connection_error(err):
                raise
            log.debug("stats of domain %s failed: %s", _name(dom), err)
            yield dom, {}  # what it lacks is read on its own, or the domain named failed


def _name(dom: libvirt.virDomain) -> str:
    with contextlib.suppress(libvirt.libvirtError):
        return str(dom.name())
    return "?"


def _from_info(dom: libvirt.virDomain, stats: dict[str, Any]) -> DomainStats:
    state, max_memory, memory, vcpus, cpu_time = dom.info()
    state = stats.get("state.state", state)
    return DomainStats(
        name=dom.name(), uuid=dom.UUIDString(), state=state,
        # 0 when shut off, as dom.info() says; QEMU's stats can report a stale figure
        cpu_time_ns=cpu_time if state != libvirt.VIR_DOMAIN_SHUTOFF else 0,
        vcpus=vcpus, max_memory_kib=max_memory, memory_kib=memory)


def _has_balloon(devices: ET.Element) -> bool:
    balloon = devices.find("memballoon")
    return balloon is not None and balloon.get("model") != "none"


def _devices(stats: dict[str, Any], prefix: str, fields: tuple[str, ...]) -> list[Device]:
    devices = []
    for i in range(stats.get(f"{prefix}.count", 0)):
        name = stats.get(f"{prefix}.{i}.name")
        if name is None:
            continue
        counters = {f: stats[f"{prefix}.{i}.{f}"] for f in fields
                    if f"{prefix}.{i}.{f}" in stats}
        if counters:  # e.g. an empty CD-ROM drive has none
            devices.append(Device(name, counters))
    return devices


def _read_disks(dom: libvirt.virDomain, devices: ET.Element) -> list[Device]:
    """Each disk of the live XML: for a driver whose stats name no disks, and for a domain
    with a single disk."""
    disks = []
    for target in devices.iterfind("disk[@device='disk']/target"):
        name = target.get("dev")
        if name:
            rd_reqs, rd_bytes, wr_reqs, wr_bytes, _errs = dom.blockStats(name)
            counters = {"rd.bytes": rd_bytes, "rd.reqs": rd_reqs, "wr.bytes": wr_bytes,
                        "wr.reqs": wr_reqs}
            # -1: not reported by the driver (the group leaves such a field out)
            disks.append(Device(name, {k: v for k, v in counters.items() if v >= 0}))
    return disks


def _read_interfaces(dom: libvirt.virDomain, domain: DomainStats,
                     devices: ET.Element) -> None:
    """For a driver whose stats name no interfaces: each interface of the live XML."""
    for target in devices.iterfind("interface/target"):
        name = target.get("dev")
        if name:
            values = dom.interfaceStats(name)
            domain.interfaces.append(Device(name, dict(zip(NET_FIELDS, values, strict=True))))


# /api/0/domains, from one bulk read and two listings (autostart and persistence are not
# among the stats; a listing filtered by each costs one call whatever the number of domains).

def list_summaries(conn: libvirt.virConnect) -> list[dict[str, Any]]:
    sample = read(conn, devices=False)
    autostart = _uuids(conn, libvirt.VIR_CONNECT_LIST_DOMAINS_AUTOSTART)
    transient = _uuids(conn, libvirt.VIR_CONNECT_LIST_DOMAINS_TRANSIENT)
    return sorted(({
        "name": d.name,
        "uuid": d.uuid,
        "state": state_name(d.state),
        "vcpus": d.vcpus,
        "memory_kib": d.memory_kib,
        "autostart": d.uuid in autostart,
        "persistent": d.uuid not in transient,
    } for d in sample.domains), key=lambda d: d["name"])


def _uuids(conn: libvirt.virConnect, flags: int) -> set[str]:
    return {dom.UUIDString() for dom in conn.listAllDomains(flags)}
