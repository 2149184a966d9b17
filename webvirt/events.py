"""The event hub: numbers every event, keeps the domain-state cache, fans out to clients.

A message is serialized once and the same string goes to every matching client. Each client
has a bounded queue; one that falls behind is told so and dropped, never slowing the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from webvirt.errors import ApiError

log = logging.getLogger(__name__)

# Event types, grouped into the categories a client may filter on with ?type=.
CATEGORIES: dict[str, frozenset[str]] = {
    "lifecycle": frozenset({"lifecycle", "reboot"}),
    "device": frozenset({"device-added", "device-removed", "device-removal-failed",
                         "attach", "detach"}),
    "host": frozenset({"node-device-added", "node-device-removed"}),
    "connection": frozenset({"connection"}),
}
EVENT_TYPES = frozenset().union(*CATEGORIES.values())
# Always delivered, whatever the filter.
CONTROL_TYPES = frozenset({"snapshot", "heartbeat", "lagging"})
QUEUE_LIMIT = 512


@dataclass(frozen=True)
class EventFilter:
    domains: frozenset[str] | None = None
    types: frozenset[str] | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> EventFilter:
        domains = _split(query.get("domain"))
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
        return cls(domains, frozenset(types) if types is not None else None)

    def wants(self, kind: str, domain: str | None) -> bool:
        if kind in CONTROL_TYPES:
            return True
        if self.types is not None and kind not in self.types:
            return False
        return self.domains is None or domain is None or domain in self.domains


def _split(value: str | None) -> frozenset[str] | None:
    if value is None:
        return None
    return frozenset(w.strip() for w in value.split(",") if w.strip())


class Signal(enum.Enum):
    END = "end"  # the server is shutting down
    LAGGING = "lagging"  # the client fell behind and is dropped


class Subscription:
    def __init__(self, event_filter: EventFilter):
        self.filter = event_filter
        self.queue: asyncio.Queue[str | Signal] = asyncio.Queue(QUEUE_LIMIT)
        self.dropped = False

    def offer(self, text: str) -> None:
        if self.dropped:
            return
        try:
            self.queue.put_nowait(text)
        except asyncio.QueueFull:
            # What is queued is stale now; the client reconnects for a fresh snapshot.
            self.dropped = True
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(Signal.LAGGING)

    def end(self) -> None:
        """Ask the client's writer to finish (server shutting down)."""
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(Signal.END)


class EventHub:
    def __init__(self) -> None:
        self.seq = 0
        self.connected = False
        self.domains: dict[str, dict[str, str]] = {}  # name -> {name, uuid, state}
        self._subscriptions: set[Subscription] = set()
        self._watchers: list[tuple[Callable[[dict[str, Any]], bool], asyncio.Future[None]]] = []

    @property
    def client_count(self) -> int:
        return len(self._subscriptions)

    def publish(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        message = {"seq": self.seq, "time": time.time(), "type": kind, **fields}
        text = json.dumps(message)
        domain = fields.get("domain")
        for subscription in self._subscriptions:
            if subscription.filter.wants(kind, domain):
                subscription.offer(text)
        if self._watchers:
            self._notify_watchers(message)
        return message

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

    def subscribe(self, event_filter: EventFilter) -> Subscription:
        subscription = Subscription(event_filter)
        subscription.offer(self.snapshot_text(event_filter))
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)

    def snapshot_text(self, event_filter: EventFilter) -> str:
        wanted = event_filter.domains
        domains = [d for name, d in sorted(self.domains.items())
                   if wanted is None or name in wanted]
        return json.dumps({"seq": self.seq, "time": time.time(), "type": "snapshot",
                           "connected": self.connected, "domains": domains})

    def broadcast_snapshot(self) -> None:
        for subscription in self._subscriptions:
            subscription.offer(self.snapshot_text(subscription.filter))

    def heartbeat(self) -> None:
        text = json.dumps({"seq": self.seq, "time": time.time(), "type": "heartbeat",
                           "connected": self.connected, "clients": len(self._subscriptions)})
        for subscription in self._subscriptions:
            subscription.offer(text)

    def lagging_text(self) -> str:
        """The last word to a dropped client; `seq` tells it how far the stream had got."""
        return json.dumps({"seq": self.seq, "time": time.time(), "type": "lagging",
                           "detail": "client fell behind the event stream and is "
                                     "disconnected; reconnect for a fresh snapshot"})

    def end_all(self) -> None:
        for subscription in self._subscriptions:
            subscription.end()

    # The domain-state cache, kept current by lifecycle events.

    def replace_domains(self, domains: Iterable[dict[str, str]]) -> None:
        self.domains = {d["name"]: d for d in domains}

    def set_state(self, name: str, uuid: str, state: str | None) -> None:
        if state is None:
            self.domains.pop(name, None)
        else:
            self.domains[name] = {"name": name, "uuid": uuid, "state": state}

    def refresh_state(self, name: str, state: str) -> None:
        """After webvirt's own action: the state libvirt reported once the action returned."""
        entry = self.domains.get(name)
        if entry is not None:
            entry["state"] = state

    def cached_state(self, name: str) -> str | None:
        entry = self.domains.get(name)
        return entry["state"] if entry else None
