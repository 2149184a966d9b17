"""The two kinds of event-stream client the hub feeds.

A WebSocket client gets each event as one pre-built frame, written straight to its socket from
the hub's loop turn: no per-client task or queue, which is what makes fan-out to a thousand
dashboards cheap. A Server-Sent Events client is fed by its own task from a bounded queue, as
its HTTP body is chunked by aiohttp. Either way, a client that falls behind is dropped alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from webvirt.events import EventFilter
from webvirt.messages import Outgoing, Signal

# A client whose socket holds more than this much unsent data (beyond what the kernel
# buffers) has fallen behind: what it would get next is stale, so it is dropped.
WRITE_BUFFER_LIMIT = 256 * 1024
QUEUE_LIMIT = 512


class WebSocketSubscriber:
    def __init__(self, event_filter: EventFilter, ws: web.WebSocketResponse,
                 transport: asyncio.Transport):
        self.filter = event_filter
        self._ws = ws
        self._transport = transport
        # Resolved with END or LAGGING; the handler then closes the WebSocket.
        self.finished: asyncio.Future[Signal] = asyncio.get_running_loop().create_future()

    def offer(self, message: Outgoing) -> None:
        # aiohttp writes every frame of its own (pings, close) whole and synchronously, so
        # whole frames written here never interleave with them; none go after its close frame.
        if self.finished.done() or self._ws.closed or self._transport.is_closing():
            return
        if self._transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            self.finished.set_result(Signal.LAGGING)
            return
        self._transport.write(message.websocket_frame)

    def end(self) -> None:
        if not self.finished.done():
            self.finished.set_result(Signal.END)


class QueuedSubscriber:
    """A client fed by its own task from a bounded queue (Server-Sent Events)."""

    def __init__(self, event_filter: EventFilter, on_drop: Callable[[], None]):
        self.filter = event_filter
        self.queue: asyncio.Queue[Outgoing | Signal] = asyncio.Queue(QUEUE_LIMIT)
        self.dropped = False
        # Its feeding task may be stuck writing to a client that reads nothing: the handler
        # gives it a moment to send LAGGING, then aborts the connection.
        self._on_drop = on_drop

    def offer(self, message: Outgoing) -> None:
        if self.dropped:
            return
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            # What is queued is stale now; the client reconnects for a fresh snapshot.
            self.dropped = True
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(Signal.LAGGING)
            self._on_drop()

    def end(self) -> None:
        if self.dropped:
            return  # LAGGING ends it already
        if self.queue.full():
            self.queue.get_nowait()  # the stream ends here anyway; END must get in
        self.queue.put_nowait(Signal.END)

