"""Two real libvirt daemons (private session daemons with QEMU guests) in one webvirt: one
frozen with SIGSTOP or killed, the other keeps answering at full speed; one that is away at
start-up is picked up when it comes."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import libvirt
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import ClientFactory, remove_guests
from tests.libvirt_daemon import LibvirtDaemon, guest_xml
from tests.waiting import next_message
from webvirt.hosts import EACH_HOST_S, HostSpec

pytestmark = pytest.mark.qemu

CALL_TIMEOUT_S = 10
# "Full speed": far below the call timeout a request for B would wait for.
FAST_S = 1.0
# libvirt's keepalive (2 s x 3) notices a frozen daemon within about 8 s.
NOTICE_FREEZE_S = 20


@pytest.fixture(scope="module")
def daemon_b(libvirt_daemon: LibvirtDaemon) -> Iterator[LibvirtDaemon]:
    """A second private libvirtd, host b; the suite's own (skipped with WEBVIRT_SKIP_QEMU=1)
    is host a."""
    daemon = LibvirtDaemon()
    daemon.start()
    yield daemon
    daemon.cleanup()


@pytest.fixture
def conn_b(daemon_b: LibvirtDaemon) -> Iterator[libvirt.virConnect]:
    if daemon_b.process is None:
        daemon_b.start()
    conn = libvirt.open(daemon_b.uri)
    yield conn
    resume(daemon_b)
    if daemon_b.process is None:
        daemon_b.start()
    conn = libvirt.open(daemon_b.uri)  # the test may have restarted the daemon
    remove_guests(conn)
    conn.close()


@pytest.fixture
async def two_hosts(make_client: ClientFactory, libvirt_daemon: LibvirtDaemon,
                    qemu_conn: libvirt.virConnect, daemon_b: LibvirtDaemon,
                    conn_b: libvirt.virConnect) -> AsyncIterator[TestClient]:
    qemu_conn.defineXML(guest_xml("alpha"))
    qemu_conn.defineXML(guest_xml("twin"))
    conn_b.defineXML(guest_xml("beta")).create()
    conn_b.defineXML(guest_xml("twin"))
    yield await make_client(hosts=(HostSpec("a", libvirt_daemon.uri),
                                   HostSpec("b", daemon_b.uri)),
                            call_timeout=CALL_TIMEOUT_S)


def resume(daemon: LibvirtDaemon) -> None:
    if daemon.process is not None:
        daemon.signal(signal.SIGCONT)


def is_type(kind: str) -> Any:
    return lambda message: message["type"] == kind


def connection_of(host: str, state: str) -> Any:
    return lambda m: m["type"] == "connection" and m.get("host") == host and m["state"] == state


async def timed_get(client: TestClient, path: str) -> tuple[int, float]:
    started = time.monotonic()
    response = await client.get(path)
    await response.read()
    return response.status, time.monotonic() - started


async def hosts_connected(client: TestClient) -> dict[str, bool]:
    hosts = await (await client.get("/api/0/hosts")).json()
    return {h["name"]: h["connected"] for h in hosts}


async def test_addressing_on_two_real_hosts(two_hosts: TestClient) -> None:
    assert (await two_hosts.get("/api/0/state/alpha")).status == 200
    assert await (await two_hosts.get("/api/0/state/beta")).json() == "running"
    response = await two_hosts.get("/api/0/start/twin")
    error = await response.json()
    assert (response.status, error["code"]) == (409, "ambiguous_domain")
    assert "(a, b)" in error["detail"]
    assert await (await two_hosts.get("/api/0/start/twin@b")).json() == "starting"
    assert await (await two_hosts.get("/api/0/state/twin@b")).json() == "running"
    assert await (await two_hosts.get("/api/0/state/twin@a")).json() == "shut off"
    hosts = await (await two_hosts.get("/api/0/hosts")).json()
    assert [(h["name"], h["connected"], h["hypervisor"]) for h in hosts] == [
        ("a", True, "QEMU"), ("b", True, "QEMU")]


async def test_a_frozen_host_delays_nothing_of_the_other(
        two_hosts: TestClient, daemon_b: LibvirtDaemon) -> None:
    async with two_hosts.ws_connect("/api/0/events?type=lifecycle,connection") as ws:
        await next_message(ws, is_type("snapshot"))
        daemon_b.signal(signal.SIGSTOP)
        try:
            # A call stuck on b's frozen daemon (it fails when keepalive gives b up).
            stuck = asyncio.ensure_future(two_hosts.get("/api/0/status/beta@b"))
            took = []
            for _ in range(10):  # each asks a's libvirtd (the live XML), none waits for b
                status, seconds = await timed_get(two_hosts, "/api/0/status/alpha@a")
                assert status == 200
                took.append(seconds)
            status, seconds = await timed_get(two_hosts, "/api/0/start/alpha")
            assert status == 200
            took.append(seconds)
            assert max(took) < FAST_S, took
            # An answer about every host waits for b a bounded time, then leaves it out.
            started = time.monotonic()
            response = await two_hosts.get("/api/0/domains")
            listed = {(d["name"], d["host"]) for d in await response.json()}
            assert ("alpha", "a") in listed and not any(h == "b" for _, h in listed)
            assert time.monotonic() - started < EACH_HOST_S + FAST_S
            started = time.monotonic()
            text = await (await two_hosts.get("/metrics")).text()
            assert 'libvirt_up{host="a"} 1.0' in text and 'libvirt_up{host="b"} 0.0' in text
            assert time.monotonic() - started < EACH_HOST_S + FAST_S
            # A name no cache knows (a typo on a Stream Deck key) is asked of every host: b's
            # silence is named in the 404, within the same bound.
            started = time.monotonic()
            response = await two_hosts.get("/api/0/state/nosuchvm")
            error = await response.json()
            assert (response.status, error["code"]) == (404, "domain_not_found")
            assert "not answering: b" in error["detail"]
            assert time.monotonic() - started < EACH_HOST_S + FAST_S
            assert not stuck.done()
            # a's events flow while b is frozen.
            started = await next_message(ws, lambda m: m.get("event") == "started", 5)
            assert (started["domain"], started["host"]) == ("alpha", "a")
            await next_message(ws, connection_of("b", "lost"), NOTICE_FREEZE_S)
            assert (await stuck).status == 503
            response = await two_hosts.get("/api/0/state/beta@b")
            assert (response.status, (await response.json())["code"]) == (
                503, "libvirt_unavailable")
            assert await hosts_connected(two_hosts) == {"a": True, "b": False}
            status, seconds = await timed_get(two_hosts, "/api/0/status/alpha")
            assert (status, seconds < FAST_S) == (200, True)
        finally:
            daemon_b.signal(signal.SIGCONT)
        await next_message(ws, connection_of("b", "restored"), 30)
    assert await (await two_hosts.get("/api/0/state/beta@b")).json() == "running"


async def test_a_killed_host_comes_back_while_the_other_serves(
        two_hosts: TestClient, daemon_b: LibvirtDaemon) -> None:
    async with two_hosts.ws_connect("/api/0/events?host=b&type=connection,lifecycle") as ws:
        snapshot = await next_message(ws, is_type("snapshot"))
        assert {d["host"] for d in snapshot["domains"]} == {"b"}
        daemon_b.kill()
        await next_message(ws, connection_of("b", "lost"))
        assert (await two_hosts.get("/api/0/state/twin@b")).status == 503
        status, seconds = await timed_get(two_hosts, "/api/0/start/alpha")
        assert (status, seconds < FAST_S) == (200, True)
        daemon_b.start()
        await next_message(ws, connection_of("b", "restored"), 30)
        # The filter kept a's events out: the next one is b's.
        assert await (await two_hosts.get("/api/0/start/twin@b")).json() == "starting"
        started = await next_message(ws, lambda m: m.get("event") == "started")
        assert (started["domain"], started["host"]) == ("twin", "b")
    assert await hosts_connected(two_hosts) == {"a": True, "b": True}


@pytest.mark.parametrize("away", ["stopped", "frozen"])
async def test_a_host_away_at_start_up_is_picked_up_when_it_comes(
        make_client: ClientFactory, libvirt_daemon: LibvirtDaemon,
        qemu_conn: libvirt.virConnect, daemon_b: LibvirtDaemon,
        conn_b: libvirt.virConnect, away: str) -> None:
    qemu_conn.defineXML(guest_xml("alpha"))
    conn_b.defineXML(guest_xml("beta"))
    if away == "stopped":
        daemon_b.stop()
    else:
        daemon_b.signal(signal.SIGSTOP)
    try:
        client = await make_client(hosts=(HostSpec("a", libvirt_daemon.uri),
                                          HostSpec("b", daemon_b.uri)),
                                   call_timeout=CALL_TIMEOUT_S)
        assert await hosts_connected(client) == {"a": True, "b": False}
        status, seconds = await timed_get(client, "/api/0/status/alpha")
        assert (status, seconds < FAST_S) == (200, True)
        response = await client.get("/api/0/state/beta@b")
        error = await response.json()
        assert response.status == 503  # and it says so, also while b's first connect hangs
        assert error["detail"].startswith(f"not connected to libvirt at {daemon_b.uri}"), error
        async with client.ws_connect("/api/0/events?type=connection,host") as ws:
            snapshot = await next_message(ws, is_type("snapshot"))
            assert snapshot["hosts"] == [{"name": "a", "connected": True},
                                         {"name": "b", "connected": False}]
            if away == "stopped":
                daemon_b.start()
            else:
                daemon_b.signal(signal.SIGCONT)
            told: list[dict[str, Any]] = []
            await next_message(ws, lambda m: told.append(m) or connection_of("b", "restored")(m),
                               30)
            # b's devices were there all along: its first read is a baseline, not news.
            assert [m for m in told if m["type"].startswith("node-device")] == []
            snapshot = await next_message(ws, is_type("snapshot"))
            assert ("beta", "b") in {(d["name"], d["host"]) for d in snapshot["domains"]}
    finally:
        resume(daemon_b)
    assert await hosts_connected(client) == {"a": True, "b": True}
    assert await (await client.get("/api/0/state/beta")).json() == "shut off"
