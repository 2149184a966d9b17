"""The event hub: numbers every event and fans it out to clients; knows nothing of libvirt.

A message is serialized once (Outgoing), and the same object goes to every matching
subscriber. Two kinds of subscriber: a WebSocket client gets each event as one pre-built frame,
written straight to its socket in the hub's loop turn (no per-client task or queue: what makes
fan-out to a thousand dashboards cheap); a Server-Sent Events client is fed by its own task
from a bounded queue, as aiohttp chunks its body. A client that falls behind is dropped alone:
none may block the hub or slow the others.

Writing frames past aiohttp's WebSocketResponse relies on this contract, tested in
tests/test_events.py for the aiohttp versions pyproject.toml allows: aiohttp writes each of
its own frames (pings, pongs, close) whole and synchronously to the same transport, so whole
frames written here never interleave with them; none are written once it has sent its close
frame (the WebSocket is then `closed`) or the transport is closing.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import json
import re
import secrets
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from webvirt.errors import ApiError


class Signal(enum.Enum):
    END = "end"  # the server is shutting down
    LAGGING = "lagging"  # the client fell behind and is dropped


class Outgoing:
    """One message as sent: serialized once, each frame built once, on first use."""

    __slots__ = ("_frame", "_sse", "id", "text")

    def __init__(self, text: str, message_id: str):
        self.text = text
        self.id = message_id
        self._frame: bytes | None = None
        self._sse: bytes | None = None

    @property
    def websocket_frame(self) -> bytes:
        if self._frame is None:
            self._frame = websocket_text_frame(self.text.encode())
        return self._frame

    @property
    def sse_frame(self) -> bytes:
        """Unnamed (no event: line), so EventSource's onmessage gets it; the id: line is
        what a browser sends back as Last-Event-ID when it reconnects."""
        if self._sse is None:
            id_line = f"id: {self.id}\n" if self.id else ""
            self._sse = f"{id_line}data: {self.text}\n\n".encode()
        return self._sse


def websocket_text_frame(payload: bytes) -> bytes:
    """A single unmasked, uncompressed text frame, as a server sends it (RFC 6455, 5.2)."""
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x81, length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, length)
    else:
        header = struct.pack("!BBQ", 0x81, 127, length)
    return header + payload


# Event types, grouped into the categories a client may filter on with ?type=.
CATEGORIES: dict[str, frozenset[str]] = {
    # "state": a re-read found a state no lifecycle event announced (e.g. while disconnected).
    "lifecycle": frozenset({"lifecycle", "state", "reboot"}),
    "device": frozenset({"device-added", "device-removed", "device-removal-failed",
                         "attach", "detach", "rule", "rule-changed"}),
    "host": frozenset({"node-device-added", "node-device-removed"}),
    "connection": frozenset({"connection"}),
    # Live usage every --stats-interval (webvirt/usage.py): only to clients that ask for it.
    "stats": frozenset({"stats"}),
}
EVENT_TYPES = frozenset().union(*CATEGORIES.values())
# Always delivered, whatever the filter.
CONTROL_TYPES = frozenset({"snapshot", "heartbeat", "lagging"})
# Left out unless the filter names them: no filter means every event, not a gauge per second.
OPT_IN_TYPES = CATEGORIES["stats"]


@dataclass(frozen=True)
class EventFilter:
    domains: frozenset[str] | None = None
    types: frozenset[str] | None = None
    # Host names (several hosts); an event naming no host passes.
    hosts: frozenset[str] | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> EventFilter:
        domains = _split(query.get("domain"))
        hosts = _split(query.get("host"))
        types: set[str] | None = None
        for word in _split(query.get("type")) or ():
            if word in CATEGORIES:
                types = (types or set()) | CATEGORIES[word]
            elif word in EVENT_TYPES:
                types = (types or set()) | {word}
            else:
                known = ", ".join(sorted(CATEGORIES) + sorted(EVENT_TYPES))
                raise ApiError(f"unknown event type {word!r}; known: {known}",
                               code="bad_parameter")
        return cls(domains, frozenset(types) if types is not None else None, hosts)

    @property
    def wants_stats(self) -> bool:
        return self.types is not None and "stats" in self.types

    def wants(self, kind: str, domain: str | None, host: str | None = None) -> bool:
        if kind in CONTROL_TYPES:
            return True
        if self.types is None and kind in OPT_IN_TYPES:
            return False
        if self.types is not None and kind not in self.types:
            return False
        return self.wants_host(host) and self.wants_domain(domain, host)

    def wants_host(self, host: str | None) -> bool:
        return self.hosts is None or host is None or host in self.hosts

    def wants_domain(self, domain: str | None, host: str | None = None) -> bool:
        """By name, or as NAME@HOST when the event names its host."""
        if self.domains is None or domain is None or domain in self.domains:
            return True
        return host is not None and f"{domain}@{host}" in self.domains


def _split(value: str | None) -> frozenset[str] | None:
    if value is None:
        return None
    return frozenset(w.strip() for w in value.split(",") if w.strip())


class Subscriber(Protocol):
    filter: EventFilter

    def offer(self, message: Outgoing) -> None:
        """Take a message for the client; never blocks, never raises."""

    def replay(self, messages: list[Outgoing]) -> None:
        """Take what the client missed, before any live message; never blocks."""

    def end(self) -> None:
        """The server is shutting down."""


def no_state() -> tuple[bool, list[dict[str, str]]]:
    return False, []


SEQ = re.compile(r"[0-9]{1,18}")  # ASCII digits only, and an int() can take them


@dataclass(frozen=True, slots=True)
class Published:
    seq: int
    kind: str
    domain: str | None
    outgoing: Outgoing
    host: str | None = None


class EventHub:
    def __init__(self, replay_events: int = 1000) -> None:
        self.seq = 0
        # Message ids are "<stream>-<seq>": a new stream id each run, as seq starts again.
        self.stream_id = secrets.token_hex(4)
        # What snapshots say: (connected, [{name, uuid, state}, ...] by name), from the host
        # (or all hosts: then each entry names its host).
        self.state_source: Callable[[], tuple[bool, list[dict[str, str]]]] = no_state
        # With several hosts: [{name, connected}, ...], in snapshots and heartbeats.
        self.hosts_source: Callable[[], list[dict[str, Any]]] | None = None
        # The latest events, for clients that resume; bounded by count.
        self._replay: collections.deque[Published] = collections.deque(maxlen=replay_events)
        self._subscribers: set[Subscriber] = set()
        # Set at shutdown (end_all): a request waiting for a guest (?wait) answers at once.
        self.stopping = asyncio.Event()
        # Those whose filter asks for stats; set while there is one (the sampler waits on it).
        self._stats_subscribers: set[Subscriber] = set()
        self.stats_wanted = asyncio.Event()
        self._watchers: list[tuple[Callable[[dict[str, Any]], bool], asyncio.Future[None]]] = []
        # In-process consumers (the USB reconciler): called with each event, in order.
        self._listeners: list[Callable[[dict[str, Any]], None]] = []

    @property
    def client_count(self) -> int:
        return len(self._subscribers)

    def publish(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        message = self._envelope(kind, **fields)
        outgoing = Outgoing(json.dumps(message), message["id"])
        domain, host = fields.get("domain"), fields.get("host")
        if self._replay.maxlen:
            self._replay.append(Published(self.seq, kind, domain, outgoing, host))
        for subscriber in self._subscribers:
            if subscriber.filter.wants(kind, domain, host):
                subscriber.offer(outgoing)
        if self._watchers:
            self._notify_watchers(message)
        for listener in self._listeners:
            listener(message)
        return message

    def listen(self, listener: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """Calls listener(event) for every event from now on, synchronously: it must be quick
        and never raise (queue work, don't do it). Returns the function that stops it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def watch(self, predicate: Callable[[dict[str, Any]], bool]) -> asyncio.Future[None]:
        """A future that completes at the first published event the predicate accepts."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._watchers.append((predicate, future))
        return future

    def _notify_watchers(self, message: dict[str, Any]) -> None:
        waiting = []
        for predicate, future in self._watchers:
            if future.done():
                continue  # its waiter gave up
            if predicate(message):
                future.set_result(None)
            else:
                waiting.append((predicate, future))
        self._watchers = waiting

    def subscribe(self, subscriber: Subscriber, last_event_id: str | None = None) -> None:
        """A client resuming after `last_event_id` gets exactly the events after it, else a
        snapshot (marked resync when the id could not be resumed). All in this loop turn,
        so no live event falls between the two, nor comes twice."""
        missed = self.events_after(last_event_id) if last_event_id is not None else None
        if missed is None:
            subscriber.offer(self.snapshot(subscriber.filter, resync=last_event_id is not None))
        else:
            subscriber.replay([p.outgoing for p in missed
                               if subscriber.filter.wants(p.kind, p.domain, p.host)])
        self._subscribers.add(subscriber)
        if subscriber.filter.wants_stats:
            self._stats_subscribers.add(subscriber)
            self.stats_wanted.set()

    def events_after(self, last_event_id: str) -> list[Published] | None:
        """The events after that id, or None when they are not all here any more (or the id
        is from another run, or no id at all)."""
        stream, _, number = last_event_id.strip().rpartition("-")
        if stream != self.stream_id or not SEQ.fullmatch(number):
            return None
        seq = int(number)
        oldest = self._replay[0].seq if self._replay else self.seq + 1
        if seq > self.seq or seq < oldest - 1:
            return None
        return [p for p in self._replay if p.seq > seq]

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)
        self._stats_subscribers.discard(subscriber)
        if not self._stats_subscribers:
            self.stats_wanted.clear()

    @property
    def stats_client_count(self) -> int:
        return len(self._stats_subscribers)

    def broadcast_stats(self, domains: list[dict[str, Any]], **fields: Any) -> None:
        """A live gauge, not an event: no seq of its own (it carries the latest event's id and
        seq, as a heartbeat does), never in the replay buffer (a resuming client gets none of
        the stale ones), only to clients that asked for stats, with their domain filter
        applied. Serialized once per distinct domain filter."""
        built: dict[frozenset[str] | None, Outgoing] = {}
        host = fields.get("host")
        for subscriber in self._stats_subscribers:
            event_filter = subscriber.filter
            if not event_filter.wants_host(host):
                continue
            wanted = event_filter.domains
            outgoing = built.get(wanted)
            if outgoing is None:
                outgoing = built[wanted] = self._control(
                    "stats", **fields,
                    domains=[d for d in domains if event_filter.wants_domain(d["domain"], host)])
            subscriber.offer(outgoing)

    def snapshot(self, event_filter: EventFilter, resync: bool = False) -> Outgoing:
        connected, domains = self.state_source()
        extra: dict[str, Any] = {"resync": True} if resync else {}
        if self.hosts_source is not None:
            extra["hosts"] = self.hosts_source()
        wanted = [d for d in domains if event_filter.wants_host(d.get("host"))
                  and event_filter.wants_domain(d["name"], d.get("host"))]
        return self._control("snapshot", connected=connected, **extra, domains=wanted)

    def broadcast_snapshot(self) -> None:
        for subscriber in self._subscribers:
            subscriber.offer(self.snapshot(subscriber.filter))

    def heartbeat(self) -> None:
        extra = {"hosts": self.hosts_source()} if self.hosts_source is not None else {}
        beat = self._control("heartbeat", connected=self.state_source()[0],
                             clients=len(self._subscribers), **extra)
        for subscriber in self._subscribers:
            subscriber.offer(beat)

    def lagging(self) -> Outgoing:
        """The last word to a dropped client. No id: what was queued for it is thrown away,
        so it must resume from the last message it did get, not from this one."""
        message = self._envelope(
            "lagging", detail="client fell behind the event stream and is disconnected; "
                              "reconnect with the id of the last message you got to resume")
        del message["id"]
        return Outgoing(json.dumps(message), "")

    def _control(self, kind: str, **fields: Any) -> Outgoing:
        message = self._envelope(kind, **fields)
        return Outgoing(json.dumps(message), message["id"])

    def _envelope(self, kind: str, **fields: Any) -> dict[str, Any]:
        # Every message; control messages carry the seq (and id) of the latest event, so
        # resuming from one of them is resuming from that event.
        return {"id": f"{self.stream_id}-{self.seq}", "seq": self.seq, "time": time.time(),
                "type": kind, **fields}

    def end_all(self) -> None:
        """webvirt is stopping: every stream ends, and whatever waits on events stops."""
        self.stopping.set()
        for subscriber in self._subscribers:
            subscriber.end()


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
        self._limit = WRITE_BUFFER_LIMIT

    def offer(self, message: Outgoing) -> None:
        # aiohttp writes every frame of its own (pings, close) whole and synchronously, so
        # whole frames written here never interleave with them; none go after its close frame.
        if self.finished.done() or self._ws.closed or self._transport.is_closing():
            return
        if self._transport.get_write_buffer_size() > self._limit:
            self.finished.set_result(Signal.LAGGING)
            return
        self._transport.write(message.websocket_frame)

    def replay(self, messages: list[Outgoing]) -> None:
        frames = b"".join(m.websocket_frame for m in messages)
        self._limit += len(frames)  # what it missed does not count as falling behind
        self._transport.write(frames)

    def end(self) -> None:
        if not self.finished.done():
            self.finished.set_result(Signal.END)


class QueuedSubscriber:
    """A client fed by its own task from a bounded queue (Server-Sent Events)."""

    def __init__(self, event_filter: EventFilter, on_stop: Callable[[Signal], None]):
        self.filter = event_filter
        self.queue: asyncio.Queue[Outgoing | Signal] = asyncio.Queue(QUEUE_LIMIT)
        self.missed: collections.deque[Outgoing] = collections.deque()  # sent before the queue
        self.dropped = False
        # Its feeding task may be stuck writing to a client that reads nothing: told of a
        # drop or the end, the handler gives it a moment for its last message, then aborts.
        self._on_stop = on_stop

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
            self._on_stop(Signal.LAGGING)

    def replay(self, messages: list[Outgoing]) -> None:
        self.missed.extend(messages)  # bounded by the hub's replay buffer

    def end(self) -> None:
        if self.dropped:
            return  # LAGGING ends it already
        if self.queue.full():
            self.queue.get_nowait()  # the stream ends here anyway; END must get in
        self.queue.put_nowait(Signal.END)
        self._on_stop(Signal.END)
