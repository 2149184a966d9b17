"""GET /api/0/events: the live event stream, as a WebSocket or as Server-Sent Events."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import WSCloseCode, web
from aiohttp_apigami import docs

from webvirt.appkeys import EVENT_HUB, HOSTS, SETTINGS
from webvirt.errors import ApiError
from webvirt.hosts import split_ref
from webvirt.hub import (
    EventFilter,
    EventHub,
    Outgoing,
    QueuedSubscriber,
    Signal,
    Subscriber,
    WebSocketSubscriber,
)

log = logging.getLogger(__name__)

# A private-use close code: "you fell behind and were dropped; reconnect".
CLOSE_LAGGING = 4000
# How long a client that is dropped or told the server stops may take to get its last message;
# then its connection is aborted, whatever it still holds unsent.
LAST_WORD_S = 2.0
# How soon a browser's EventSource reconnects (its default is about 3 s).
RETRY = b"retry: 1000\n\n"


async def begin(request: web.Request, response: web.StreamResponse) -> asyncio.Transport | None:
    """Sends the stream's headers (or the WebSocket handshake); None if the client left."""
    try:
        await response.prepare(request)
    except ConnectionError:
        return None
    return request.transport


def client_left() -> web.Response:
    """For a client gone before its stream began: aiohttp only logs it (nginx's 499)."""
    return web.Response(status=499, reason="Client Closed Request")


@docs(
    tags=["events"],
    summary="Live event stream (WebSocket or Server-Sent Events)",
    description=(
        "Open a WebSocket, or send `Accept: text/event-stream` for Server-Sent Events. "
        "The first message is a snapshot of every domain, then events follow as JSON, each "
        "with `id`, `seq` and `time`. Filters: `domain=a,b` and "
        "`type=lifecycle,device,host,connection` (or exact event types). To resume after a "
        "reconnect, pass the `id` of the last message seen as `last_event_id` (or, for SSE, "
        "the `Last-Event-ID` header, which a browser's EventSource sends by itself): the "
        "events since then follow, with no snapshot; when they cannot be had, the first "
        "message is a snapshot with `resync: true`. With several hosts (--connect repeated), "
        "every event about a host or its domains, and every snapshot entry, carries `host`; "
        "snapshots and heartbeats carry `hosts` ([{name, connected}]), `connected` is true "
        "when all are; `host=a,b` filters by host, and `domain=` takes NAME@HOST too."
    ),
    parameters=[
        {"in": "query", "name": "domain", "schema": {"type": "string"}, "required": False,
         "description": "Comma-separated domain names"},
        {"in": "query", "name": "type", "schema": {"type": "string"}, "required": False,
         "description": "Comma-separated categories or event types"},
        {"in": "query", "name": "host", "schema": {"type": "string"}, "required": False,
         "description": "Comma-separated host names (several hosts)"},
        {"in": "query", "name": "last_event_id", "schema": {"type": "string"},
         "required": False, "description": "Resume after this message id"},
    ],
    responses={
        200: {"description": "An endless text/event-stream"},
        101: {"description": "Switching to the WebSocket protocol"},
        400: {"description": "Unknown event type in the filter"},
        406: {"description": "Neither a WebSocket upgrade nor Accept: text/event-stream"},
    },
)
async def events(request: web.Request) -> web.StreamResponse:
    event_filter = EventFilter.from_query(request.query)
    hosts = request.app[HOSTS]
    if not hosts.several and event_filter.domains:
        # With one host, events name no host: NAME@HOST means NAME (as a REST path does).
        event_filter = dataclasses.replace(event_filter, domains=event_filter.domains | {
            name for name, host in map(split_ref, event_filter.domains)
            if host == hosts.default.name})
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await serve_websocket(request, event_filter)
    if accepts_event_stream(request.headers.get("Accept", "")):
        return await serve_sse(request, event_filter)
    raise ApiError("open a WebSocket, or ask for Accept: text/event-stream", status=406,
                   code="not_acceptable")


def accepts_event_stream(accept: str) -> bool:
    """Whether an Accept header (RFC 9110, 12.5.1) takes text/event-stream with q > 0."""
    for item in accept.split(","):
        media_type, *parameters = (part.strip() for part in item.split(";"))
        if media_type.lower() != "text/event-stream":
            continue
        quality = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality > 0:
            return True
    return False


def resume_from(request: web.Request) -> str | None:
    return request.query.get("last_event_id") or request.headers.get("Last-Event-ID") or None


@contextlib.asynccontextmanager
async def subscribed(request: web.Request, subscriber: Subscriber) -> AsyncIterator[None]:
    hub, peer = request.app[EVENT_HUB], request.remote
    hub.subscribe(subscriber, resume_from(request))
    log.info("event client %s connected (%d clients)", peer, hub.client_count)
    try:
        yield
    finally:
        hub.unsubscribe(subscriber)
        log.info("event client %s left (%d clients)", peer, hub.client_count)


async def serve_websocket(request: web.Request, event_filter: EventFilter) -> web.StreamResponse:
    heartbeat = request.app[SETTINGS].heartbeat_s
    # No permessage-deflate: messages are small, and the subscriber writes each event as one
    # frame built once for all clients.
    ws = web.WebSocketResponse(heartbeat=heartbeat, compress=False)
    transport = await begin(request, ws)
    if transport is None:
        return client_left()
    hub = request.app[EVENT_HUB]
    subscriber = WebSocketSubscriber(event_filter, ws, transport)
    async with subscribed(request, subscriber):
        # Reading is what notices a client that went away; clients have nothing to say.
        reader = asyncio.ensure_future(_drain_incoming(ws))
        try:
            waits: set[asyncio.Future[Any]] = {reader, subscriber.finished}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            reader.cancel()
    if subscriber.finished.done():
        await _close(ws, transport, request.remote, subscriber.finished.result(), hub)
    return ws


async def _close(ws: web.WebSocketResponse, transport: asyncio.Transport, peer: str | None,
                 signal: Signal, hub: EventHub) -> None:
    # Bounded: a client that stopped reading must not keep its socket and buffers, nor the
    # handler (or shutdown) waiting for a flush that never comes.
    try:
        async with asyncio.timeout(LAST_WORD_S):
            if signal is Signal.END:
                await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
            else:
                log.warning("event client %s fell behind; dropped", peer)
                await ws.send_str(hub.lagging().text)
                await ws.close(code=CLOSE_LAGGING, message=b"client fell behind")
    except (TimeoutError, ConnectionError):
        pass
    finally:
        if not ws.closed or transport.get_write_buffer_size():
            transport.abort()


async def _drain_incoming(ws: web.WebSocketResponse) -> None:
    async for _message in ws:
        pass


async def serve_sse(request: web.Request, event_filter: EventFilter) -> web.StreamResponse:
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",  # proxies must not hold events back
    })
    transport = await begin(request, response)
    if transport is None:
        return client_left()
    hub = request.app[EVENT_HUB]
    loop = asyncio.get_running_loop()
    abort_later: list[asyncio.TimerHandle] = []

    async def send(message: Outgoing) -> None:
        await response.write(message.sse_frame)

    def stopping(signal: Signal) -> None:
        if signal is Signal.LAGGING:
            log.warning("event client %s fell behind; dropped", request.remote)
        abort_later.append(loop.call_later(LAST_WORD_S, transport.abort))

    subscriber = QueuedSubscriber(event_filter, on_stop=stopping)
    try:
        async with subscribed(request, subscriber):
            with contextlib.suppress(ConnectionError):
                await response.write(RETRY)
                while subscriber.missed:
                    await send(subscriber.missed.popleft())
                while isinstance(item := await subscriber.queue.get(), Outgoing):
                    await send(item)
                if item is Signal.LAGGING:
                    await send(hub.lagging())
    finally:
        # The connection may serve another request once this one ends: leave it alone.
        for handle in abort_later:
            handle.cancel()
    return response
