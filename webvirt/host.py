"""A libvirt host: its connections, reconnecting, its events, and the domain-state cache.

Commands go in through `call`/`act`; facts come out through the hub. Every connection is
confined to a thread of its own (webvirt/connection.py). The connections of one session
stand or fall together: when any is lost (keepalive, error, a call that timed out), all are
retired, event clients are told, and a new session is opened; on it the cache is re-read.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
import uuid as uuid_module
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, TypeVar

import libvirt

from webvirt import domains
from webvirt.connection import Connection
from webvirt.domain_cache import DomainCache, DomainEntry, Read, State
from webvirt.errors import (
    ApiError,
    Conflict,
    NotFound,
    Unavailable,
    from_libvirt,
    is_connection_error,
)
from webvirt.host_devices import (
    HostDevices,
    event_fields,
    is_local,
    read_node_device,
    read_node_devices,
    reported,
)
from webvirt.hub import EventHub
from webvirt.libvirt_events import LIFECYCLE_DETAILS, LIFECYCLE_EVENTS, STATE_AFTER, register
from webvirt.libvirt_loop import ensure_event_impl
from webvirt.tasks import arrives, cancel_and_wait

log = logging.getLogger(__name__)
T = TypeVar("T")

RECONNECT_DELAYS_S = (0.2, 0.5, 1, 2, 5)
# At shutdown, how long a connection's thread has to close it (an idle one takes
# milliseconds; one stuck on a frozen daemon is not waited for: webvirt stops within 2 s).
SHUTDOWN_CALL_S = 0.5
# A read often sees a change before its lifecycle event arrives; only what no event has told
# event clients within this time is published as a correction.
CORRECTION_GRACE_S = 1.0
Change = tuple[DomainEntry | None, DomainEntry | None]


class Host:
    def __init__(self, uri: str | None, hub: EventHub, *, call_timeout: float = 30.0,
                 connections: int = 3, reconcile_s: float = 30.0, name: str = "local",
                 tagged: bool = False):
        self.uri = uri
        self.hub = hub
        self.name = name
        # With several hosts, what this host tells (events, snapshot entries) names it.
        self.tags: dict[str, str] = {"host": name} if tagged else {}
        # What log lines add to say which host (nothing with one host: its lines as before).
        self.said = f" (host {name})" if tagged else ""
        self.call_timeout = call_timeout
        # Each connection to a test:///FILE URI is a private copy of that host: use one.
        self.connection_count = 1 if (uri or "").startswith("test:") else connections
        self.reconcile_s = reconcile_s
        self.connected_uri = "?"  # the URI libvirt resolved, for logs and events
        self.cache = DomainCache()
        self.devices = HostDevices()
        self.local = is_local(uri)  # USB serial numbers can be read from sysfs
        # Node-device events in arrival order: an added device is read before it is told,
        # and its removal must not overtake that.
        self._device_events: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._devices_lock = asyncio.Lock()
        self._devices_read = False  # a baseline to tell changes against
        self.connected = False
        self.reconnects = 0
        # libvirt's and the hypervisor's versions, read at each connect (GET /api/0/hosts).
        self.versions: dict[str, str | None] = dict.fromkeys(VERSION_KEYS)
        self._connections: list[Connection] = []
        self._draining: set[Connection] = set()  # retired, their threads not ended yet
        self._busy: set[str] = set()  # UUIDs with an exclusive operation under way
        self._dirty: set[str] = set()  # UUIDs to re-read
        # What the event stream last said each domain's state is (by UUID), and the domains
        # whose cached state changed by a read and may need a correction.
        self._told: dict[str, DomainEntry] = {}
        self._unsettled: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._refresher: asyncio.Task[None] | None = None
        self._reconnector: asyncio.Task[None] | None = None
        self._closing = self._closed = False
        self._ever_connected = False
        # Told the seconds each call took, queueing included (webvirt/metrics.py).
        self.call_listeners: list[Callable[[float], None]] = []
        hub.state_source = self.snapshot

    @property
    def display_uri(self) -> str:
        return self.uri or "libvirt's default URI"

    def snapshot(self) -> tuple[bool, list[dict[str, str]]]:
        return self.connected, [{**entry.as_dict(), **self.tags} for entry in self.cache]

    def publish(self, kind: str, **fields: Any) -> dict[str, Any]:
        """An event about this host or its domains, naming the host when there are several."""
        return self.hub.publish(kind, **fields, **self.tags)

    # Opening, losing and closing the session.

    async def open(self) -> None:
        """Connect at start; raises Unavailable with libvirt's reason when it cannot."""
        ensure_event_impl()
        self._closing = self._closed = False
        await self._connect(open_seconds=self.call_timeout)
        self._start_following()
        log.info("connected to libvirt at %s", self.connected_uri)

    def open_in_background(self) -> asyncio.Task[None]:
        """Connect, and keep trying while the host cannot be reached (one of several hosts:
        webvirt serves the others meanwhile). The task ends at the first attempt's outcome;
        a failed one leaves the reconnect loop running."""
        ensure_event_impl()
        self._closing = self._closed = False
        self._start_following()
        return self._spawn(self._first_connect())

    async def _first_connect(self) -> None:
        try:
            await self._connect(open_seconds=None)
        except (ApiError, libvirt.libvirtError) as err:
            reason = err.detail if isinstance(err, ApiError) else err.get_error_message()
            log.warning("host %s: %s; retrying in the background", self.name, reason)
            self.announce_when_connected()
            self._reconnector = self._spawn(self._reconnect())
            return
        log.info("connected to libvirt at %s (host %s)", self.connected_uri, self.name)

    def announce_when_connected(self) -> None:
        """Event clients are served meanwhile: when this host comes, they learn it as after a
        reconnect (`connection` restored, then a fresh snapshot)."""
        self._ever_connected = True

    def _start_following(self) -> None:
        self._spawn(self._reconcile_periodically())
        self._spawn(self._follow_devices())

    async def _connect(self, open_seconds: float | None) -> None:
        connections = [Connection(self.uri, f"{self.reconnects}.{i}", self._retired)
                       for i in range(self.connection_count)]
        self._connections = connections
        try:
            uris = await asyncio.gather(*(c.open(open_seconds) for c in connections))
            self.connected_uri = uris[0]
            # The URI libvirt chose (e.g. from LIBVIRT_DEFAULT_URI) says where it runs.
            self.local = is_local(self.connected_uri)
            events = connections[0]
            loop = asyncio.get_running_loop()
            await events.call(lambda conn: register(
                conn, self, loop, lambda: not events.retired, events.callback_ids),
                self.call_timeout)
            self.versions = await events.call(read_versions, self.call_timeout)
            await self._resync()
            await self._resync_devices()
        except BaseException:
            for connection in connections:
                connection.retire("could not set up")
            raise
        if self._connections is not connections:  # lost again while setting up
            raise Unavailable("the connection was lost while setting up")
        self.connected = True
        if self._ever_connected:
            self.publish("connection", state="restored", uri=self.connected_uri)
            # As numbered events, so that a client resuming across the outage learns them too.
            for uuid in sorted(set(self._told) | {entry.uuid for entry in self.cache}):
                self._correct(uuid)
            self.hub.broadcast_snapshot()
        else:
            self._told = {entry.uuid: entry for entry in self.cache}
        self._ever_connected = True
        if self._dirty:  # events that came while setting up still want their re-read
            self._start_refreshing()

    def _retired(self, connection: Connection, reason: str) -> None:
        # Until its thread ends, a call may still wait on it: webvirt's stop tells its caller.
        self._draining.add(connection)
        connection.ended.add_done_callback(lambda _f: self._draining.discard(connection))
        if connection not in self._connections:
            return
        connections, self._connections = self._connections, []
        for other in connections:
            other.retire("its session was lost")
        if self._closing or not self.connected:
            return  # closing, or still setting up (_connect raises)
        self.connected = False
        log.warning("lost the libvirt connection%s (%s); reconnecting", self.said, reason)
        self.publish("connection", state="lost", reason=reason)
        self._reconnector = self._spawn(self._reconnect())

    async def _reconnect(self) -> None:
        attempt = 0
        while not self._closing:
            await asyncio.sleep(RECONNECT_DELAYS_S[min(attempt, len(RECONNECT_DELAYS_S) - 1)])
            attempt += 1
            self.reconnects += 1
            try:
                # No timeout on opening: an open stuck on a frozen daemon is waited for, not
                # abandoned, so stuck threads cannot pile up while the daemon stays frozen.
                await self._connect(open_seconds=None)
            except (ApiError, libvirt.libvirtError) as err:
                log.debug("reconnect attempt %d%s failed: %s", attempt, self.said, err)
                continue
            log.info("reconnected to libvirt at %s%s after %d attempt(s)", self.connected_uri,
                     self.said, attempt)
            # The lost session's libvirt objects may sit in reference cycles (a traceback
            # keeps a call's frame); free them, and their eventfds, now, not at some later GC.
            gc.collect()
            return

    async def close(self) -> None:
        """Once: webvirt's stop closes the hosts first (app.end_libvirt_calls), the clean-up
        again in case the stop did not come to it."""
        if self._closed:
            return
        self._closed = self._closing = True
        await cancel_and_wait(*self._tasks)
        connections, self._connections = self._connections, []
        if self.connected:
            self.connected = False
            self.publish("connection", state="lost", reason="server shutting down")
        # Also those of a session lost before, whose calls may still wait on a stuck thread.
        for connection in {*connections, *self._draining}:
            connection.retire("server shutting down", abandon=True)
        if self._draining:
            # Bounded: a stuck daemon is not worth waiting for at shutdown.
            await asyncio.wait([c.ended for c in self._draining], timeout=SHUTDOWN_CALL_S)
        # Free libvirt objects still held in reference cycles while the loop can release them.
        gc.collect()
        await asyncio.sleep(0)

    def _spawn(self, coroutine: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # Commands.

    async def call(self, fn: Callable[[libvirt.virConnect], T],
                   seconds: float | None = None) -> T:
        """Run fn(conn) on the least busy connection's thread; libvirt errors as ApiError."""
        return await self._call_on(min(self._open(), key=lambda c: c.pending), fn, seconds)

    async def call_each(self, fns: Sequence[Callable[[libvirt.virConnect], T]]) -> list[T]:
        """Each fn on a connection of its own (the least busy first), side by side: for work
        libvirt does one domain after another, such as asking each QEMU monitor."""
        connections = sorted(self._open(), key=lambda c: c.pending)
        return list(await asyncio.gather(*(
            self._call_on(connections[i % len(connections)], fn, None)
            for i, fn in enumerate(fns))))

    def _open(self) -> list[Connection]:
        if not self._connections:
            raise Unavailable(f"not connected to libvirt at {self.display_uri}; reconnecting")
        return self._connections

    async def _call_on(self, connection: Connection, fn: Callable[[libvirt.virConnect], T],
                       seconds: float | None) -> T:
        started = time.perf_counter()
        try:
            return await connection.call(fn, self.call_timeout if seconds is None else seconds)
        except libvirt.libvirtError as err:
            if is_connection_error(err):
                connection.retire(f"call failed: {err.get_error_message()}")
            error = from_libvirt(err)
        finally:
            for listener in self.call_listeners:
                listener(time.perf_counter() - started)
        # Raised outside the except block: a chained libvirtError's traceback would keep
        # domain objects (and so the connection) alive in a reference cycle.
        raise error

    async def resolve(self, ref: str) -> DomainEntry:
        """The domain a name or UUID means; one identity whichever way it is addressed."""
        if not self.connected:  # also while its connections are still opening
            raise Unavailable(f"not connected to libvirt at {self.display_uri}; reconnecting")
        entry = self.cache.get(ref)
        if entry is not None:
            return entry
        uuid, name, state = await self.call(partial(read_domain, ref=ref))
        return DomainEntry(uuid, name, state)

    @contextlib.contextmanager
    def exclusive(self, entry: DomainEntry) -> Iterator[None]:
        """One state-changing operation per domain at a time; a second one gets 409 at once."""
        if entry.uuid in self._busy:
            raise Conflict(f"another operation on domain {entry.name!r} is in progress",
                           code="operation_in_progress")
        self._busy.add(entry.uuid)
        try:
            yield
        finally:
            self._busy.discard(entry.uuid)

    async def act(self, entry: DomainEntry,
                  operation: Callable[[libvirt.virDomain], str]) -> str:
        """Run operation(domain), then re-read the domain's state, in one call."""
        began = self.cache.clock
        result, read = await self.call(partial(act_then_read, operation=operation,
                                               uuid=entry.uuid))
        self._apply(self.cache.apply_read(read, began))
        return result

    async def wait_for_state(self, entry: DomainEntry, accept: Callable[[State], bool],
                             seconds: float) -> bool:
        """Whether the cached state is one `accept` takes within `seconds`. The cache is
        re-read on every reconnect, so a change while libvirt was away is seen too."""
        waiter = self.cache.wait_for(entry.uuid, accept)
        try:
            return await arrives(waiter, seconds)
        finally:
            waiter.cancel()

    # Facts: libvirt's events (webvirt.libvirt_events.EventSink) and reads.

    def lifecycle(self, uuid: str, name: str, event: int, detail: int) -> None:
        before = self.cache.by_uuid(uuid)
        state = STATE_AFTER.get(event) or (before.state if before else None)
        if event == libvirt.VIR_DOMAIN_EVENT_DEFINED and state is None:
            state = "shutoff"
        if event == libvirt.VIR_DOMAIN_EVENT_UNDEFINED and state == "shutoff":
            state = None  # gone for good; a running transient domain stays until it stops
        self.cache.apply_event(uuid, name, state)
        if state is None:
            self._told.pop(uuid, None)
        else:
            self._told[uuid] = DomainEntry(uuid, name, state)
        self.publish(
            "lifecycle", domain=name, uuid=uuid,
            event=LIFECYCLE_EVENTS.get(event, str(event)),
            detail=LIFECYCLE_DETAILS.get(event, {}).get(detail, str(detail)),
            state=state or "undefined",
        )
        # The event says what changed, not always what is: a transient domain that stopped
        # is gone, a start that failed midway leaves no event. A read settles it.
        self._refresh(uuid)

    def domain_event(self, kind: str, uuid: str, name: str, **fields: Any) -> None:
        self.publish(kind, domain=name, uuid=uuid, **fields)

    def node_device(self, kind: str, device: str) -> None:
        self._device_events.put_nowait((kind, device))

    async def _follow_devices(self) -> None:
        while True:
            kind, name = await self._device_events.get()
            async with self._devices_lock:
                if kind == "node-device-added":
                    try:
                        description = await self.call(partial(read_node_device, name=name,
                                                                  local=self.local))
                    except ApiError as err:  # a lost connection re-reads them all
                        log.debug("reading node device %s failed: %s", name, err.detail)
                        continue
                    if description is not None and self.devices.add(description):
                        self._tell_device(kind, description)
                else:
                    gone = self.devices.remove(name)
                    if gone is not None:
                        self._tell_device(kind, gone)

    def _tell_device(self, kind: str, description: dict[str, Any]) -> None:
        if reported(description):
            self.publish(kind, **event_fields(description))

    async def _resync_devices(self) -> None:
        """Re-read every node device; after an outage, tell what came and went meanwhile. The
        first read is the baseline, even when the host connects late (away at start-up): its
        devices did not come, they were there."""
        tell = self._devices_read
        async with self._devices_lock:
            try:
                descriptions = await self.call(partial(read_node_devices, local=self.local))
            except ApiError as err:
                if err.status != 501:
                    raise
                log.info("host devices unavailable%s: %s", self.said, err.detail)
                return
            added, removed = self.devices.replace_all(descriptions)
            self._devices_read = True
        if tell:
            for description in removed:
                self._tell_device("node-device-removed", description)
            for description in added:
                self._tell_device("node-device-added", description)

    def _refresh(self, uuid: str) -> None:
        self._dirty.add(uuid)
        self._start_refreshing()

    def _start_refreshing(self) -> None:
        if self._refresher is None or self._refresher.done():
            self._refresher = self._spawn(self._refresh_dirty())

    async def _refresh_dirty(self) -> None:
        while self._dirty and self.connected:
            batch, self._dirty = self._dirty, set()
            began = self.cache.clock
            try:
                reads = await self.call(partial(read_states, uuids=sorted(batch)))
            except ApiError as err:
                # A lost connection is re-read in full on reconnect; anything else is retried
                # by the periodic reconciliation.
                log.debug("re-reading %d domain(s) failed: %s", len(batch), err.detail)
                return
            for read in reads:
                self._apply(self.cache.apply_read(read, began))

    async def _resync(self) -> None:
        """Re-read every domain; what libvirt no longer lists leaves the cache."""
        began = self.cache.clock
        reads = await self.call(read_all)
        for change in self.cache.apply_full_read(reads, began):
            self._apply(change)

    async def _reconcile_periodically(self) -> None:
        """The safety net: events can be missed (e.g. libvirt drops them under load)."""
        while True:
            await asyncio.sleep(self.reconcile_s)
            if self.connected:
                with contextlib.suppress(ApiError):
                    await self._resync()

    def _apply(self, change: Change | None) -> None:
        """A read changed the cache: event clients must hear of it, by an event or else."""
        if change is None or change[0] == change[1]:
            return
        entry = change[1] or change[0]
        assert entry is not None
        if entry.uuid not in self._unsettled:
            self._unsettled.add(entry.uuid)
            asyncio.get_running_loop().call_later(CORRECTION_GRACE_S, self._settle, entry)

    def _settle(self, entry: DomainEntry) -> None:
        self._unsettled.discard(entry.uuid)
        if self.connected:  # else the reconnect corrects it
            self._correct(entry.uuid)

    def _correct(self, uuid: str) -> None:
        """Publish a state event if the cache differs from what the stream last said."""
        current = self.cache.by_uuid(uuid)
        told = self._told.pop(uuid, None)
        if current is not None:
            self._told[uuid] = current
        known = current or told
        if known is None:
            return  # came and went unseen
        state = current.state if current else "undefined"
        previous = told.state if told else "undefined"
        if state != previous:
            self.publish("state", domain=known.name, uuid=uuid, state=state,
                             previous=previous)


# Blocking helpers; each runs on a connection's thread.

VERSION_KEYS = ("libvirt_version", "hypervisor", "hypervisor_version")


def version_text(number: int) -> str:
    """libvirt's encoded version (major * 1,000,000 + minor * 1,000 + release) as text."""
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def read_versions(conn: libvirt.virConnect) -> dict[str, str | None]:
    return dict(zip(VERSION_KEYS, (version_text(conn.getLibVersion()), conn.getType(),
                                   version_text(conn.getVersion())), strict=True))

def _by_uuid(conn: libvirt.virConnect, uuid: str) -> libvirt.virDomain | None:
    try:
        return conn.lookupByUUIDString(uuid)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def read_domain(conn: libvirt.virConnect, ref: str) -> tuple[str, str, str]:
    """(uuid, name, state) of the domain a name or UUID means."""
    dom = None
    with contextlib.suppress(ValueError):
        dom = _by_uuid(conn, str(uuid_module.UUID(ref)))
    if dom is None:
        dom = domains.lookup(conn, ref)
    return dom.UUIDString(), dom.name(), domains.state_name(dom.state()[0])


def read(dom: libvirt.virDomain | None, uuid: str) -> Read:
    if dom is None:
        return Read(uuid, "", None)
    state = dom.state()[0]
    if state == libvirt.VIR_DOMAIN_SHUTOFF and not dom.isPersistent():
        # A transient domain that stopped is gone; libvirt may still list it for a moment
        # after its stopped event, and sends no event when it drops it.
        return Read(uuid, dom.name(), None)
    return Read(uuid, dom.name(), domains.state_name(state))


def read_states(conn: libvirt.virConnect, uuids: list[str]) -> list[Read]:
    return [read(_by_uuid(conn, uuid), uuid) for uuid in uuids]


def read_all(conn: libvirt.virConnect) -> list[Read]:
    return [read(d, d.UUIDString()) for d in conn.listAllDomains()]


def act_then_read(conn: libvirt.virConnect, operation: Callable[[libvirt.virDomain], str],
                  uuid: str) -> tuple[str, Read]:
    dom = _by_uuid(conn, uuid)
    if dom is None:
        raise NotFound(f"no domain with UUID {uuid}", code="domain_not_found")
    result = operation(dom)
    return result, read(_by_uuid(conn, uuid), uuid)  # a transient domain is gone once stopped
