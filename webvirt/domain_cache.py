"""What webvirt believes each domain's state is, keyed by UUID, and when it last changed.

Facts arrive two ways: libvirt's events, in order, and reads (after an action, after an
event, on reconnect, periodically) that race with them. A read is applied only to domains
with no event since the read began; a newer event wins, and itself triggers a new read.
So the cache converges on what libvirt says, and never keeps an older read over a newer fact.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

# None: the domain does not exist (undefined, or a transient domain that stopped).
State = str | None
ChangeListener = Callable[["DomainEntry | None", "DomainEntry | None"], None]


@dataclass(frozen=True, slots=True)
class DomainEntry:
    uuid: str
    name: str
    state: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "uuid": self.uuid, "state": self.state}


@dataclass(frozen=True, slots=True)
class Read:
    """What one read found for one domain: its name and state, or state None (gone)."""

    uuid: str
    name: str
    state: State


class DomainCache:
    __slots__ = ("_by_uuid", "_changed_at", "_waiters", "clock")

    def __init__(self) -> None:
        self._by_uuid: dict[str, DomainEntry] = {}
        # uuid -> clock of its last event; kept for a while after a domain is gone, so a
        # read begun before its removal cannot bring it back.
        self._changed_at: dict[str, int] = {}
        self._waiters: list[tuple[str, Callable[[State], bool], asyncio.Future[None]]] = []
        self.clock = 0  # counts events; a read remembers the clock when it began

    def __iter__(self) -> Iterator[DomainEntry]:
        return iter(sorted(self._by_uuid.values(), key=lambda e: e.name))

    def __len__(self) -> int:
        return len(self._by_uuid)

    def get(self, ref: str) -> DomainEntry | None:
        """By UUID, or by name."""
        entry = self._by_uuid.get(ref.lower())
        if entry is not None:
            return entry
        return next((e for e in self._by_uuid.values() if e.name == ref), None)

    def by_uuid(self, uuid: str) -> DomainEntry | None:
        return self._by_uuid.get(uuid)

    def apply_event(self, uuid: str, name: str, state: State) -> tuple[DomainEntry | None,
                                                                        DomainEntry | None]:
        """A fact from libvirt's event stream: always applied. Answers (before, after)."""
        self.clock += 1
        self._changed_at[uuid] = self.clock
        return self._set(uuid, name, state)

    def apply_read(self, read: Read, began: int) -> tuple[DomainEntry | None,
                                                          DomainEntry | None] | None:
        """A read begun at clock `began`; None when an event since then makes it stale."""
        if self._changed_at.get(read.uuid, 0) > began:
            return None
        return self._set(read.uuid, read.name, read.state)

    def apply_full_read(self, reads: Iterable[Read], began: int) -> list[
            tuple[DomainEntry | None, DomainEntry | None]]:
        """Every domain libvirt lists: what is missing from it is gone (unless newer)."""
        changes = []
        listed = set()
        for read in reads:
            listed.add(read.uuid)
            change = self.apply_read(read, began)
            if change is not None:
                changes.append(change)
        for uuid, entry in list(self._by_uuid.items()):
            if uuid not in listed:
                change = self.apply_read(Read(uuid, entry.name, None), began)
                if change is not None:
                    changes.append(change)
        # Gone domains untouched since the read began need no guard any more.
        for uuid, changed in list(self._changed_at.items()):
            if uuid not in self._by_uuid and changed <= began:
                del self._changed_at[uuid]
        return [(before, after) for before, after in changes if before != after]

    def _set(self, uuid: str, name: str, state: State) -> tuple[DomainEntry | None,
                                                                 DomainEntry | None]:
        before = self._by_uuid.get(uuid)
        if state is None:
            self._by_uuid.pop(uuid, None)
            after = None
        else:
            after = DomainEntry(uuid, name, state)
            self._by_uuid[uuid] = after
        if before != after and self._waiters:
            self._wake(uuid, state)
        return before, after

    def wait_for(self, uuid: str, accept: Callable[[State], bool]) -> asyncio.Future[None]:
        """A future done once the domain's state is one `accept` takes (now or later)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = self._by_uuid.get(uuid)
        if accept(entry.state if entry else None):
            future.set_result(None)
        else:
            # Waiters that gave up leave here, or at the next change, whichever comes first.
            self._waiters = [w for w in self._waiters if not w[2].done()]
            self._waiters.append((uuid, accept, future))
        return future

    def _wake(self, uuid: str, state: State) -> None:
        waiting = []
        for waiter in self._waiters:
            waiter_uuid, accept, future = waiter
            if future.done():
                continue  # its caller gave up
            if waiter_uuid == uuid and accept(state):
                future.set_result(None)
            else:
                waiting.append(waiter)
        self._waiters = waiting
