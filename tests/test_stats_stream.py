"""Live usage (`stats` messages) on the event stream, on libvirt's test driver; the numbers
from a real QEMU guest are checked in tests/test_qemu_metrics.py."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import libvirt
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import ClientFactory
from tests.waiting import next_message, until
from webvirt import usage
from webvirt.appkeys import EVENT_HUB
from webvirt.cli import build_parser
from webvirt.domain_stats import Device, DomainStats, Sample
from webvirt.hub import EventFilter


async def next_json(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    message = await ws.receive(timeout=5)
    assert message.type == aiohttp.WSMsgType.TEXT, message
    return json.loads(message.data)


def is_type(kind: str) -> Any:
    return lambda message: message["type"] == kind


@pytest.fixture
async def live(make_client: ClientFactory) -> TestClient:
    return await make_client(stats_interval_s=0.05)


def test_the_default_filter_leaves_stats_out() -> None:
    assert not EventFilter.from_query({}).wants("stats", None)
    assert not EventFilter.from_query({"type": "lifecycle,device"}).wants("stats", None)
    assert EventFilter.from_query({"type": "stats"}).wants("stats", None)
    assert EventFilter.from_query({"type": "lifecycle,stats"}).wants_stats
    assert EventFilter.from_query({}).wants("lifecycle", None)  # still every event


async def test_stats_go_only_to_clients_that_ask(live: TestClient) -> None:
    async with live.ws_connect("/api/0/events") as plain, \
            live.ws_connect("/api/0/events?type=stats") as watcher:
        assert (await next_json(plain))["type"] == "snapshot"
        assert (await next_json(watcher))["type"] == "snapshot"
        first = await next_message(watcher, is_type("stats"))
        second = await next_message(watcher, is_type("stats"))
        # Active domains only (win11 is shut off), by name, with every figure.
        assert [d["domain"] for d in second["domains"]] == ["linux-dev", "media-server"]
        assert second["host_cpus"] == 16  # the test driver's pretend host
        assert second["time"] > first["time"]
        assert 0 < second["interval"] < 5
        linux = second["domains"][0]
        assert set(linux) == {
            "domain", "uuid", "state", "cpu_percent", "guest_cpu_percent", "cpu_time_seconds",
            "vcpus", "memory_bytes", "memory_source", "memory_total_bytes",
            "disk_read_bytes_per_s", "disk_write_bytes_per_s", "net_rx_bytes_per_s",
            "net_tx_bytes_per_s"}
        assert (linux["state"], linux["vcpus"]) == ("running", 4)
        assert (linux["memory_bytes"], linux["memory_source"]) == (4 << 30, "allocated")
        # The client without ?type=stats got none: the next thing it gets is the next event.
        assert (await live.get("/api/0/start/win11")).status == 200
        assert (await next_json(plain))["type"] == "lifecycle"


async def test_stats_are_no_events(live: TestClient) -> None:
    hub = live.app[EVENT_HUB]
    async with live.ws_connect("/api/0/events?type=stats,lifecycle") as ws:
        snapshot = await next_json(ws)
        stats = await next_message(ws, is_type("stats"))
        # No number of their own: they carry the latest event's, as heartbeats do.
        assert (stats["seq"], stats["id"]) == (snapshot["seq"], snapshot["id"]) == (
            hub.seq, f"{hub.stream_id}-{hub.seq}")
        assert (await live.get("/api/0/start/win11")).status == 200
        started = await next_message(ws, is_type("lifecycle"))
        assert started["seq"] == stats["seq"] + 1
        later = await next_message(ws, is_type("stats"))
        assert later["seq"] >= started["seq"]
    assert all(published.kind != "stats" for published in hub._replay)
    # Resuming from a stats message is resuming from the event it carries: what followed it
    # comes first, and no stale stats are replayed.
    async with live.ws_connect(
            f"/api/0/events?type=stats,lifecycle&last_event_id={stats['id']}") as again:
        replayed = await next_json(again)
        assert (replayed["type"], replayed["seq"]) == ("lifecycle", started["seq"])


async def test_a_domain_filter_applies_to_stats(live: TestClient) -> None:
    async with live.ws_connect("/api/0/events?type=stats&domain=media-server") as one, \
            live.ws_connect("/api/0/events?type=stats") as every:
        mine = await next_message(one, is_type("stats"))
        assert [d["domain"] for d in mine["domains"]] == ["media-server"]
        assert mine["domains"][0]["state"] == "paused"
        every_stats = await next_message(every, is_type("stats"))
        assert len(every_stats["domains"]) == 2


async def test_sampling_runs_only_while_someone_listens(
        make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[bool] = []
    real_read = usage.read_usage

    def counted(conn: libvirt.virConnect, with_cpus: bool) -> Any:
        reads.append(with_cpus)
        return real_read(conn, with_cpus)

    monkeypatch.setattr(usage, "read_usage", counted)
    client = await make_client(stats_interval_s=0.02, heartbeat_s=0.2)
    hub = client.app[EVENT_HUB]
    async with client.ws_connect("/api/0/events") as plain:
        await next_json(plain)
        # Two heartbeats: ten stats intervals or more, with a client that wants no stats.
        for _ in range(2):
            await next_message(plain, is_type("heartbeat"))
        assert reads == []
        async with client.ws_connect("/api/0/events?type=stats") as watcher:
            for _ in range(2):
                await next_message(watcher, is_type("stats"))
        await until(lambda: hub.stats_client_count == 0, 5, "the stats client left")
        done = len(reads)
        assert done >= 3
        assert reads[0] is True and not any(reads[1:])  # the host's CPUs once per session
        for _ in range(2):
            await next_message(plain, is_type("heartbeat"))
        assert len(reads) <= done + 1  # at most the read that was under way


def domain(cpu_s: float, *, vcpus: int = 2, rss_kib: int | None = None,
           guest_used_kib: int | None = None, disk: tuple[int, int] = (0, 0),
           net: tuple[int, int] = (0, 0)) -> DomainStats:
    return DomainStats(
        name="win11", uuid="u-1", state=libvirt.VIR_DOMAIN_RUNNING,
        cpu_time_ns=int(cpu_s * 1e9), vcpus=vcpus, max_memory_kib=8192, memory_kib=4096,
        rss_kib=rss_kib, guest_used_kib=guest_used_kib,
        disks=[Device("vda", {"rd.bytes": disk[0], "wr.bytes": disk[1]})],
        interfaces=[Device("vnet0", {"rx.bytes": net[0], "tx.bytes": net[1]})])


def test_cpu_percent_as_virt_manager_computes_it() -> None:
    # 1 s of CPU time over 2 s of wall time: 50% of one CPU.
    figures = usage.usage(domain(10), domain(11), seconds=2, host_cpus=4)
    assert (figures["cpu_percent"], figures["guest_cpu_percent"]) == (12.5, 25.0)
    # Within 0-100 whatever the clocks say; a counter that went back counts as nothing.
    busy = usage.usage(domain(10, vcpus=1), domain(14, vcpus=1), seconds=1, host_cpus=2)
    assert (busy["cpu_percent"], busy["guest_cpu_percent"]) == (100.0, 100.0)
    restarted = usage.usage(domain(10), domain(1), seconds=1, host_cpus=2)
    assert (restarted["cpu_percent"], restarted["guest_cpu_percent"]) == (0.0, 0.0)


def test_memory_in_use_and_rates() -> None:
    before = domain(0, disk=(1000, 500), net=(300, 100))
    guest = usage.usage(before, domain(0, rss_kib=3000, guest_used_kib=1000,
                                       disk=(5000, 500), net=(900, 50)), 2, 2)
    assert (guest["memory_bytes"], guest["memory_source"]) == (1000 * 1024, "guest")
    assert guest["memory_total_bytes"] == 4096 * 1024
    assert (guest["disk_read_bytes_per_s"], guest["disk_write_bytes_per_s"]) == (2000, 0)
    assert (guest["net_rx_bytes_per_s"], guest["net_tx_bytes_per_s"]) == (300, 0)
    vfio = usage.usage(before, domain(0, rss_kib=3000), 2, 2)  # no balloon driver: RSS
    assert (vfio["memory_bytes"], vfio["memory_source"]) == (3000 * 1024, "rss")


def test_a_domain_is_told_once_two_samples_have_it() -> None:
    old, new = domain(1), domain(2)
    newcomer = DomainStats(name="fresh", uuid="u-2", state=1, cpu_time_ns=5, vcpus=1,
                           max_memory_kib=1, memory_kib=1)
    figures = usage.usages(Sample([old], [], 10.0, 10.1), Sample([new, newcomer], [], 12.0,
                                                                  12.1), 2)
    assert figures is not None
    assert [f["domain"] for f in figures] == ["win11"]
    assert figures[0]["cpu_percent"] == 25.0


def test_no_figures_from_reads_of_unlike_length() -> None:
    # A first read that took 2 s (libvirt's first CPU statistics of a daemon do), then a
    # quick one: when the first read the counters is known only within those 2 s.
    slow, quick = Sample([domain(1)], [], 10.0, 12.0), Sample([domain(4)], [], 13.0, 13.01)
    assert usage.usages(slow, quick, 2) is None
    steady = Sample([domain(4.5)], [], 14.0, 14.05)
    assert usage.usages(quick, steady, 2) is not None


@pytest.mark.parametrize("value", ["0", "-1", "nan", "soon"])
def test_the_stats_interval_must_be_positive(value: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--stats-interval", value])
    assert "--stats-interval" in capsys.readouterr().err
    assert build_parser().parse_args(["--stats-interval", "0.5"]).stats_interval == 0.5
    assert build_parser().parse_args([]).stats_interval == 2.0
