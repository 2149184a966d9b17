"""Resuming the event stream after a reconnect: exactly the missed events, or a resync."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from playwright.async_api import Page

from tests.conftest import ClientFactory, drop_all_connections
from tests.waiting import next_message, next_sse, until
from webvirt.appkeys import EVENT_HUB
from webvirt.hub import QUEUE_LIMIT

BUFFER = 600  # more than an SSE client's queue holds
Reader = Callable[[], Awaitable[dict[str, Any]]]


@pytest.fixture
async def resumable(make_client: ClientFactory) -> TestClient:
    return await make_client(replay_events=BUFFER)


@contextlib.asynccontextmanager
async def stream(client: TestClient, kind: str, last_event_id: str | None = None,
                 query: str = "") -> AsyncIterator[Reader]:
    """An event client of either kind; gives its next-message reader."""
    if kind == "ws":
        resume = f"&last_event_id={last_event_id}" if last_event_id else ""
        async with client.ws_connect(f"/api/0/events?x=1{query}{resume}") as ws:
            yield lambda: next_message(ws, lambda _m: True, 5)
    else:
        headers = {"Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id  # what EventSource sends
        response = await client.get(f"/api/0/events?x=1{query}", headers=headers)
        try:
            yield lambda: next_sse(response)
        finally:
            response.close()


def publish(client: TestClient, count: int, domain: str = "linux-dev", first: int = 0) -> None:
    hub = client.app[EVENT_HUB]
    for n in range(first, first + count):
        hub.publish("reboot", domain=domain, uuid="x", n=n)


async def last_id_after_one_event(client: TestClient, kind: str) -> str:
    async with stream(client, kind) as receive:
        assert (await receive())["type"] == "snapshot"
        publish(client, 1, first=-1)
        seen = await receive()
        assert seen["n"] == -1
        return str(seen["id"])


@pytest.mark.parametrize("kind", ["ws", "sse"])
@pytest.mark.parametrize("missed", [1, 100, BUFFER + 1])
async def test_resume_gets_exactly_the_missed_events(resumable: TestClient, kind: str,
                                                     missed: int) -> None:
    last_id = await last_id_after_one_event(resumable, kind)
    publish(resumable, missed)  # while the client is away
    async with stream(resumable, kind, last_id) as receive:
        first = await receive()
        if missed > BUFFER:  # the oldest missed event is no longer kept
            assert (first["type"], first["resync"]) == ("snapshot", True)
            return
        received = [first] + [await receive() for _ in range(missed - 1)]
        assert [m["n"] for m in received] == list(range(missed))
        publish(resumable, 1, first=missed)  # then live events, as usual
        assert (await receive())["n"] == missed


@pytest.mark.parametrize("kind", ["ws", "sse"])
async def test_resume_while_events_keep_coming(resumable: TestClient, kind: str) -> None:
    hub = resumable.app[EVENT_HUB]
    counter = iter(range(10**6))

    async def publish_forever() -> None:
        while True:
            hub.publish("reboot", domain="linux-dev", uuid="x", n=next(counter))
            await asyncio.sleep(0.001)  # a steady stream, not a flood that outruns the buffer

    publisher = asyncio.ensure_future(publish_forever())
    try:
        async with stream(resumable, kind) as receive:
            await receive()  # snapshot
            last = await receive()
            for _ in range(20):
                last = await receive()
        await until(lambda: hub.seq > last["seq"] + 50, 5, "events while away")
        async with stream(resumable, kind, last["id"]) as receive:
            received = [await receive() for _ in range(150)]
            numbers = [m.get("n", m["type"]) for m in received]
    finally:
        publisher.cancel()
    # No gap, no duplicate, in order, across the replay and the live events after it.
    assert numbers == list(range(last["n"] + 1, last["n"] + 151))


@pytest.mark.parametrize("kind", ["ws", "sse"])
@pytest.mark.parametrize("bad", ["nonsense", "0123abcd-5", "{stream}-999999", "{stream}-x",
                                 "{stream}", "{stream}-²", "{stream}-" + "9" * 5000],
                         ids=["nonsense", "other-run", "future", "not-a-number", "no-seq",
                              "superscript", "5000-digits"])
async def test_an_unknown_id_gives_a_resync_snapshot(resumable: TestClient, kind: str,
                                                     bad: str) -> None:
    hub = resumable.app[EVENT_HUB]
    publish(resumable, 3)
    async with stream(resumable, kind, bad.format(stream=hub.stream_id)) as receive:
        first = await receive()
    assert (first["type"], first["resync"]) == ("snapshot", True)
    assert {d["name"] for d in first["domains"]} == {"win11", "linux-dev", "media-server"}


async def test_a_fresh_client_gets_a_plain_snapshot(resumable: TestClient) -> None:
    async with stream(resumable, "ws") as receive:
        first = await receive()
    assert first["type"] == "snapshot" and "resync" not in first
    assert first["id"] == f"{resumable.app[EVENT_HUB].stream_id}-{first['seq']}"


@pytest.mark.parametrize("kind", ["ws", "sse"])
async def test_filters_apply_to_the_replay(resumable: TestClient, kind: str) -> None:
    last_id = await last_id_after_one_event(resumable, kind)
    for n in range(10):
        publish(resumable, 1, domain="win11" if n % 2 else "linux-dev", first=n)
    async with stream(resumable, kind, last_id, query="&domain=win11") as receive:
        replayed = [await receive() for _ in range(5)]
    assert [(m["domain"], m["n"]) for m in replayed] == [("win11", n) for n in (1, 3, 5, 7, 9)]


async def test_a_browsers_event_source_resumes_by_itself(client: TestClient,
                                                         page: Page) -> None:
    hub = client.app[EVENT_HUB]
    await page.goto(str(client.make_url("/")))
    await page.evaluate("""() => {
        window.seen = [];
        const source = new EventSource("/api/0/events?type=lifecycle");
        source.onmessage = (event) => window.seen.push(JSON.parse(event.data));
    }""")

    async def seen() -> list[dict[str, Any]]:
        return list(await page.evaluate("window.seen"))

    await until(lambda: hub.client_count >= 2, 10, "the page's EventSource subscribed")
    publish(client, 3)
    await until(lambda: _count(seen, 4), 10, "snapshot and 3 events")
    # The server drops every connection; 5 events happen before the browser is back.
    drop_all_connections(client)
    publish(client, 5, first=3)
    await until(lambda: _count(seen, 9), 15, "EventSource reconnected and resumed")
    publish(client, 1, first=8)
    await until(lambda: _count(seen, 10), 10, "a live event after the resume")
    messages = await seen()
    assert [m["type"] for m in messages].count("snapshot") == 1  # resumed, not resynced
    assert [m["n"] for m in messages if m["type"] == "reboot"] == list(range(9))


async def _count(seen: Callable[[], Awaitable[list[dict[str, Any]]]], at_least: int) -> bool:
    return len(await seen()) >= at_least


async def test_a_dropped_client_resumes_from_what_it_got_not_from_lagging(
        resumable: TestClient) -> None:
    hub = resumable.app[EVENT_HUB]
    response = await resumable.get("/api/0/events", headers={"Accept": "text/event-stream"})
    snapshot = await next_sse(response)
    publish(resumable, QUEUE_LIMIT + 10)  # one burst: the queue overflows, the client is dropped
    body = (await asyncio.wait_for(response.text(), 5)).split("\n\n")
    lagging = next(frame for frame in body if '"lagging"' in frame)
    assert "id:" not in lagging  # EventSource keeps the id of the last message it got
    assert hub.client_count == 0
    async with stream(resumable, "sse", snapshot["id"]) as receive:  # that id
        assert [(await receive())["n"] for _ in range(QUEUE_LIMIT + 10)] == list(
            range(QUEUE_LIMIT + 10))
