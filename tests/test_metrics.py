"""GET /metrics on libvirt's test driver, read with prometheus-client's own parser."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import libvirt
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ClientFactory
from tests.waiting import next_message, until
from webvirt import domain_stats
from webvirt import host as host_module
from webvirt.appkeys import EVENT_HUB, HOST
from webvirt.errors import ApiError

# A test-driver host whose running domain has a disk and an interface (the demo's have none),
# an empty CD-ROM drive (no counters), and a domain that is shut off.
HOST_XML = """\
<node>
  <domain type='test'>
    <name>busy</name>
    <uuid>4a2b5c2a-0d7e-4c55-9a52-3f1d0a9c0001</uuid>
    <memory unit='MiB'>512</memory>
    <currentMemory unit='MiB'>256</currentMemory>
    <vcpu>2</vcpu>
    <os><type arch='x86_64'>hvm</type></os>
    <devices>
      <disk type='file' device='disk'><source file='/guest/busy.img'/>
        <target dev='vda' bus='virtio'/></disk>
      <disk type='file' device='cdrom'><target dev='sda' bus='sata'/></disk>
      <interface type='ethernet'><mac address='aa:bb:cc:dd:ee:01'/><target dev='busy0'/>
      </interface>
    </devices>
  </domain>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>idle</name>
    <uuid>4a2b5c2a-0d7e-4c55-9a52-3f1d0a9c0002</uuid>
    <memory unit='GiB'>8</memory>
    <vcpu>6</vcpu>
    <os><type arch='x86_64'>hvm</type></os>
    <test:runstate>5</test:runstate>
  </domain>
</node>
"""
BLOCK = {"read_bytes": 1, "read_requests": 0, "write_bytes": 3, "write_requests": 2}
INTERFACE = {f"{way}_{what}": i for i, (way, what) in enumerate(
    (way, what) for way in ("receive", "transmit")
    for what in ("bytes", "packets", "errors", "drops"))}


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name -> {sorted labels: value}, by prometheus-client's parser."""
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = \
                sample.value
    return samples


async def scrape(client: TestClient, **kwargs: Any) -> dict[str, Any]:
    response = await client.get("/metrics", **kwargs)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse(await response.text())


def by_domain(samples: dict[str, Any], name: str) -> dict[str, float]:
    return {dict(labels)["domain"]: value for labels, value in samples[name].items()}


def by_device(samples: dict[str, Any], name: str) -> dict[tuple[str, str], float]:
    return {(dict(labels)["domain"], dict(labels)["target_device"]): value
            for labels, value in samples[name].items()}


@pytest.fixture
async def busy_client(make_client: ClientFactory, tmp_path: Path) -> TestClient:
    (tmp_path / "host.xml").write_text(HOST_XML)
    return await make_client(uri=f"test://{tmp_path / 'host.xml'}")


def read_libvirt(conn: libvirt.virConnect) -> dict[str, Any]:
    """What libvirt says, call by call, the way the exporters used to ask."""
    busy = conn.lookupByName("busy")
    return {"info": {d.name(): d.info() for d in conn.listAllDomains()},
            "vda": busy.blockStats("vda"), "busy0": busy.interfaceStats("busy0")}


async def test_metrics_have_the_exporters_names_labels_and_libvirts_values(
        busy_client: TestClient) -> None:
    host = busy_client.app[HOST]
    before = await host.call(read_libvirt)
    samples = await scrape(busy_client)
    after = await host.call(read_libvirt)

    assert samples["libvirt_up"] == {(): 1.0}
    assert samples["libvirt_domains"] == {(): 2.0}
    assert samples["libvirt_domain_info_state"] == {
        (("domain", "busy"), ("state_desc", "the domain is running")): 1.0,
        (("domain", "idle"), ("state_desc", "the domain is shut off")): 5.0,
    }
    info = after["info"]
    assert by_domain(samples, "libvirt_domain_info_maximum_memory_bytes") == {
        name: i[1] * 1024 for name, i in info.items()}
    assert by_domain(samples, "libvirt_domain_info_memory_usage_bytes") == {
        name: i[2] * 1024 for name, i in info.items()}
    assert by_domain(samples, "libvirt_domain_info_virtual_cpus") == {"busy": 2, "idle": 6}
    cpu = by_domain(samples, "libvirt_domain_info_cpu_time_seconds_total")
    assert cpu["idle"] == 0  # shut off, also for Grafana's rate()
    # The test driver's counters follow the clock: the scrape falls between two reads.
    assert before["info"]["busy"][4] / 1e9 <= cpu["busy"] <= info["busy"][4] / 1e9

    # Disks and interfaces of the running domain only; the empty CD-ROM drive has none.
    for name, index in BLOCK.items():
        value = by_device(samples, f"libvirt_domain_block_stats_{name}_total")
        assert list(value) == [("busy", "vda")], name
        assert before["vda"][index] <= value["busy", "vda"] <= after["vda"][index], name
    for name, index in INTERFACE.items():
        value = by_device(samples, f"libvirt_domain_interface_stats_{name}_total")
        assert list(value) == [("busy", "busy0")], name
        assert before["busy0"][index] <= value["busy", "busy0"] <= after["busy0"][index], name


def running(name: str, devices: str) -> str:
    return (f"<domain type='test'><name>{name}</name><memory unit='MiB'>64</memory>"
            f"<os><type arch='x86_64'>hvm</type></os><devices>{devices}</devices></domain>")


BALLOON = "<memballoon model='virtio'/>"


def disk(target: str) -> str:
    return (f"<disk type='file' device='disk'><source file='/guest/{target}.img'/>"
            f"<target dev='{target}' bus='virtio'/></disk>")


MONITOR_HOST_XML = "<node>" + "".join((
    running("disked", disk("vda") + BALLOON),
    running("two-disks", disk("vda") + disk("vdb") + BALLOON),
    running("ballooned", BALLOON),
    running("vfio", "<memballoon model='none'/>"),
)) + "</node>"


def ask_log(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Which domains each stats call asked about, and for which groups."""
    asked: list[tuple[str, int]] = []
    every_domain = libvirt.virConnect.getAllDomainStats
    some_domains = libvirt.virConnect.domainListGetStats

    def every(conn: libvirt.virConnect, stats: int = 0, flags: int = 0) -> Any:
        asked.append(("*", stats))
        return every_domain(conn, stats, flags)

    def some(conn: libvirt.virConnect, doms: list[libvirt.virDomain], stats: int = 0,
             flags: int = 0) -> Any:
        asked.append((",".join(sorted(d.name() for d in doms)), stats))
        return some_domains(conn, doms, stats, flags)

    monkeypatch.setattr(libvirt.virConnect, "getAllDomainStats", every)
    monkeypatch.setattr(libvirt.virConnect, "domainListGetStats", some)
    return asked


async def test_the_qemu_monitor_is_asked_only_what_a_domain_has(
        make_client: ClientFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The groups that cost a QEMU monitor round trip per domain (bench/usage.py) are asked of
    the domains that have the device: block stats of those with disks, balloon stats (RSS) of
    those without a balloon, where they need no monitor. The rest is one bulk call."""
    (tmp_path / "host.xml").write_text(MONITOR_HOST_XML)
    client = await make_client(uri=f"test://{tmp_path / 'host.xml'}")
    asked = ask_log(monkeypatch)
    # A single disk is one blockStats() call: one monitor command, where the block group
    # makes two.
    one_by_one: list[tuple[str, str]] = []
    block_stats = libvirt.virDomain.blockStats

    def noted(dom: libvirt.virDomain, path: str) -> Any:
        one_by_one.append((dom.name(), path))
        return block_stats(dom, path)

    monkeypatch.setattr(libvirt.virDomain, "blockStats", noted)
    samples = await scrape(client)
    assert asked[0] == ("*", domain_stats.BULK_GROUPS)
    assert sorted(asked[1:]) == [("two-disks", libvirt.VIR_DOMAIN_STATS_BLOCK),
                                 ("vfio", libvirt.VIR_DOMAIN_STATS_BALLOON)]
    # (The test driver's block group names no disks: two-disks is read disk by disk too, in
    # the order the connection claims the domains, which is by UUID.)
    assert one_by_one.count(("disked", "vda")) == 1
    assert list(by_device(samples, "libvirt_domain_block_stats_read_bytes_total")) == [
        ("disked", "vda"), ("two-disks", "vda"), ("two-disks", "vdb")]
    assert set(by_domain(samples, "libvirt_domain_info_memory_usage_bytes")) == {
        "disked", "two-disks", "ballooned", "vfio"}

    # /api/0/domains needs none of it.
    asked.clear()
    assert (await client.get("/api/0/domains")).status == 200
    assert asked == [("*", domain_stats.BULK_GROUPS)]


@pytest.mark.parametrize("trouble", ["busy", "unreadable"])
async def test_a_single_disk_libvirt_cannot_read_at_once_is_left_to_the_block_group(
        make_client: ClientFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        trouble: str) -> None:
    """blockStats() would wait out a job the domain is busy with (libvirt's 30 s job timeout,
    then the connection goes): a busy domain is asked with the group, NOWAIT. A disk
    blockStats() cannot read (vhost-user) is the group's too, and the domain stays."""
    (tmp_path / "host.xml").write_text(MONITOR_HOST_XML)
    client = await make_client(uri=f"test://{tmp_path / 'host.xml'}")
    asked = ask_log(monkeypatch)
    if trouble == "busy":
        control_info = libvirt.virDomain.controlInfo

        def occupied(dom: libvirt.virDomain, flags: int = 0) -> list[int]:
            if dom.name() == "disked":
                return [libvirt.VIR_DOMAIN_CONTROL_OCCUPIED, 0, 1000]
            return list(control_info(dom, flags))

        monkeypatch.setattr(libvirt.virDomain, "controlInfo", occupied)
    else:
        block_stats = libvirt.virDomain.blockStats
        refused: list[str] = []

        def unreadable(dom: libvirt.virDomain, path: str) -> Any:
            # Once: the test driver's group names no disks, and reads them one by one too.
            if dom.name() == "disked" and not refused:
                refused.append(path)
                raise FakeError()
            return block_stats(dom, path)

        monkeypatch.setattr(libvirt.virDomain, "blockStats", unreadable)
    samples = await scrape(client)
    assert ("disked", libvirt.VIR_DOMAIN_STATS_BLOCK) in asked
    assert ("disked", "vda") in by_device(samples, "libvirt_domain_block_stats_read_bytes_total")
    assert "disked" in by_domain(samples, "libvirt_domain_info_memory_usage_bytes")


def test_each_domain_is_read_once_by_the_first_connection_to_claim_it() -> None:
    """Each connection lists the domains for itself and reads those no other has claimed: one
    that comes first reads them all, and a domain defined between two listings is read once."""
    first, second = libvirt.open("test:///default"), libvirt.open("test:///default")
    defined = [first.defineXML(running(f"claim{i}", "")) for i in range(6)]
    try:
        before = {d.name() for d in first.listAllDomains()}
        claims = domain_stats.Claims()
        # Starts halfway along the order, yet takes every domain: no other has claimed any.
        part = domain_stats.read_claimed(first, claims, part=1, parts=2)
        defined.append(second.defineXML(running("newcomer", "")))
        other = domain_stats.read_claimed(second, claims, part=0, parts=2)
        assert sorted(d.name for d in part.domains) == sorted(before)
        assert [d.name for d in other.domains] == ["newcomer"]
    finally:
        for dom in defined:
            dom.undefine()
        first.close()
        second.close()


class FakeError(libvirt.libvirtError):
    def __init__(self) -> None:
        super().__init__("this domain's stats cannot be had")

    def get_error_code(self) -> int:
        return libvirt.VIR_ERR_OPERATION_FAILED  # not a lost connection


class FakeDomain:
    def __init__(self, name: str, fails: bool = False):
        self._name, self.fails = name, fails

    def name(self) -> str:
        return self._name

    def UUIDString(self) -> str:  # noqa: N802 (libvirt's name)
        return f"00000000-0000-0000-0000-{self._name.encode().hex()[:12]:0>12}"

    def info(self) -> list[int]:
        if self.fails:
            raise FakeError()
        return [libvirt.VIR_DOMAIN_SHUTOFF, 2048, 1024, 1, 0]


class FailingBulkConnection:
    """QEMU fails the whole bulk call when one domain's stats fail."""

    def __init__(self) -> None:
        self.domains = [FakeDomain("good"), FakeDomain("bad", fails=True), FakeDomain("fine")]

    def getAllDomainStats(self, stats: int, flags: int) -> Any:  # noqa: N802
        raise FakeError()

    def listAllDomains(self, flags: int = 0) -> list[FakeDomain]:  # noqa: N802
        return self.domains

    def domainListGetStats(self, doms: list[FakeDomain], stats: int,  # noqa: N802
                           flags: int) -> Any:
        if doms[0].fails:
            raise FakeError()
        return [(doms[0], {"state.state": libvirt.VIR_DOMAIN_SHUTOFF})]


def test_a_failing_domain_does_not_fail_the_read() -> None:
    sample = domain_stats.read(FailingBulkConnection())  # type: ignore[arg-type]
    assert [d.name for d in sample.domains] == ["good", "fine"]
    assert sample.failed == ["bad"]


async def test_metrics_while_libvirt_is_unreachable(client: TestClient,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_module, "RECONNECT_DELAYS_S", (60,))  # stays away for the test
    host = client.app[HOST]
    async with client.ws_connect("/api/0/events?type=connection") as ws:
        await next_message(ws, lambda m: m["type"] == "snapshot")
        with pytest.raises(ApiError):  # a call past its time retires the session
            await host.call(lambda _conn: time.sleep(0.5), seconds=0.05)
        await next_message(ws, lambda m: m["type"] == "connection")
        samples = await scrape(client)
    assert samples["libvirt_up"] == {(): 0.0}
    assert not any(name.startswith("libvirt_domain") for name in samples)
    assert samples["webvirt_event_clients"] == {(): 1.0}  # webvirt's own still answer


async def test_webvirts_own_counters(client: TestClient) -> None:
    host, hub = client.app[HOST], client.app[EVENT_HUB]
    first = await scrape(client)
    async with client.ws_connect("/api/0/events?type=lifecycle,connection") as ws, \
            client.ws_connect("/api/0/events?type=stats") as _stats:
        await next_message(ws, lambda m: m["type"] == "snapshot")
        await until(lambda: hub.client_count == 2, 5, "both clients subscribed")
        assert (await client.get("/api/0/start/win11")).status == 200
        await next_message(ws, lambda m: m["type"] == "lifecycle")
        # The USB rules reconciler publishes what it did as `rule` events (it needs real USB,
        # tests/test_usb_rules_lab.py); the counters count what the hub carries.
        hub.publish("rule", rule=1, domain="win11", action="attach", result="ok")
        hub.publish("rule", rule=1, domain="win11", action="attach", result="error")
        hub.publish("rule", rule=1, domain="win11", action="attach", result="ok")
        with pytest.raises(ApiError):  # a stuck call: lost, then reconnected
            await host.call(lambda _conn: time.sleep(0.5), seconds=0.05)
        await next_message(ws, lambda m: m.get("state") == "restored")
        samples = await scrape(client)
    assert samples["webvirt_event_clients"] == {(): 2.0}
    assert samples["webvirt_stats_clients"] == {(): 1.0}
    published = {dict(k)["type"]: v for k, v in samples["webvirt_events_published_total"].items()}
    assert published["lifecycle"] >= 1
    assert published["rule"] == 3
    assert published["connection"] == 2  # lost, restored
    assert samples["webvirt_rule_actions_total"] == {
        (("action", "attach"), ("result", "error")): 1.0,
        (("action", "attach"), ("result", "ok")): 2.0}
    assert samples["webvirt_libvirt_reconnects_total"] == {(): 1.0}
    calls = samples["webvirt_libvirt_call_duration_seconds_count"][()]
    assert calls > first["webvirt_libvirt_call_duration_seconds_count"][()]
    buckets = samples["webvirt_libvirt_call_duration_seconds_bucket"]
    assert buckets[(("le", "+Inf"),)] == calls
    assert buckets[(("le", "0.025"),)] < calls  # the stuck call took 50 ms


async def test_the_token_rule_of_the_api(make_client: ClientFactory) -> None:
    client = await make_client(token="full-secret", read_tokens=("reader-secret",))
    refused = await client.get("/metrics")
    assert refused.status == 401
    assert (await refused.json())["code"] == "unauthorized"
    for token in ("reader-secret", "full-secret"):
        samples = await scrape(client, headers={"Authorization": f"Bearer {token}"})
        assert samples["libvirt_up"] == {(): 1.0}
    assert (await client.get("/metrics?token=reader-secret")).status == 200
    cross_site = await client.get("/metrics?token=reader-secret",
                                  headers={"Sec-Fetch-Site": "cross-site"})
    assert cross_site.status == 403


async def test_openmetrics_when_asked(client: TestClient) -> None:
    response = await client.get("/metrics",
                                headers={"Accept": "application/openmetrics-text"})
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await response.text()).endswith("# EOF\n")


async def test_name_parameters_pick_samples_as_prometheus_client_does(client: TestClient) -> None:
    # What Prometheus sends for a scrape config's `params: {"name[]": [...]}`.
    response = await client.get("/metrics?name[]=libvirt_up"
                                "&name[]=webvirt_event_clients")
    assert response.status == 200, await response.text()
    samples = parse(await response.text())
    assert set(samples) == {"libvirt_up", "webvirt_event_clients"}
    assert samples["libvirt_up"] == {(): 1.0}
    nothing = await client.get("/metrics?name[]=no_such_metric")
    assert nothing.status == 200
    assert parse(await nothing.text()) == {}
