"""Every request answers within its time (--call-timeout, plus a small margin): whatever it
waits for, in turn, shares that time, and when it runs out the 504 names what it waited for.
Event streams and an explicit ?wait are the exceptions; a host still connecting and a VM's
lock answer at once (tests/test_hosts_qemu.py, tests/test_api_more.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import libvirt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import ClientFactory
from tests.libvirt_daemon import guest_xml
from tests.waiting import next_message, until
from webvirt.appkeys import HOST, RULES
from webvirt.deadline import MARGIN_S, SWEEP_S, Budgets
from webvirt.errors import CallTimeout, Unavailable
from webvirt.middlewares import answers
from webvirt.rules_store import StoreTimeout

CALL_TIMEOUT_S = 1.0
# What a 504 may take beyond the request's time: the event loop's turn and the test's own.
LATE_S = 1.0
RULE = {"domain": "win11", "match": {"vendor_id": "046d", "product_id": "c52b"}}


@contextlib.contextmanager
def request_time(seconds: float) -> Iterator[None]:
    """As the middleware gives it to a request, for a test that makes a handler's waits."""
    budgets = Budgets(seconds)
    budget = budgets.begin()
    try:
        yield
    finally:
        budgets.end(budget)


@pytest.fixture
def released() -> Iterator[threading.Event]:
    """What a stalled thread waits for; set at the end, whatever happens."""
    event = threading.Event()
    yield event
    event.set()


def stall_libvirt(client: TestClient, released: threading.Event) -> asyncio.Future[Any]:
    """The host's connection thread is busy until `released` (a daemon slow to answer)."""
    host = client.app[HOST]
    assert host.connection_count == 1  # the test driver: a request queues behind the stall
    return asyncio.ensure_future(host.call(lambda _conn: released.wait(30), seconds=60))


def stall_store(client: TestClient, released: threading.Event) -> None:
    """The rule store's thread is busy until `released` (a disk that does not answer)."""
    client.app[RULES]._executor.submit(released.wait, 30)


async def timed(client: TestClient, method: str, path: str,
                **kwargs: Any) -> tuple[int, dict[str, Any], float]:
    began = time.monotonic()
    async with asyncio.timeout(CALL_TIMEOUT_S + MARGIN_S + SWEEP_S + 5):  # a hang fails
        response = await client.request(method, path, **kwargs)
        body = await response.json()
    return response.status, body, time.monotonic() - began


async def test_a_request_behind_a_stuck_rule_store_answers_504_and_saves_nothing(
        make_client: ClientFactory, released: threading.Event) -> None:
    client = await make_client(call_timeout=CALL_TIMEOUT_S)
    stall_store(client, released)
    status, body, seconds = await timed(client, "POST", "/api/0/rules", json=RULE)
    assert (status, body["code"]) == (504, "rule_store_timeout"), body
    assert "rule store" in body["detail"] and "it was not done" in body["detail"], body
    assert seconds < CALL_TIMEOUT_S + LATE_S
    status, body, seconds = await timed(client, "GET", "/api/0/rules")
    assert (status, body["code"], seconds < CALL_TIMEOUT_S + LATE_S) == (
        504, "rule_store_timeout", True)
    released.set()
    listing = await client.get("/api/0/rules")
    assert (listing.status, await listing.json()) == (200, [])  # the write was never made


async def test_a_request_behind_a_stuck_libvirt_call_answers_504_naming_libvirt(
        make_client: ClientFactory, released: threading.Event) -> None:
    client = await make_client(call_timeout=CALL_TIMEOUT_S)
    stalled = stall_libvirt(client, released)
    status, body, seconds = await timed(client, "GET", "/api/0/status/win11")
    assert (status, body["code"]) == (504, "libvirt_timeout"), body
    # Queued behind the stuck call, it never began: never made later.
    assert body["detail"].startswith("libvirt did not answer"), body
    assert body["detail"].endswith("the call was not made"), body
    assert seconds < CALL_TIMEOUT_S + LATE_S
    released.set()
    await stalled


async def test_waits_in_turn_share_the_request_time(
        make_client: ClientFactory, released: threading.Event) -> None:
    """As a handler makes them: a libvirt call that takes most of the time, then the rule
    store, which gets what is left, not a time of its own."""
    client = await make_client(call_timeout=CALL_TIMEOUT_S)
    host, store = client.app[HOST], client.app[RULES]
    stall_store(client, released)
    began = time.monotonic()
    with request_time(CALL_TIMEOUT_S):
        await host.call(lambda _conn: time.sleep(0.7))  # a slow libvirt, in its own thread
        with pytest.raises(StoreTimeout) as raised:
            await store.list()
    assert time.monotonic() - began < CALL_TIMEOUT_S + LATE_S
    left = float(re.search(r"within ([0-9.]+) s", raised.value.detail)[1])  # type: ignore[index]
    assert left < CALL_TIMEOUT_S - 0.6  # what the slow call left, not a time of its own
    # The slow call was not stuck: its connection stays (no reconnect).
    assert host.connected and host.reconnects == 0


async def test_a_libvirt_call_that_runs_out_of_request_time_keeps_its_connection(
        make_client: ClientFactory, released: threading.Event) -> None:
    client = await make_client(call_timeout=CALL_TIMEOUT_S)
    host = client.app[HOST]
    with request_time(0.3):
        with pytest.raises(CallTimeout) as raised:
            await host.call(lambda _conn: released.wait(30))
    assert "in the time this request has" in raised.value.detail
    assert "the call may still complete" in raised.value.detail
    released.set()
    assert host.connected and host.reconnects == 0
    assert await host.call(lambda conn: conn.getType()) == "TEST"


async def test_an_explicit_wait_has_its_own_time(
        make_client: ClientFactory, libvirt_daemon: Any,
        qemu_conn: libvirt.virConnect) -> None:
    """?wait&timeout=6 with --call-timeout 3: the wait outlasts the request's time and its
    margin, and is not cut short."""
    qemu_conn.defineXML(guest_xml("stubborn")).create()  # diskless: it ignores ACPI
    client = await make_client(uri=libvirt_daemon.uri, call_timeout=3)
    status, body, seconds = await timed_wait(client, "/api/0/shutdown/stubborn?wait=1&timeout=6")
    assert (status, body) == (200, "still running")
    assert 6 <= seconds < 6 + 3 + MARGIN_S + SWEEP_S


async def timed_wait(client: TestClient, path: str) -> tuple[int, Any, float]:
    began = time.monotonic()
    async with asyncio.timeout(30):
        response = await client.get(path)
        body = await response.json()
    return response.status, body, time.monotonic() - began


async def test_an_event_stream_outlives_the_request_time(make_client: ClientFactory) -> None:
    client = await make_client(call_timeout=0.2, heartbeat_s=0.1)
    async with client.ws_connect("/api/0/events") as ws:
        began = time.monotonic()
        while time.monotonic() - began < 0.2 + MARGIN_S + SWEEP_S + 0.5:
            await next_message(ws, lambda m: m["type"] == "heartbeat")


async def test_a_wait_with_no_bound_meets_the_margin_as_a_504(
        aiohttp_client: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The last resort, for a wait nothing bounds (a bug): the request still answers."""
    never = asyncio.Event()

    async def stuck(_request: web.Request) -> web.Response:
        await never.wait()
        raise AssertionError("unreachable")

    budgets = Budgets(0.2)

    async def sweeping(_app: web.Application) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(budgets.sweeping())
        yield
        sweeper.cancel()

    app = web.Application(middlewares=[answers(budgets)])
    app.cleanup_ctx.append(sweeping)
    app.router.add_get("/stuck", stuck)
    client = await aiohttp_client(app)
    began = time.monotonic()
    async with asyncio.timeout(10):
        response = await client.get("/stuck")
    assert response.status == 504
    assert (await response.json())["code"] == "request_timeout"
    assert 0.2 + MARGIN_S <= time.monotonic() - began < 0.2 + MARGIN_S + SWEEP_S + LATE_S
    assert any(r.levelno == logging.ERROR and "GET /stuck was still waiting" in r.getMessage()
               for r in caplog.records)


async def test_webvirt_stops_at_once_with_a_call_stuck_on_a_connection_lost_before(
        make_client: ClientFactory, released: threading.Event) -> None:
    """A session lost while a call was stuck (a hung QEMU monitor, the daemon alive): its
    connections were retired and replaced, and the stuck call's caller waited on, holding
    webvirt's stop for up to --call-timeout."""
    client = await make_client(call_timeout=60)
    host = client.app[HOST]
    begun = threading.Event()

    def hung(_conn: Any) -> None:
        begun.set()
        released.wait(60)

    lost = host._connections[0]
    stuck = asyncio.ensure_future(host.call(hung))
    await until(begun.is_set, 5, "the call under way")
    lost.retire("the test lost it")  # its session goes; a new one is opened
    await until(lambda: host.connected and host._connections[0] is not lost, 10, "reconnected")
    began = time.monotonic()
    async with asyncio.timeout(5):
        await client.close()
    assert time.monotonic() - began < 2
    with pytest.raises(Unavailable) as told:
        await stuck
    assert told.value.detail == ("the libvirt connection was closed (server shutting down); "
                                 "the call may still complete")


async def test_a_body_that_does_not_arrive_is_408_and_no_error(
        make_client: ClientFactory, caplog: pytest.LogCaptureFixture) -> None:
    """The client's pace, not a wait webvirt failed to bound: it said so as a bug (504)."""
    client = await make_client(call_timeout=CALL_TIMEOUT_S)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(b"POST /api/0/rules HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 100\r\n\r\n{\"domain\": ")
        began = time.monotonic()
        async with asyncio.timeout(CALL_TIMEOUT_S + MARGIN_S + SWEEP_S + 5):
            status = await reader.readline()
        assert status.startswith(b"HTTP/1.1 408 "), status
        assert time.monotonic() - began < CALL_TIMEOUT_S + LATE_S
    finally:
        writer.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
