"""Several libvirt hosts in one webvirt: naming them, and which host a domain reference means.

Each Host (webvirt/host.py) owns its connections, threads, reconnect loop and cache, so a
frozen host delays only what is addressed to it. This registry holds them by name and
resolves `NAME`, `NAME@HOST` or a UUID to (host, domain). With one host it is a thin shell:
references go to that host exactly as before, and nothing an answer or event says changes.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from webvirt import deadline
from webvirt.config import HOST_NAME
from webvirt.domain_cache import DomainEntry
from webvirt.errors import ApiError, Conflict, NotFound
from webvirt.host import Host
from webvirt.hub import EventHub

log = logging.getLogger(__name__)

NAME_PATTERN = rf"^{HOST_NAME}$"
_NAME = re.compile(NAME_PATTERN)
# At start-up with several hosts, how long to wait for them all before serving; one still
# connecting (a frozen daemon) goes on in the background.
STARTUP_WAIT_S = 5.0
# An answer about every host (the domain list, a scrape) waits this long for each; a host that
# has not answered by then (a frozen daemon that keepalive has not given up yet) is left out.
EACH_HOST_S = 2.0
T = TypeVar("T")


class HostError(ValueError):
    """A --connect that cannot be: the message says why."""


@dataclass(frozen=True, slots=True)
class HostSpec:
    name: str
    uri: str | None


def default_name(uri: str | None) -> str:
    """A URI's host part (qemu+ssh://gamer@desk/system: desk), or `local` when it has none."""
    host = urlsplit(uri).hostname if uri else None
    return host if host and _NAME.fullmatch(host) else "local"


def parse_connect(text: str) -> HostSpec:
    """`NAME=URI`, or a plain URI named after its host part."""
    name, equals, uri = text.partition("=")
    if not equals or any(c in name for c in ":/?"):  # a URI's own query has '=' too
        return HostSpec(default_name(text), text)
    if not _NAME.fullmatch(name):
        raise HostError(f"host name {name!r}: use 1 to 64 letters, digits, '.', '_' and '-'")
    if not uri:
        raise HostError(f"host {name!r}: no URI after '='")
    return HostSpec(name, uri)


def host_specs(values: Sequence[str]) -> tuple[HostSpec, ...]:
    """Every --connect (none: libvirt's default URI); a clear error for a bad or taken name."""
    specs = tuple(parse_connect(v) for v in values) or (HostSpec("local", None),)
    seen: dict[str, HostSpec] = {}
    for spec in specs:
        if spec.name in seen:
            raise HostError(f"two hosts are named {spec.name!r} ({seen[spec.name].uri} and "
                            f"{spec.uri}); name them with --connect NAME=URI")
        seen[spec.name] = spec
    return specs


def split_ref(ref: str) -> tuple[str, str | None]:
    """`NAME@HOST` as (NAME, HOST); anything else as (ref, None)."""
    name, at, host = ref.rpartition("@")
    if at and name and _NAME.fullmatch(host):
        return name, host
    return ref, None


class Hosts:
    def __init__(self, specs: Sequence[HostSpec], hub: EventHub, **options: Any):
        several = len(specs) > 1
        self.hub = hub
        self.by_name = {s.name: Host(s.uri, hub, name=s.name, tagged=several, **options)
                        for s in specs}
        self.default = next(iter(self.by_name.values()))
        self.several = several
        self._unheard: set[asyncio.Future[Any]] = set()  # reads past EACH_HOST_S
        if several:
            hub.state_source = self.snapshot
            hub.hosts_source = self.connection_states

    def __iter__(self) -> Iterator[Host]:
        return iter(self.by_name.values())

    def __len__(self) -> int:
        return len(self.by_name)

    @property
    def names(self) -> str:
        return ", ".join(self.by_name)

    def get(self, name: str) -> Host:
        host = self.by_name.get(name)
        if host is None:
            raise NotFound(f"no host named {name!r}; hosts: {self.names}", code="host_not_found")
        return host

    def pick(self, name: str | None) -> Host:
        """The host a `?host=` parameter names; it may be left out only with one host."""
        if name is not None:
            return self.get(name)
        if self.several:
            raise ApiError(f"say which host with ?host=NAME; hosts: {self.names}",
                           code="host_required")
        return self.default

    async def resolve(self, ref: str) -> tuple[Host, DomainEntry]:
        """The host and domain a reference means: NAME@HOST always; NAME or UUID when one
        host has it (409 ambiguous_domain when several do). A domain whose own name holds an
        "@" (libvirt allows it) is found by its whole name first."""
        name, host_name = split_ref(ref)
        if not self.several:
            host = self.default
            if host_name != host.name:
                return host, await host.resolve(ref)
            try:
                return host, await host.resolve(ref)
            except NotFound:
                return host, await host.resolve(name)
        # Known from the caches: no libvirt call, so a frozen host delays nobody else.
        holders = [host for host in self if host.cache.get(ref) is not None]
        named = self.by_name.get(host_name or "")
        if named is not None:
            if holders and named.cache.get(name) is not None:
                raise Conflict(f"{ref!r} is both a domain's name and {name!r} on host "
                               f"{named.name}; address it by UUID", code="ambiguous_domain")
            if not holders:
                return named, await named.resolve(name)
        elif host_name is not None and not holders:
            holders = await self._ask_all(ref, unknown_host=host_name)
        if not holders:
            holders = await self._ask_all(ref)
        if len(holders) > 1:
            names = ", ".join(h.name for h in holders)
            raise Conflict(f"domain {ref!r} is on several hosts ({names}); address it as "
                           f"{ref}@HOST", code="ambiguous_domain")
        return holders[0], await holders[0].resolve(ref)

    async def _ask_all(self, ref: str, unknown_host: str | None = None) -> list[Host]:
        """The hosts that have a domain the caches do not know (just defined), asked side by
        side; one that does not answer in time (frozen) is named in the 404."""
        async def ask(host: Host) -> DomainEntry | bool:
            if not host.connected:
                return False
            try:
                return await host.resolve(ref)
            except NotFound:
                return False

        answers = await self.each(ask, "domain lookup")
        found = [host for host, answer in answers if isinstance(answer, DomainEntry)]
        if found:
            return found
        if unknown_host is not None:
            self.get(unknown_host)  # 404 host_not_found
        away = [host.name for host, answer in answers if answer is None or
                not host.connected]
        unknown = f" (not connected or not answering: {', '.join(away)})" if away else ""
        raise NotFound(f"no domain {ref!r} on any host{unknown}", code="domain_not_found")

    async def each(self, read: Callable[[Host], Awaitable[T]],
                   what: str) -> list[tuple[Host, T | None]]:
        """read(host) for every host side by side, for an answer about all of them (the domain
        list, a scrape). None for a host whose read failed, or that has not answered within
        EACH_HOST_S: a frozen daemon that keepalive has not yet given up delays the others by
        that much at most, and its read goes on unheard."""
        tasks = {host: asyncio.ensure_future(read(host)) for host in self}
        limit, _budget = deadline.within(EACH_HOST_S)  # and not past the request's time
        _done, late = await asyncio.wait(tasks.values(), timeout=limit)
        answers: list[tuple[Host, T | None]] = []
        for host, task in tasks.items():
            if task in late:
                log.warning("%s: host %s did not answer within %g s; left out", what,
                            host.name, limit)
                self._unheard.add(task)
                task.add_done_callback(self._forget)
                answers.append((host, None))
            elif isinstance(error := task.exception(), ApiError):
                log.warning("%s: host %s: %s", what, host.name, error.detail)
                answers.append((host, None))
            elif error is not None:
                raise error
            else:
                answers.append((host, task.result()))
        return answers

    def _forget(self, task: asyncio.Future[Any]) -> None:
        self._unheard.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" at exit

    def snapshot(self) -> tuple[bool, list[dict[str, str]]]:
        domains = []
        for host in self:
            domains.extend(host.snapshot()[1])
        domains.sort(key=lambda d: (d["name"], d["host"]))
        return all(host.connected for host in self), domains

    def connection_states(self) -> list[dict[str, Any]]:
        return [{"name": host.name, "connected": host.connected} for host in self]

    async def open(self) -> None:
        """One host: connect or fail, as webvirt always did. Several: each connects on its
        own; one that cannot is retried in the background while the others are served."""
        if not self.several:
            await self.default.open()
            return
        attempts = [host.open_in_background() for host in self]
        await asyncio.wait(attempts, timeout=STARTUP_WAIT_S)
        for host in self:
            if not host.connected:
                host.announce_when_connected()
                log.warning("host %s (%s) is not connected yet; serving the others",
                            host.name, host.display_uri)

    async def close(self) -> None:
        await asyncio.gather(*(host.close() for host in self))
