"""The event stream with real WebSocket and SSE clients, on libvirt's test driver."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import ClientFactory
from tests.waiting import next_sse, sse_messages, until
from webvirt.api_events import CLOSE_LAGGING
from webvirt.appkeys import EVENT_HUB
from webvirt.hub import QUEUE_LIMIT, websocket_text_frame


async def next_json(ws: aiohttp.ClientWebSocketResponse, seconds: float = 5) -> dict[str, Any]:
    message = await ws.receive(timeout=seconds)
    assert message.type == aiohttp.WSMsgType.TEXT, message
    return json.loads(message.data)


async def next_of_type(ws: aiohttp.ClientWebSocketResponse, kind: str) -> dict[str, Any]:
    while True:
        message = await next_json(ws)
        if message["type"] == kind:
            return message


async def test_snapshot_first_then_lifecycle_events(client: TestClient) -> None:
    async with client.ws_connect("/api/0/events") as ws:
        snapshot = await next_json(ws)
        assert snapshot["type"] == "snapshot"
        assert snapshot["connected"] is True
        states = {d["name"]: d["state"] for d in snapshot["domains"]}
        assert states == {"win11": "shutoff", "linux-dev": "running", "media-server": "paused"}
        assert all(len(d["uuid"]) == 36 for d in snapshot["domains"])

        assert (await client.get("/api/0/start/win11")).status == 200
        event = await next_json(ws)
        assert event["type"] == "lifecycle"
        assert (event["domain"], event["event"], event["detail"], event["state"]) == (
            "win11", "started", "booted", "running")
        assert event["seq"] > snapshot["seq"]
        assert isinstance(event["time"], float)

        assert (await client.get("/api/0/shutdown/win11")).status == 200
        stopped = await next_of_type(ws, "lifecycle")
        while stopped["event"] != "stopped":
            stopped = await next_of_type(ws, "lifecycle")
        assert (stopped["detail"], stopped["state"]) == ("shutdown", "shutoff")
        assert stopped["seq"] > event["seq"]


async def test_new_clients_see_the_current_state(client: TestClient) -> None:
    assert (await client.get("/api/0/start/win11")).status == 200
    async with client.ws_connect("/api/0/events?domain=win11") as ws:
        snapshot = await next_json(ws)
        assert snapshot["domains"] == [{"name": "win11", "uuid": snapshot["domains"][0]["uuid"],
                                        "state": "running"}]


async def test_domain_filter(client: TestClient) -> None:
    async with client.ws_connect("/api/0/events?domain=linux-dev") as ws:
        snapshot = await next_json(ws)
        assert [d["name"] for d in snapshot["domains"]] == ["linux-dev"]
        await client.get("/api/0/start/win11")  # filtered out
        await client.get("/api/0/shutdown/linux-dev")
        event = await next_of_type(ws, "lifecycle")
        assert event["domain"] == "linux-dev"


async def test_type_filter_and_webvirts_own_device_events(client: TestClient) -> None:
    async with client.ws_connect("/api/0/events?type=device") as ws:
        await next_json(ws)  # snapshot
        await client.get("/api/0/start/win11")  # a lifecycle event: filtered out
        response = await client.get("/api/0/attach/win11/usb?vendor_id=046d&product_id=c52b")
        assert response.status == 501  # the test driver cannot attach
        event = await next_json(ws)
        assert event["type"] == "attach"
        assert event["domain"] == "win11"
        assert event["template"] == "usb"
        assert event["variables"] == {"vendor_id": "046d", "product_id": "c52b"}
        assert event["result"] == "error"
        assert "not supported" in event["error"]


async def test_unknown_type_filter_is_400(client: TestClient) -> None:
    response = await client.get("/api/0/events?type=lifecycle,bogus",
                                headers={"Accept": "text/event-stream"})
    assert response.status == 400
    assert "bogus" in (await response.json())["detail"]


async def test_plain_get_is_406(client: TestClient) -> None:
    response = await client.get("/api/0/events")
    assert response.status == 406
    assert "text/event-stream" in (await response.json())["detail"]


async def test_server_sent_events(client: TestClient) -> None:
    response = await client.get("/api/0/events", headers={"Accept": "text/event-stream"})
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"

    assert await response.content.readline() == b"retry: 1000\n"  # once, first

    async def next_event() -> dict[str, Any]:
        return await next_sse(response)

    assert (await next_event())["type"] == "snapshot"
    await client.get("/api/0/shutdown/linux-dev")
    event = await next_event()
    assert (event["type"], event["domain"], event["state"]) == ("lifecycle", "linux-dev",
                                                                 "shutoff")
    response.close()


async def test_heartbeats(make_client: ClientFactory) -> None:
    client = await make_client(heartbeat_s=0.05)
    async with client.ws_connect("/api/0/events") as ws:
        await next_json(ws)
        beat = await next_json(ws)
        assert beat["type"] == "heartbeat"
        assert beat["connected"] is True
        assert beat["clients"] == 1


async def test_frames_of_every_length_encoding_arrive_whole(client: TestClient) -> None:
    # All three header forms of RFC 6455, read by aiohttp's own client.
    hub = client.app[EVENT_HUB]
    async with client.ws_connect("/api/0/events") as ws:
        await next_json(ws)
        for size in (0, 100, 65536, 300_000):
            hub.publish("reboot", domain="linux-dev", uuid="x", padding="x" * size)
            message = await ws.receive(timeout=5)
            assert message.type == aiohttp.WSMsgType.TEXT
            assert len(json.loads(message.data)["padding"]) == size


@pytest.mark.parametrize(("length", "header"), [
    (0, b"\x81\x00"), (125, b"\x81\x7d"),
    (126, b"\x81\x7e\x00\x7e"), (65535, b"\x81\x7e\xff\xff"),
    (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
])
def test_frame_header_at_each_length_boundary(length: int, header: bytes) -> None:
    payload = b"x" * length
    assert websocket_text_frame(payload) == header + payload


async def test_a_websocket_client_that_stops_reading_is_told_and_dropped_alone(
        client: TestClient) -> None:
    hub = client.app[EVENT_HUB]
    padding = "x" * 65536
    async with client.ws_connect("/api/0/events") as flooded, \
            client.ws_connect("/api/0/events?domain=win11") as calm:
        await next_json(calm)
        # The flooded client reads nothing: aiohttp's client stops taking data after 64 KiB,
        # then the kernel's socket buffers fill, then the server's write buffer.
        for n in range(2000):
            hub.publish("reboot", domain="linux-dev", uuid="x", n=n, padding=padding)
            await asyncio.sleep(0)  # let the transports send what the kernel will take
            if hub.client_count == 1:
                break
        assert hub.client_count == 1, "the flooded client was never dropped"

        seen = []
        while True:
            message = await flooded.receive(timeout=5)
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            seen.append(json.loads(message.data))
        last = seen[-1]
        assert last["type"] == "lagging"
        assert last["seq"] == hub.seq and last["time"] > 0  # like every other message
        assert flooded.close_code == CLOSE_LAGGING
        # What it did get was whole and in order.
        numbers = [m["n"] for m in seen if m["type"] == "reboot"]
        assert numbers == list(range(len(numbers)))

        # The other client was not affected and still gets its events.
        await client.get("/api/0/start/win11")
        event = await next_of_type(calm, "lifecycle")
        assert event["domain"] == "win11"


async def test_a_server_sent_events_client_that_falls_behind_is_told_and_dropped(
        client: TestClient) -> None:
    hub = client.app[EVENT_HUB]
    response = await client.get("/api/0/events", headers={"Accept": "text/event-stream"})
    # One burst in one loop turn: the client's queue overflows before anything is sent.
    for n in range(QUEUE_LIMIT + 10):
        hub.publish("reboot", domain="linux-dev", uuid="x", n=n)
    body = await asyncio.wait_for(response.text(), 5)  # the server ends the stream
    messages = sse_messages(body)
    assert [m["type"] for m in messages] == ["snapshot", "lagging"]
    assert messages[-1]["seq"] == hub.seq
    assert hub.client_count == 0


async def test_clients_are_closed_when_the_server_stops(make_client: ClientFactory) -> None:
    client = await make_client()
    ws = await client.ws_connect("/api/0/events")
    sse = await client.get("/api/0/events", headers={"Accept": "text/event-stream"})
    await next_json(ws)
    await asyncio.wait_for(client.server.close(), 10)  # the server, not the client, closes
    message = await ws.receive(timeout=5)
    assert message.type == aiohttp.WSMsgType.CLOSE
    assert (message.data, message.extra) == (aiohttp.WSCloseCode.GOING_AWAY,
                                             "server shutting down")
    body = await asyncio.wait_for(sse.text(), 5)  # ended, not cut off
    assert body.startswith("retry: ") and body.endswith("\n\n") and sse_messages(body)
    await client.close()


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each whole frame; fails on a torn one (RFC 6455, 5.2)."""
    frames = []
    while data:
        assert len(data) >= 2, data
        opcode, length, at = data[0] & 0x0F, data[1] & 0x7F, 2
        assert data[1] & 0x80 == 0  # a server never masks
        if length == 126:
            length, at = int.from_bytes(data[2:4]), 4
        elif length == 127:
            length, at = int.from_bytes(data[2:10]), 10
        assert len(data) >= at + length, "a torn frame"
        frames.append((opcode, data[at:at + length]))
        data = data[at + length:]
    return frames


async def raw_websocket(client: TestClient) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"GET /api/0/events HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    assert b" 101 " in await reader.readuntil(b"\r\n\r\n")
    return reader, writer


CLOSE, PING, PONG = 0x8, 0x9, 0xA


async def read_frames_answering_pings(reader: asyncio.StreamReader,
                                     writer: asyncio.StreamWriter) -> list[tuple[int, bytes]]:
    """Every frame until the server hangs up, each whole; pings answered, as a client must."""
    frames = []
    while header := await reader.read(2):
        if len(header) == 1:
            header += await reader.readexactly(1)
        length = header[1] & 0x7F
        if length >= 126:
            length = int.from_bytes(await reader.readexactly(2 if length == 126 else 8))
        payload = await reader.readexactly(length)
        frames.append((header[0] & 0x0F, payload))
        if header[0] & 0x0F == PING and not writer.is_closing():
            mask = os.urandom(4)
            writer.write(bytes([0x80 | PONG, 0x80 | len(payload)]) + mask
                         + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    return frames


async def test_nothing_follows_the_close_frame_at_shutdown(make_client: ClientFactory) -> None:
    # Pings every 20 ms and events every loop turn are in flight when the server stops.
    client = await make_client(heartbeat_s=0.02)
    hub = client.app[EVENT_HUB]
    reader, writer = await raw_websocket(client)

    async def publish_forever() -> None:
        while True:
            hub.publish("reboot", domain="linux-dev", uuid="x")
            await asyncio.sleep(0)

    publisher = asyncio.ensure_future(publish_forever())
    frames = asyncio.ensure_future(read_frames_answering_pings(reader, writer))
    await until(lambda: hub.seq > 300, 5, "events flow")
    await asyncio.wait_for(client.server.close(), 10)
    received = await asyncio.wait_for(frames, 10)
    publisher.cancel()
    writer.close()
    opcodes = [opcode for opcode, _ in received]
    assert PING in opcodes
    assert opcodes.index(CLOSE) == len(opcodes) - 1, opcodes[-5:]
    assert int.from_bytes(received[-1][1][:2]) == 1001


async def test_nothing_follows_the_close_frame_of_a_dropped_client(client: TestClient) -> None:
    hub = client.app[EVENT_HUB]
    reader, writer = await raw_websocket(client)
    padding = "x" * 65536
    for n in range(4000):  # the client reads nothing meanwhile
        hub.publish("reboot", domain="linux-dev", uuid="x", n=n, padding=padding)
        await asyncio.sleep(0)
        if hub.client_count == 0:
            break
    received = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    opcodes = [opcode for opcode, _ in server_frames(received)]
    assert opcodes.index(CLOSE) == len(opcodes) - 1, opcodes[-5:]


@pytest.mark.parametrize(("accept", "sse"), [
    ("text/event-stream", True),
    ("Text/Event-Stream", True),
    ("application/json, text/event-stream;q=0.5", True),
    ("text/event-stream; q=0", False),
    ("text/event-stream;q=0.0, */*", False),
    ("text/event-streams", False),
    ("application/json", False),
])
async def test_accept_is_negotiated_not_substring_matched(client: TestClient, accept: str,
                                                          sse: bool) -> None:
    response = await client.get("/api/0/events", headers={"Accept": accept})
    assert response.status == (200 if sse else 406)
    response.close()


async def test_a_toggle_that_fails_before_deciding_publishes_nothing(client: TestClient) -> None:
    async with client.ws_connect("/api/0/events?type=device") as ws:
        await next_json(ws)  # snapshot
        response = await client.get("/api/0/toggle/no-such-vm/usb_tablet")
        assert response.status == 404
        # An attach that was really tried (the test driver refuses it) is the next event.
        assert (await client.get("/api/0/attach/win11/usb_tablet")).status == 501
        event = await next_json(ws)
        assert (event["type"], event["domain"], event["result"]) == ("attach", "win11", "error")
