"""Several libvirt hosts in one webvirt, on libvirt's test driver: naming, addressing, events,
the hosts list, and what stays as it was with one host.

Hosts a and b are private copies of the demo host (the same domain names and UUIDs on both);
c is test:///default, whose only domain, `test`, no other host has.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DEMO_HOST_URI, ClientFactory
from tests.processes import REPO, free_port
from tests.waiting import next_message
from webvirt.appkeys import EVENT_HUB, HOSTS
from webvirt.errors import ApiError
from webvirt.hosts import HostError, HostSpec, host_specs, parse_connect, split_ref

SEVERAL = (HostSpec("a", DEMO_HOST_URI), HostSpec("b", DEMO_HOST_URI),
           HostSpec("c", "test:///default"))
NOWHERE = "qemu+unix:///session?socket=/nonexistent/libvirt-sock"


@pytest.fixture
async def several(make_client: ClientFactory) -> TestClient:
    return await make_client(hosts=SEVERAL)


async def answer(client: TestClient, path: str) -> tuple[int, Any]:
    response = await client.get(path)
    return response.status, await response.json()


def is_type(kind: str) -> Any:
    return lambda message: message["type"] == kind


# Naming (--connect).

@pytest.mark.parametrize(("text", "name", "uri"), [
    ("qemu:///system", "local", "qemu:///system"),
    ("qemu+ssh://gamer@desk/system", "desk", "qemu+ssh://gamer@desk/system"),
    ("qemu+tcp://192.168.1.20/system", "192.168.1.20", "qemu+tcp://192.168.1.20/system"),
    ("qemu+ssh://[::1]/system", "local", "qemu+ssh://[::1]/system"),
    ("gamer=qemu+ssh://me@desk/system", "gamer", "qemu+ssh://me@desk/system"),
    ("qemu+unix:///session?socket=/run/s", "local", "qemu+unix:///session?socket=/run/s"),
    ("lab=qemu+unix:///session?socket=/run/s", "lab", "qemu+unix:///session?socket=/run/s"),
])
def test_a_host_is_named_by_the_user_or_after_its_uri(text: str, name: str, uri: str) -> None:
    assert parse_connect(text) == HostSpec(name, uri)


def test_no_connect_is_one_host_named_local() -> None:
    assert host_specs([]) == (HostSpec("local", None),)


@pytest.mark.parametrize(("values", "says"), [
    (["qemu:///system", "test:///default"], "two hosts are named 'local'"),
    (["a=test:///default", "a=qemu:///system"], "two hosts are named 'a'"),
    (["me@desk=qemu:///system"], "host name 'me@desk'"),
    (["a b=qemu:///system"], "host name 'a b'"),
    (["a="], "no URI"),
])
def test_bad_or_taken_host_names_are_refused(values: list[str], says: str) -> None:
    with pytest.raises(HostError, match=says):
        host_specs(values)


def test_split_ref() -> None:
    assert split_ref("win11@desk") == ("win11", "desk")
    assert split_ref("win11") == ("win11", None)
    assert split_ref("@desk") == ("@desk", None)
    assert split_ref("win11@no host") == ("win11@no host", None)


# GET /api/0/hosts.

async def test_hosts_lists_each_host(several: TestClient) -> None:
    status, hosts = await answer(several, "/api/0/hosts")
    assert status == 200
    assert [(h["name"], h["uri"], h["connected"]) for h in hosts] == [
        ("a", DEMO_HOST_URI, True), ("b", DEMO_HOST_URI, True), ("c", "test:///default", True)]
    for host in hosts:
        assert host["hypervisor"] == "TEST"
        assert host["libvirt_version"].count(".") == 2


async def test_hosts_lists_the_one_host_too(client: TestClient) -> None:
    status, hosts = await answer(client, "/api/0/hosts")
    assert status == 200
    assert [(h["name"], h["connected"], h["hypervisor"]) for h in hosts] == [
        ("local", True, "TEST")]


# Addressing.

async def test_a_name_on_one_host_needs_no_host(several: TestClient) -> None:
    assert await answer(several, "/api/0/state/test") == (200, "running")
    status, body = await answer(several, "/api/0/status/test")
    assert (status, body["host"], body["domain"]) == (200, "c", "test")


async def test_a_name_on_several_hosts_is_ambiguous(several: TestClient) -> None:
    status, error = await answer(several, "/api/0/state/win11")
    assert (status, error["code"]) == (409, "ambiguous_domain")
    assert "(a, b)" in error["detail"] and "win11@HOST" in error["detail"]
    # Actions too, and nothing was done.
    assert (await several.get("/api/0/start/win11")).status == 409
    assert await answer(several, "/api/0/state/win11@a") == (200, "shut off")


async def test_log_lines_name_the_host(several: TestClient,
                                       caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="webvirt"):
        assert await answer(several, "/api/0/start/win11@b") == (200, "starting")
    assert "start win11 (host b): starting" in caplog.messages


async def test_name_at_host_addresses_one_host(several: TestClient) -> None:
    assert await answer(several, "/api/0/start/win11@a") == (200, "starting")
    assert await answer(several, "/api/0/state/win11@a") == (200, "running")
    assert await answer(several, "/api/0/state/win11@b") == (200, "shut off")
    status, body = await answer(several, "/api/0/status/test@c")
    assert (status, body["host"]) == (200, "c")


async def test_an_unknown_host_is_404(several: TestClient) -> None:
    status, error = await answer(several, "/api/0/state/win11@nowhere")
    assert (status, error["code"]) == (404, "host_not_found")
    assert "a, b, c" in error["detail"]
    status, error = await answer(several, "/api/0/state/test@a")
    assert (status, error["code"]) == (404, "domain_not_found")


async def test_name_at_host_works_with_one_host(client: TestClient) -> None:
    assert await answer(client, "/api/0/state/win11@local") == (200, "shut off")
    assert await answer(client, "/api/0/start/win11@local") == (200, "starting")
    assert await answer(client, "/api/0/state/win11") == (200, "running")


def at_sign_host(tmp_path: Path) -> str:
    """libvirt allows "@" in a domain's name: vm (running), vm@local and x@a (shut off)."""
    def domain(name: str, runstate: int) -> str:
        return (f"<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>"
                f"<name>{name}</name><memory unit='MiB'>64</memory>"
                f"<os><type arch='x86_64'>hvm</type></os>"
                f"<test:runstate>{runstate}</test:runstate></domain>")

    (tmp_path / "at.xml").write_text(
        f"<node>{domain('vm', 1)}{domain('vm@local', 5)}{domain('x@a', 5)}</node>")
    return f"test://{tmp_path / 'at.xml'}"


async def test_a_name_with_an_at_sign_is_that_domain_first(make_client: ClientFactory,
                                                           tmp_path: Path) -> None:
    """With one host, vm@local is the domain of that name, as before several hosts; only a
    name that is no domain's falls back to NAME@HOST."""
    client = await make_client(uri=at_sign_host(tmp_path))
    assert await answer(client, "/api/0/shutdown/vm@local") == (200, "not running")
    assert await answer(client, "/api/0/state/vm") == (200, "running")
    assert await answer(client, "/api/0/state/x@a") == (200, "shut off")

    several = await make_client(hosts=(HostSpec("a", at_sign_host(tmp_path)),
                                       HostSpec("b", DEMO_HOST_URI)))
    assert await answer(several, "/api/0/state/x@a") == (200, "shut off")  # a's "x@a"
    assert await answer(several, "/api/0/state/vm@local") == (200, "shut off")
    assert await answer(several, "/api/0/state/vm@a") == (200, "running")
    assert await answer(several, "/api/0/state/x@a@a") == (200, "shut off")
    status, error = await answer(several, "/api/0/state/nothing@zz")
    assert (status, error["code"]) == (404, "host_not_found")


async def test_a_uuid_on_one_host_works_and_on_two_is_ambiguous(several: TestClient) -> None:
    _status, domains = await answer(several, "/api/0/domains")
    uuids = {(d["name"], d["host"]): d["uuid"] for d in domains}
    assert await answer(several, f"/api/0/state/{uuids['test', 'c']}") == (200, "running")
    # The two copies of the demo host have the same UUIDs.
    status, error = await answer(several, f"/api/0/state/{uuids['win11', 'a']}")
    assert (status, error["code"]) == (409, "ambiguous_domain")
    assert await answer(several, f"/api/0/state/{uuids['win11', 'a']}@b") == (200, "shut off")


async def test_domains_of_every_host_name_their_host(several: TestClient) -> None:
    status, domains = await answer(several, "/api/0/domains")
    assert status == 200
    assert sorted((d["name"], d["host"]) for d in domains) == sorted(
        [(n, h) for n in ("win11", "linux-dev", "media-server") for h in ("a", "b")]
        + [("test", "c")])
    _status, only_c = await answer(several, "/api/0/domains?host=c")
    assert [(d["name"], d["host"]) for d in only_c] == [("test", "c")]
    status, error = await answer(several, "/api/0/domains?host=z")
    assert (status, error["code"]) == (404, "host_not_found")


async def test_with_one_host_answers_are_as_they_were(client: TestClient) -> None:
    _status, domains = await answer(client, "/api/0/domains")
    assert all("host" not in d for d in domains)
    _status, body = await answer(client, "/api/0/status/win11@local")
    assert "host" not in body
    async with client.ws_connect("/api/0/events") as ws:
        snapshot = await next_message(ws, is_type("snapshot"))
        assert set(snapshot) == {"id", "seq", "time", "type", "connected", "domains"}
        assert all(set(d) == {"name", "uuid", "state"} for d in snapshot["domains"])
        await client.get("/api/0/start/win11@local")
        started = await next_message(ws, is_type("lifecycle"))
        assert "host" not in started
    # NAME@HOST filters events too, as it addresses REST paths.
    async with client.ws_connect("/api/0/events?domain=win11@local") as ws:
        snapshot = await next_message(ws, is_type("snapshot"))
        assert [d["name"] for d in snapshot["domains"]] == ["win11"]
        await client.get("/api/0/destroy/win11")
        stopped = await next_message(ws, is_type("lifecycle"))
        assert (stopped["domain"], stopped["event"]) == ("win11", "stopped")


# Host devices.

async def test_host_devices_need_a_host_when_there_are_several(several: TestClient) -> None:
    status, error = await answer(several, "/api/0/host/devices")
    assert (status, error["code"]) == (400, "host_required")
    assert "a, b, c" in error["detail"]
    status, devices = await answer(several, "/api/0/host/devices?host=a")
    assert status == 200 and {d["name"] for d in devices} >= {"usb_1_4", "usb_1_5"}
    status, error = await answer(several, "/api/0/host/devices?host=z")
    assert (status, error["code"]) == (404, "host_not_found")


async def test_host_devices_take_the_one_hosts_name(client: TestClient) -> None:
    status, devices = await answer(client, "/api/0/host/devices?host=local")
    assert status == 200 and devices


# Events.

async def test_snapshot_and_events_carry_hosts(several: TestClient) -> None:
    async with several.ws_connect("/api/0/events") as ws:
        snapshot = await next_message(ws, is_type("snapshot"))
        assert snapshot["connected"] is True
        assert snapshot["hosts"] == [{"name": n, "connected": True} for n in "abc"]
        assert {(d["name"], d["host"]) for d in snapshot["domains"]} >= {
            ("win11", "a"), ("win11", "b"), ("test", "c")}
        await several.get("/api/0/start/win11@b")
        started = await next_message(ws, is_type("lifecycle"))
        assert (started["domain"], started["host"], started["event"]) == ("win11", "b",
                                                                          "started")


async def test_events_filter_by_host(several: TestClient) -> None:
    async with several.ws_connect("/api/0/events?host=b&type=lifecycle") as ws:
        snapshot = await next_message(ws, is_type("snapshot"))
        assert {d["host"] for d in snapshot["domains"]} == {"b"}
        await several.get("/api/0/start/win11@a")
        await several.get("/api/0/suspend/linux-dev@b")
        event = await next_message(ws, is_type("lifecycle"))
        assert (event["domain"], event["host"]) == ("linux-dev", "b")
    async with several.ws_connect("/api/0/events?domain=win11@a,test") as ws:
        snapshot = await next_message(ws, is_type("snapshot"))
        assert sorted((d["name"], d["host"]) for d in snapshot["domains"]) == [
            ("test", "c"), ("win11", "a")]


async def test_sse_events_carry_hosts(several: TestClient) -> None:
    response = await several.get("/api/0/events?host=c",
                                 headers={"Accept": "text/event-stream"})
    async with response:
        line = b""
        while not line.startswith(b"data: "):
            line = await response.content.readline()
        snapshot = json.loads(line[len(b"data: "):])
        assert [(d["name"], d["host"]) for d in snapshot["domains"]] == [("test", "c")]


# A host that cannot be reached at start-up.

async def test_an_unreachable_host_does_not_stop_the_others(make_client: ClientFactory) -> None:
    client = await make_client(hosts=(HostSpec("a", DEMO_HOST_URI), HostSpec("gone", NOWHERE)))
    _status, hosts = await answer(client, "/api/0/hosts")
    assert [(h["name"], h["connected"]) for h in hosts] == [("a", True), ("gone", False)]
    assert hosts[1]["libvirt_version"] is None
    assert await answer(client, "/api/0/state/win11") == (200, "shut off")
    status, error = await answer(client, "/api/0/state/win11@gone")
    assert (status, error["code"]) == (503, "libvirt_unavailable")
    status, domains = await answer(client, "/api/0/domains")
    assert status == 200 and {d["host"] for d in domains} == {"a"}
    status, _error = await answer(client, "/api/0/host/devices?host=gone")
    assert status == 503
    async with client.ws_connect("/api/0/events") as ws:
        snapshot = await next_message(ws, is_type("snapshot"))
        assert snapshot["connected"] is False
        assert snapshot["hosts"] == [{"name": "a", "connected": True},
                                     {"name": "gone", "connected": False}]


# Metrics.

async def test_metrics_are_labelled_by_host(several: TestClient) -> None:
    text = await (await several.get("/metrics")).text()
    for name in "abc":
        assert f'libvirt_up{{host="{name}"}} 1.0' in text
    assert 'libvirt_domain_info_virtual_cpus{domain="test",host="c"}' in text
    assert 'libvirt_domain_info_virtual_cpus{domain="win11",host="b"}' in text


async def test_webvirts_libvirt_counters_are_labelled_by_host(several: TestClient) -> None:
    """Which host's calls are slow, which host's connection keeps coming back."""
    b = several.app[HOSTS].get("b")
    released = threading.Event()
    async with several.ws_connect("/api/0/events?type=connection") as ws:
        await next_message(ws, is_type("snapshot"))
        try:
            with pytest.raises(ApiError):  # a stuck call on b: lost, then reconnected
                await b.call(lambda _conn: released.wait(30), seconds=0.05)
            await next_message(ws, lambda m: m.get("state") == "restored")
        finally:
            released.set()
    families = {f.name: f for f in text_string_to_metric_families(
        await (await several.get("/metrics")).text())}
    reconnects = {s.labels["host"]: s.value for s in families["webvirt_libvirt_reconnects"].samples
                  if s.name.endswith("_total")}
    assert reconnects == {"a": 0.0, "b": 1.0, "c": 0.0}
    slow = {s.labels["host"]: s.value
            for s in families["webvirt_libvirt_call_duration_seconds"].samples
            if s.name.endswith("_bucket") and s.labels["le"] == "0.025"}
    count = {s.labels["host"]: s.value
             for s in families["webvirt_libvirt_call_duration_seconds"].samples
             if s.name.endswith("_count")}
    assert set(count) == {"a", "b", "c"}
    assert slow["b"] < count["b"]  # the stuck call took 50 ms, on b


# USB rules keep their host.

async def test_a_rule_names_its_domain_at_its_host(several: TestClient) -> None:
    body = {"domain": "win11", "match": {"vendor_id": "046d", "product_id": "c52b"}}
    response = await several.post("/api/0/rules", json=body)
    assert (response.status, (await response.json())["code"]) == (409, "ambiguous_domain")
    async with several.ws_connect("/api/0/events?type=rule-changed") as ws:
        await next_message(ws, is_type("snapshot"))
        response = await several.post("/api/0/rules", json={**body, "domain": "win11@b"})
        assert response.status == 201
        assert (await response.json())["domain"] == "win11@b"
        changed = await next_message(ws, is_type("rule-changed"))
        assert (changed["domain"], changed["host"]) == ("win11", "b")


async def test_heartbeats_of_several_hosts_say_each_hosts_connection(
        several: TestClient) -> None:
    async with several.ws_connect("/api/0/events") as ws:
        await next_message(ws, is_type("snapshot"))
        several.app[EVENT_HUB].heartbeat()
        beat = await next_message(ws, is_type("heartbeat"))
        assert beat["hosts"] == [{"name": n, "connected": True} for n in "abc"]


async def test_stats_name_their_host_and_filter_by_it(make_client: ClientFactory) -> None:
    client = await make_client(hosts=SEVERAL, stats_interval_s=0.05)
    async with client.ws_connect("/api/0/events?type=stats") as ws:
        await next_message(ws, is_type("snapshot"))
        seen = set()
        while seen != {"a", "b", "c"}:
            stats = await next_message(ws, is_type("stats"))
            seen.add(stats["host"])
    async with client.ws_connect("/api/0/events?type=stats&host=b") as ws:
        await next_message(ws, is_type("snapshot"))
        for _ in range(6):
            stats = await next_message(ws, is_type("stats"))
            assert stats["host"] == "b"
            assert {d["domain"] for d in stats["domains"]} == {"linux-dev", "media-server"}


def test_two_hosts_of_one_name_are_a_start_up_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "webvirt", "--connect", "test:///default", "--connect",
         DEMO_HOST_URI, "--port", str(free_port()), "--state-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"webvirt: error: two hosts are named 'local' (test:///default and {DEMO_HOST_URI}); "
        "name them with --connect NAME=URI")
