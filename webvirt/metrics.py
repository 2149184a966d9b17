"""Prometheus metrics, written by prometheus-client from fresh families at every scrape.

libvirt's numbers carry the names of the libvirt exporters that Grafana dashboards already
use (kumina's libvirt_exporter and inovex's prometheus-libvirt-exporter, which keeps its
names): `libvirt_up`, `libvirt_domain_info_*`, `libvirt_domain_block_stats_*` and
`libvirt_domain_interface_stats_*`, labelled `domain` (and `target_device`). webvirt's own
(`webvirt_*`) are counted from the hub's events and the host's calls, never by asking libvirt.
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import libvirt
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from webvirt.domain_stats import Sample
from webvirt.host import Host
from webvirt.hub import EventHub

# inovex's state_desc label, word for word, so its dashboards' legends keep working.
STATE_DESC = {
    libvirt.VIR_DOMAIN_NOSTATE: "no state",
    libvirt.VIR_DOMAIN_RUNNING: "the domain is running",
    libvirt.VIR_DOMAIN_BLOCKED: "the domain is blocked on resource",
    libvirt.VIR_DOMAIN_PAUSED: "the domain is paused by user",
    libvirt.VIR_DOMAIN_SHUTDOWN: "the domain is being shut down",
    libvirt.VIR_DOMAIN_SHUTOFF: "the domain is shut off",
    libvirt.VIR_DOMAIN_CRASHED: "the domain is crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "the domain is suspended by guest power management",
}

# (name without _total, help, libvirt's counter field) for each disk and each interface.
BLOCK_COUNTERS = (
    ("libvirt_domain_block_stats_read_bytes", "Number of bytes read from a block device, in "
     "bytes.", "rd.bytes"),
    ("libvirt_domain_block_stats_read_requests", "Number of read requests from a block device.",
     "rd.reqs"),
    ("libvirt_domain_block_stats_write_bytes", "Number of bytes written to a block device, in "
     "bytes.", "wr.bytes"),
    ("libvirt_domain_block_stats_write_requests", "Number of write requests to a block device.",
     "wr.reqs"),
)
INTERFACE_COUNTERS = tuple(
    (f"libvirt_domain_interface_stats_{way}_{what}",
     f"Number of {noun} {verb} on a network interface.", f"{field}.{suffix}")
    for way, verb, field in (("receive", "received", "rx"), ("transmit", "transmitted", "tx"))
    for what, noun, suffix in (("bytes", "bytes", "bytes"), ("packets", "packets", "pkts"),
                               ("errors", "packet errors", "errs"),
                               ("drops", "packet drops", "drop"))
)

# Seconds; a libvirt call is a local RPC (well under a millisecond) up to --call-timeout.
CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                5.0, 10.0, 30.0)


HostSample = tuple[str | None, Sample | None]


def host_label(name: str | None) -> list[str]:
    """The `host` label's value: none for one host (its name None, as Host.tags has no
    "host"), so one host's metrics are as they always were."""
    return [] if name is None else [name]


def host_families(samples: Sequence[HostSample]) -> Iterator[Metric]:
    """One scrape's libvirt families: (host name, sample) for each host, the sample None when
    that host could not be read. With several hosts every family is labelled `host`; one
    host's name is None, which adds no label, so its metrics are as they always were."""
    extra = ["host"] if any(name is not None for name, _ in samples) else []

    def labels(*values: str) -> list[str]:
        return [*values, *extra]

    up = GaugeMetricFamily("libvirt_up", "Whether scraping libvirt's metrics was successful.",
                           labels=extra)
    count = GaugeMetricFamily("libvirt_domains", "Number of domains.", labels=extra)
    for name, sample in samples:
        up.add_metric(host_label(name), 0 if sample is None else 1)
        if sample is not None:
            count.add_metric(host_label(name), len(sample.domains))
    yield up
    read = [(name, sample) for name, sample in samples if sample is not None]
    if not read:
        return
    yield count
    by_domain = labels("domain")
    state = GaugeMetricFamily("libvirt_domain_info_state", "Code of the domain state.",
                              labels=labels("domain", "state_desc"))
    maximum = GaugeMetricFamily("libvirt_domain_info_maximum_memory_bytes",
                                "Maximum allowed memory of the domain, in bytes.",
                                labels=by_domain)
    memory = GaugeMetricFamily("libvirt_domain_info_memory_usage_bytes",
                               "Memory usage of the domain, in bytes.", labels=by_domain)
    vcpus = GaugeMetricFamily("libvirt_domain_info_virtual_cpus",
                              "Number of virtual CPUs for the domain.", labels=by_domain)
    cpu = CounterMetricFamily("libvirt_domain_info_cpu_time_seconds",
                              "Amount of CPU time used by the domain, in seconds.",
                              labels=by_domain)
    rss = GaugeMetricFamily("libvirt_domain_memory_stats_rss_bytes",
                            "Resident set size of the process running the domain, in bytes.",
                            labels=by_domain)
    for name, sample in read:
        for d in sample.domains:
            domain = [d.name, *host_label(name)]
            state.add_metric([d.name, STATE_DESC.get(d.state, STATE_DESC[0]), *host_label(name)],
                             d.state)
            maximum.add_metric(domain, d.max_memory_kib * 1024)
            memory.add_metric(domain, d.memory_kib * 1024)
            vcpus.add_metric(domain, d.vcpus)
            cpu.add_metric(domain, d.cpu_time_ns / 1e9)
            if d.rss_kib is not None:
                rss.add_metric(domain, d.rss_kib * 1024)
    yield from (state, maximum, memory, vcpus, cpu, rss)
    yield from _device_families(read, BLOCK_COUNTERS, lambda d: d.disks, extra)
    yield from _device_families(read, INTERFACE_COUNTERS, lambda d: d.interfaces, extra)


def _device_families(samples: list[tuple[str | None, Sample]],
                     counters: tuple[tuple[str, str, str], ...], devices: Any,
                     extra: list[str]) -> Iterator[Metric]:
    for name, documentation, field in counters:
        family = CounterMetricFamily(name, documentation,
                                     labels=["domain", "target_device", *extra])
        for host, sample in samples:
            tag = host_label(host)
            for d in sample.domains:
                for device in devices(d):
                    if field in device.counters:
                        family.add_metric([d.name, device.name, *tag], device.counters[field])
        yield family


class Latency:
    """A histogram of libvirt call durations (no lock: only the event loop observes)."""

    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...] = CALL_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds

    def add_to(self, family: HistogramMetricFamily, labels: list[str]) -> None:
        cumulative, total = [], 0
        for bound, count in zip((*map(str, self.buckets), "+Inf"), self.counts, strict=True):
            total += count
            cumulative.append((bound, total))
        family.add_metric(labels, cumulative, self.sum)


class Metrics:
    """webvirt's own counters, fed by the hub's events and the hosts' calls. With several
    hosts, those about libvirt are labelled by host, as libvirt's own metrics are."""

    __slots__ = ("_hub", "calls", "events", "reconnects", "rule_actions")

    def __init__(self, hub: EventHub, hosts: Iterable[Host]):
        self._hub = hub
        self.events: collections.Counter[str] = collections.Counter()
        self.rule_actions: collections.Counter[tuple[str, str]] = collections.Counter()
        # By the "host" its events carry (Host.tags): a name with several hosts, None with one.
        self.reconnects: collections.Counter[str | None] = collections.Counter()
        self.calls: dict[str | None, Latency] = {}
        for host in hosts:
            name = host.tags.get("host")
            self.reconnects[name] = 0
            self.calls[name] = Latency()
            host.call_listeners.append(self.calls[name].observe)
        hub.listen(self._count)

    def _count(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        self.events[kind] += 1
        if kind == "rule":  # the USB rules reconciler's attach or detach, and how it went
            self.rule_actions[str(event.get("action")), str(event.get("result"))] += 1
        elif kind == "connection" and event.get("state") == "restored":
            self.reconnects[event.get("host")] += 1

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("webvirt_event_clients", "Clients following the event stream.",
                                value=self._hub.client_count)
        yield GaugeMetricFamily("webvirt_stats_clients",
                                "Event-stream clients that asked for live stats messages.",
                                value=self._hub.stats_client_count)
        events = CounterMetricFamily("webvirt_events_published",
                                     "Events published on the event stream, by type.",
                                     labels=["type"])
        for kind, count in sorted(self.events.items()):
            events.add_metric([kind], count)
        yield events
        rules = CounterMetricFamily("webvirt_rule_actions",
                                    "Devices the USB rules attached or detached, by result.",
                                    labels=["action", "result"])
        for (action, result), count in sorted(self.rule_actions.items()):
            rules.add_metric([action, result], count)
        yield rules
        by_host = [] if None in self.calls else ["host"]
        reconnects = CounterMetricFamily(
            "webvirt_libvirt_reconnects", "Times the libvirt connection was lost and restored.",
            labels=by_host)
        for name, count in self.reconnects.items():
            reconnects.add_metric(host_label(name), count)
        yield reconnects
        calls = HistogramMetricFamily(
            "webvirt_libvirt_call_duration_seconds",
            "Time a libvirt call took, waiting for its connection's thread included.",
            labels=by_host)
        for name, latency in self.calls.items():
            latency.add_to(calls, host_label(name))
        yield calls


class Scrape:
    """What one GET /metrics answers: libvirt's families from this scrape's read, then
    webvirt's own."""

    __slots__ = ("_metrics", "_samples")

    def __init__(self, samples: Sequence[HostSample], metrics: Metrics):
        self._samples = samples
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        yield from host_families(self._samples)
        yield from self._metrics.collect()

    def restricted_registry(self, names: Iterable[str]) -> Restricted:
        """What prometheus-client's handler asks for when a scrape names samples (`name[]`)."""
        return Restricted(self, frozenset(names))


class Restricted:
    """A scrape's samples with these names only, as prometheus-client's RestrictedRegistry
    gives them (its registry needs collectors that describe themselves beforehand)."""

    __slots__ = ("_names", "_scrape")

    def __init__(self, scrape: Scrape, names: frozenset[str]):
        self._scrape = scrape
        self._names = names

    def collect(self) -> Iterable[Metric]:
        for family in self._scrape.collect():
            samples = [s for s in family.samples if s.name in self._names]
            if samples:
                restricted = Metric(family.name, family.documentation, family.type, family.unit)
                restricted.samples = samples
                yield restricted
