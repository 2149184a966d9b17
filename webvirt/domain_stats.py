"""Every domain's numbers in one libvirt call (virConnectGetAllDomainStats), for /metrics, the
live `stats` messages and /api/0/domains. Blocking: each function runs on a connection's
thread (Host.call).

Drivers report different amounts: QEMU fills every group asked for; libvirt's test driver
reports only the state. What a record lacks is read per domain (dom.info(), and the stats of
each disk and interface its XML names), so the answer has the same shape either way. A domain
whose read fails is left out (and named in `failed`), never the whole answer.
"""

from __future__ import annotations

import contextlib
import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import libvirt

from webvirt.domains import state_name
from webvirt.errors import is_connection_error

log = logging.getLogger(__name__)

# What /metrics and the stats messages need; no more, as each group of a running QEMU domain
# is a QEMU monitor round trip (perf, iothread, dirtyrate and vm are left out).
USAGE_GROUPS = (libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
                | libvirt.VIR_DOMAIN_STATS_BALLOON | libvirt.VIR_DOMAIN_STATS_VCPU
                | libvirt.VIR_DOMAIN_STATS_INTERFACE | libvirt.VIR_DOMAIN_STATS_BLOCK)
# What /api/0/domains shows: state, vCPUs, memory.
SUMMARY_GROUPS = (libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_BALLOON
                  | libvirt.VIR_DOMAIN_STATS_VCPU)
# A domain busy with a job (a migration, a stuck monitor) answers what it can at once
# instead of holding up everyone's numbers.
NOWAIT = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
ACTIVE = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE

BLOCK_FIELDS = ("rd.bytes", "rd.reqs", "wr.bytes", "wr.reqs")
NET_FIELDS = ("rx.bytes", "rx.pkts", "rx.errs", "rx.drop",
              "tx.bytes", "tx.pkts", "tx.errs", "tx.drop")


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
    # Balloon figures, when libvirt has them: the QEMU process's resident memory, and what the
    # guest says it uses (needs a balloon driver in the guest; VFIO guests have none).
    rss_kib: int | None = None
    guest_used_kib: int | None = None
    disks: list[Device] = field(default_factory=list)
    interfaces: list[Device] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return bool(self.state != libvirt.VIR_DOMAIN_SHUTOFF)


@dataclass(slots=True)
class Sample:
    """One bulk read: the domains, the domains that could not be read, and when the call began
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


def read(conn: libvirt.virConnect, groups: int = USAGE_GROUPS, flags: int = 0) -> Sample:
    """Every domain libvirt lists (with `flags`, e.g. ACTIVE, only those)."""
    started = time.monotonic()
    try:
        records = conn.getAllDomainStats(groups, flags | NOWAIT)
    except libvirt.libvirtError as err:
        if is_connection_error(err):
            raise
        # QEMU fails the whole call when one domain's stats fail: ask domain by domain.
        log.debug("bulk domain stats failed (%s); reading domain by domain", err)
        records = list(_one_by_one(conn, groups, flags))
    ended = time.monotonic()
    domains, failed = [], []
    for dom, stats in records:
        try:
            domains.append(_parse(dom, stats, groups))
        except libvirt.libvirtError as err:
            if is_connection_error(err):
                raise
            failed.append(_name(dom))
            log.debug("stats of domain %s failed: %s", _name(dom), err)
    return Sample(domains, failed, started, ended)


def _one_by_one(conn: libvirt.virConnect, groups: int,
                flags: int) -> Iterable[tuple[libvirt.virDomain, dict[str, Any]]]:
    for dom in conn.listAllDomains(flags):
        try:
            yield from conn.domainListGetStats([dom], groups, NOWAIT)
        except libvirt.libvirtError as err:
            if is_connection_error(err):
                raise
            log.debug("stats of domain %s failed: %s", _name(dom), err)
            yield dom, {}  # _parse reads what it can on its own, or names it failed


def _name(dom: libvirt.virDomain) -> str:
    with contextlib.suppress(libvirt.libvirtError):
        return str(dom.name())
    return "?"


def _parse(dom: libvirt.virDomain, stats: dict[str, Any], groups: int) -> DomainStats:
    state = stats.get("state.state")
    info = None
    if state is None or any(key not in stats for key in _info_keys(groups)):
        info = dom.info()  # the driver does not report these groups: [state, max, mem, vcpus, cpu]
        state = info[0] if state is None else state
    domain = DomainStats(
        name=dom.name(), uuid=dom.UUIDString(), state=state,
        cpu_time_ns=stats.get("cpu.time", info[4] if info else 0),
        vcpus=stats.get("vcpu.current", info[3] if info else 0),
        max_memory_kib=stats.get("balloon.maximum", info[1] if info else 0),
        memory_kib=stats.get("balloon.current", info[2] if info else 0),
        rss_kib=stats.get("balloon.rss"),
    )
    if "balloon.available" in stats and "balloon.unused" in stats:
        domain.guest_used_kib = max(0, stats["balloon.available"] - stats["balloon.unused"])
    if not domain.active:
        domain.cpu_time_ns = 0  # as dom.info() says; QEMU's stats can report a stale figure
        return domain
    # A group the driver left out entirely (not one that found no device) is read per device.
    unread_disks = unread_nets = False
    if groups & libvirt.VIR_DOMAIN_STATS_BLOCK:
        domain.disks = _devices(stats, "block", BLOCK_FIELDS)
        unread_disks = "block.count" not in stats
    if groups & libvirt.VIR_DOMAIN_STATS_INTERFACE:
        domain.interfaces = _devices(stats, "net", NET_FIELDS)
        unread_nets = "net.count" not in stats
    if unread_disks or unread_nets:
        _read_devices(dom, domain, disks=unread_disks, nets=unread_nets)
    return domain


def _info_keys(groups: int) -> list[str]:
    keys = []
    if groups & libvirt.VIR_DOMAIN_STATS_CPU_TOTAL:
        keys.append("cpu.time")
    if groups & libvirt.VIR_DOMAIN_STATS_VCPU:
        keys.append("vcpu.current")
    if groups & libvirt.VIR_DOMAIN_STATS_BALLOON:
        keys += ["balloon.maximum", "balloon.current"]
    return keys


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


def _read_devices(dom: libvirt.virDomain, domain: DomainStats, *, disks: bool,
                  nets: bool) -> None:
    """For a driver whose stats name no devices: each disk and interface of the live XML."""
    devices = ET.fromstring(dom.XMLDesc(0)).find("devices")
    if devices is None:
        return
    if disks:
        for target in devices.iterfind("disk[@device='disk']/target"):
            name = target.get("dev")
            if name:
                rd_reqs, rd_bytes, wr_reqs, wr_bytes, _errs = dom.blockStats(name)
                domain.disks.append(Device(name, {"rd.bytes": rd_bytes, "rd.reqs": rd_reqs,
                                                  "wr.bytes": wr_bytes, "wr.reqs": wr_reqs}))
    if nets:
        for target in devices.iterfind("interface/target"):
            name = target.get("dev")
            if name:
                values = dom.interfaceStats(name)
                domain.interfaces.append(Device(name, dict(zip(NET_FIELDS, values,
                                                               strict=True))))


# /api/0/domains, from one bulk read and two listings (autostart and persistence are not
# among the stats; a listing filtered by each costs one call whatever the number of domains).

def list_summaries(conn: libvirt.virConnect) -> list[dict[str, Any]]:
    sample = read(conn, SUMMARY_GROUPS)
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
