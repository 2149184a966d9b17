"""Live usage on the event stream: a `stats` message every --stats-interval seconds with each
active domain's CPU, memory, disk and network use, while at least one client asks for it
(?type=stats). Nobody listening, no sampling: libvirt is not asked.

CPU % as virt-manager computes it: CPU time used over wall time between two samples; the host
view divides by the host's CPUs, the guest view by the domain's vCPUs; both within 0-100.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Any

import libvirt

from webvirt import domain_stats
from webvirt.domain_stats import DomainStats, Sample
from webvirt.domains import state_name
from webvirt.errors import ApiError
from webvirt.host import Host
from webvirt.hub import EventHub
from webvirt.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# Rates are over the time between the middles of two reads; a domain's counters are read
# anywhere in each, so up to half their difference in length is unknown: 5% at most.
UNSURE = 0.1


def read_usage(conn: libvirt.virConnect, with_cpus: bool) -> tuple[Sample, int | None]:
    """Active domains in one bulk call; the host's CPU count too, when asked."""
    sample = domain_stats.read(conn, domain_stats.ACTIVE, guest_memory=True)
    return sample, int(conn.getInfo()[2]) if with_cpus else None


def _percent(value: float) -> float:
    return round(max(0.0, min(100.0, value)), 2)


def _total(devices: list[domain_stats.Device], counter: str) -> int:
    return sum(d.counters.get(counter, 0) for d in devices)


def usage(before: DomainStats, now: DomainStats, seconds: float,
          host_cpus: int) -> dict[str, Any]:
    """What one domain used between two samples `seconds` apart."""
    base = max(0, now.cpu_time_ns - before.cpu_time_ns) * 100 / (seconds * 1e9)

    def rate(devices_now: list[domain_stats.Device], devices_before: list[domain_stats.Device],
             counter: str) -> int:
        # A counter that went back (a restarted guest, an unplugged disk) says nothing.
        delta = _total(devices_now, counter) - _total(devices_before, counter)
        return round(max(0, delta) / seconds)

    if now.guest_used_kib is not None:  # the guest's balloon driver says what it uses
        memory_kib, source = now.guest_used_kib, "guest"
    elif now.rss_kib is not None:  # no balloon (VFIO guests): what the QEMU process holds
        memory_kib, source = now.rss_kib, "rss"
    else:
        memory_kib, source = now.memory_kib, "allocated"
    return {
        "domain": now.name,
        "uuid": now.uuid,
        "state": state_name(now.state),
        "cpu_percent": _percent(base / max(1, host_cpus)),
        "guest_cpu_percent": _percent(base / max(1, now.vcpus)),
        "cpu_time_seconds": now.cpu_time_ns / 1e9,
        "vcpus": now.vcpus,
        "memory_bytes": memory_kib * 1024,
        "memory_source": source,
        "memory_total_bytes": now.memory_kib * 1024,
        "disk_read_bytes_per_s": rate(now.disks, before.disks, "rd.bytes"),
        "disk_write_bytes_per_s": rate(now.disks, before.disks, "wr.bytes"),
        "net_rx_bytes_per_s": rate(now.interfaces, before.interfaces, "rx.bytes"),
        "net_tx_bytes_per_s": rate(now.interfaces, before.interfaces, "tx.bytes"),
    }


def usages(before: Sample, now: Sample, host_cpus: int) -> list[dict[str, Any]] | None:
    """Every domain in both samples (a domain that just started waits for the next one); None
    when the two reads took so differently long that when libvirt read a domain's counters in
    each is not known closely enough (libvirt's first CPU read of a daemon takes seconds)."""
    seconds = now.when - before.when
    if seconds <= 0 or abs(now.spent - before.spent) > UNSURE * seconds:
        return None
    earlier = {d.uuid: d for d in before.domains}
    return sorted((usage(earlier[d.uuid], d, seconds, host_cpus) for d in now.domains
                   if d.uuid in earlier), key=lambda u: u["domain"])


class UsageSampler:
    __slots__ = ("_task", "host", "hub", "interval")

    def __init__(self, host: Host, hub: EventHub, interval: float):
        self.host = host
        self.hub = hub
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        await cancel_and_wait(self._task)

    def _tell(self, before: Sample, now: Sample, host_cpus: int) -> None:
        figures = usages(before, now, host_cpus)
        if figures is not None:
            self.hub.broadcast_stats(figures, interval=round(now.when - before.when, 3),
                                     host_cpus=host_cpus, **self.host.tags)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.hub.stats_wanted.wait()
            before: Sample | None = None
            host_cpus: int | None = None
            tick = loop.time()
            while self.hub.stats_client_count:
                try:
                    now, cpus = await self.host.call(partial(read_usage,
                                                             with_cpus=host_cpus is None))
                except ApiError as err:  # libvirt is away: start afresh once it is back
                    log.debug("stats sampling failed: %s", err.detail)
                    before = None
                except Exception:  # a bug must not end live stats for good
                    log.exception("stats sampling failed")
                    before = None
                else:
                    host_cpus = host_cpus or cpus
                    if before is not None and host_cpus:
                        self._tell(before, now, host_cpus)
                    before = now
                # A steady cadence; a read slower than the interval delays the next, no burst.
                tick += self.interval
                if tick < loop.time():
                    tick = loop.time() + self.interval
                await asyncio.sleep(tick - loop.time())
