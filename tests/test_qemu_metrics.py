"""/metrics, live stats and /api/0/domains against a real libvirtd running real QEMU guests.

Interfaces are left to tests/test_metrics.py (test driver): a session daemon cannot make tap
devices, and libvirt has no counters for user-mode networking.
"""

from __future__ import annotations

import os
import pwd
import sys
import threading
from typing import Any

import libvirt
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import ClientFactory
from tests.libvirt_daemon import LibvirtDaemon, guest_xml
from tests.test_metrics import by_device, by_domain, scrape
from tests.waiting import next_message, until
from webvirt.domains import state_name

pytestmark = pytest.mark.qemu

# A boot sector that spins (jmp $): SeaBIOS boots it, and the guest's one vCPU stays busy.
SPIN = b"\xeb\xfe" + bytes(508) + b"\x55\xaa"


def spinning_guest(daemon: LibvirtDaemon, name: str) -> str:
    """A guest whose disk boots into a busy loop (and is read once, by the BIOS). Like a VFIO
    guest, it has no memory balloon: its memory in use is its QEMU process's RSS."""
    image = daemon.base / f"{name}.img"
    image.write_bytes(SPIN + bytes((1 << 20) - len(SPIN)))
    if daemon.user:
        entry = pwd.getpwnam(daemon.user)
        os.chown(image, entry.pw_uid, entry.pw_gid)
    disk = (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            f"<source file='{image}'/><target dev='vda' bus='virtio'/></disk>\n    "
            "<memballoon model='none'/>\n    ")
    return guest_xml(name).replace("<controller", disk + "<controller", 1)


def cold_guest(name: str) -> str:
    """Shut off, with less memory than its maximum and one of its two vCPUs."""
    return (guest_xml(name)
            .replace("<memory unit='MiB'>128</memory>",
                     "<memory unit='MiB'>256</memory><currentMemory unit='MiB'>128</currentMemory>")
            .replace("<vcpu>1</vcpu>", "<vcpu current='1'>2</vcpu>"))


def read_libvirt(conn: libvirt.virConnect) -> dict[str, Any]:
    spin = conn.lookupByName("spin")
    return {"info": {d.name(): d.info() for d in conn.listAllDomains()},
            "vda": spin.blockStats("vda"), "rss": spin.memoryStats()["rss"]}


async def test_metrics_of_real_guests(qemu_client: TestClient, qemu_conn: libvirt.virConnect,
                                      libvirt_daemon: LibvirtDaemon) -> None:
    spin = qemu_conn.defineXML(spinning_guest(libvirt_daemon, "spin"))
    spin.create()
    qemu_conn.defineXML(cold_guest("cold"))
    # Until the BIOS has read the boot sector (a moment after the start, longer under load).
    await until(lambda: spin.blockStats("vda")[1] >= 512, 30, "the boot sector is read")
    before = read_libvirt(qemu_conn)
    samples = await scrape(qemu_client)
    after = read_libvirt(qemu_conn)

    assert samples["libvirt_up"] == {(): 1.0}
    assert samples["libvirt_domain_info_state"] == {
        (("domain", "spin"), ("state_desc", "the domain is running")): 1.0,
        (("domain", "cold"), ("state_desc", "the domain is shut off")): 5.0,
    }
    info = after["info"]
    for name, index in (("maximum_memory_bytes", 1), ("memory_usage_bytes", 2)):
        assert by_domain(samples, f"libvirt_domain_info_{name}") == {
            domain: values[index] * 1024 for domain, values in info.items()}, name
    assert info["cold"][1:3] == [256 << 10, 128 << 10]  # the two differ where they can
    assert by_domain(samples, "libvirt_domain_info_virtual_cpus") == {"spin": 1, "cold": 1}
    cpu = by_domain(samples, "libvirt_domain_info_cpu_time_seconds_total")
    assert before["info"]["spin"][4] / 1e9 <= cpu["spin"] <= info["spin"][4] / 1e9
    assert cpu["cold"] == 0
    rss = by_domain(samples, "libvirt_domain_memory_stats_rss_bytes")
    assert list(rss) == ["spin"]
    low, high = sorted((before["rss"], after["rss"]))
    assert low * 1024 * 0.8 <= rss["spin"] <= high * 1024 * 1.2  # it moves a little
    # The disk, read once by the BIOS (the boot sector), never written.
    for name, index in (("read_requests", 0), ("read_bytes", 1), ("write_requests", 2),
                        ("write_bytes", 3)):
        value = by_device(samples, f"libvirt_domain_block_stats_{name}_total")
        assert list(value) == [("spin", "vda")], name
        assert before["vda"][index] <= value["spin", "vda"] <= after["vda"][index], name
    assert by_device(samples, "libvirt_domain_block_stats_read_bytes_total")["spin", "vda"] \
        >= 512


async def test_a_scrape_asks_the_monitors_over_several_connections_at_once(
        qemu_client: TestClient, qemu_conn: libvirt.virConnect,
        libvirt_daemon: LibvirtDaemon) -> None:
    """libvirt asks each QEMU in turn: the block stats of many guests are read over the host's
    connections side by side (bench/usage.py: 50 guests). The first monitor call waits until
    another connection makes one: read one after the other, it would wait in vain."""
    names = [f"disk{i}" for i in range(3)]
    for name in names:
        qemu_conn.defineXML(spinning_guest(libvirt_daemon, name)).create()
        qemu_conn.lookupByName(name).suspend()  # active, with a disk, not spinning
    callers: list[str] = []
    first_waited: list[bool] = []
    another = threading.Event()
    original = libvirt.virDomain.blockStats

    lock = threading.Lock()

    def side_by_side(dom: libvirt.virDomain, path: str) -> Any:
        me = threading.current_thread().name
        with lock:
            callers.append(me)
            first = len(callers) == 1
            if callers[0] != me:
                another.set()
        if first:
            first_waited.append(another.wait(20))
        return original(dom, path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(libvirt.virDomain, "blockStats", side_by_side)
        samples = await scrape(qemu_client)
    assert first_waited == [True], callers
    assert len(callers) == len(names), callers  # each guest's disk read once
    assert sorted(by_device(samples, "libvirt_domain_block_stats_read_requests_total")) == [
        (name, "vda") for name in names]


async def test_stats_show_a_running_guests_cpu(make_client: ClientFactory,
                                               qemu_conn: libvirt.virConnect,
                                               libvirt_daemon: LibvirtDaemon) -> None:
    spin = qemu_conn.defineXML(spinning_guest(libvirt_daemon, "spin"))
    spin.create()
    client = await make_client(uri=libvirt_daemon.uri, stats_interval_s=0.5)

    def spin_stats(message: dict[str, Any]) -> bool:
        return message["type"] == "stats" and bool(message["domains"])

    async with client.ws_connect("/api/0/events?type=stats&domain=spin") as ws:
        # Once SeaBIOS has booted the loop, it keeps its vCPU busy (TCG, on a shared machine:
        # not a whole core).
        message = await next_message(
            ws, lambda m: spin_stats(m) and m["domains"][0]["guest_cpu_percent"] > 20, 60)
        running = message["domains"][0]
        assert (running["domain"], running["state"], running["vcpus"]) == ("spin", "running", 1)
        later = (await next_message(ws, spin_stats, 30))["domains"][0]
        assert later["cpu_time_seconds"] > running["cpu_time_seconds"]
        host_cpus = message["host_cpus"]
        assert host_cpus == qemu_conn.getInfo()[2]
        # Host view: of all the host's CPUs; guest view: of its one vCPU, at most 100 (QEMU's
        # other threads count too, so the process can use more than one CPU).
        assert running["cpu_percent"] < running["guest_cpu_percent"]
        assert abs(min(100, running["cpu_percent"] * host_cpus)
                   - running["guest_cpu_percent"]) < 0.1
        # No balloon driver runs in the guest (as in a VFIO guest): memory in use is the RSS.
        assert running["memory_source"] == "rss"
        assert 0 < running["memory_bytes"] <= 2 * running["memory_total_bytes"]
        assert running["memory_total_bytes"] == 128 << 20

        spin.suspend()
        await next_message(ws, lambda m: spin_stats(m) and m["domains"][0]["state"] == "paused")
        paused = (await next_message(ws, spin_stats, 30))["domains"][0]  # a whole interval
        assert paused["guest_cpu_percent"] < running["guest_cpu_percent"] / 2, (paused, running)


def call_by_call(conn: libvirt.virConnect) -> list[dict[str, Any]]:
    """/api/0/domains as it was computed before the bulk read: three calls per domain."""
    summaries = []
    for dom in conn.listAllDomains():
        state, _max, memory, vcpus, _cpu = dom.info()
        summaries.append({"name": dom.name(), "uuid": dom.UUIDString(),
                          "state": state_name(state), "vcpus": vcpus, "memory_kib": memory,
                          "autostart": bool(dom.autostart()),
                          "persistent": bool(dom.isPersistent())})
    return sorted(summaries, key=lambda d: d["name"])


async def test_the_domain_list_is_what_libvirt_says(qemu_client: TestClient,
                                                    qemu_conn: libvirt.virConnect,
                                                    libvirt_daemon: LibvirtDaemon) -> None:
    qemu_conn.defineXML(spinning_guest(libvirt_daemon, "spin")).create()
    qemu_conn.defineXML(cold_guest("cold")).setAutostart(1)
    qemu_conn.createXML(guest_xml("passing"))  # transient
    qemu_conn.defineXML(guest_xml("paused")).create()
    qemu_conn.lookupByName("paused").suspend()
    calls: list[str] = []

    def counted(name: str, original: Any) -> Any:
        def call(*args: Any) -> Any:
            # The host's own re-reads after the events above may run meanwhile: not counted.
            if sys._getframe(1).f_globals["__name__"] != "webvirt.host":
                calls.append(name)
            return original(*args)
        return call

    with pytest.MonkeyPatch.context() as patch:
        for cls, name in ((libvirt.virConnect, "getAllDomainStats"), (libvirt.virDomain, "info"),
                          (libvirt.virDomain, "autostart"), (libvirt.virDomain, "isPersistent")):
            patch.setattr(cls, name, counted(name, getattr(cls, name)))
        response = await qemu_client.get("/api/0/domains")
        assert response.status == 200
        listing = await response.json()
    # One bulk call for the states, info() per domain (it reads /proc, never the QEMU monitor),
    # two listings for autostart and persistence: no monitor round trip (bench/usage.py).
    assert calls == ["getAllDomainStats"] + ["info"] * 4
    assert listing == call_by_call(qemu_conn)
    assert {d["name"]: (d["autostart"], d["persistent"], d["state"]) for d in listing} == {
        "cold": (True, True, "shutoff"), "passing": (False, False, "running"),
        "paused": (False, True, "paused"), "spin": (False, True, "running")}

