"""The domain-state cache's ordering rules, without libvirt."""

from __future__ import annotations

import asyncio

from webvirt.domain_cache import DomainCache, DomainEntry, Read

UUID_A = "6b1e5c2a-0000-4000-8000-00000000000a"
UUID_B = "6b1e5c2a-0000-4000-8000-00000000000b"


def test_a_read_older_than_an_event_is_not_applied() -> None:
    cache = DomainCache()
    cache.apply_event(UUID_A, "win11", "shutoff")
    began = cache.clock
    cache.apply_event(UUID_A, "win11", "running")  # arrives while the read is under way
    assert cache.apply_read(Read(UUID_A, "win11", "shutoff"), began) is None
    assert cache.get("win11") == DomainEntry(UUID_A, "win11", "running")


def test_a_read_with_no_event_since_is_applied() -> None:
    cache = DomainCache()
    cache.apply_event(UUID_A, "win11", "running")
    change = cache.apply_read(Read(UUID_A, "win11", "paused"), cache.clock)
    assert change == (DomainEntry(UUID_A, "win11", "running"),
                      DomainEntry(UUID_A, "win11", "paused"))


def test_lookup_by_name_or_uuid_in_any_case() -> None:
    cache = DomainCache()
    cache.apply_event(UUID_A, "win11", "running")
    assert cache.get("win11") is cache.get(UUID_A) is cache.get(UUID_A.upper())
    assert cache.get("linux") is None


def test_a_full_read_drops_what_libvirt_no_longer_lists_unless_newer() -> None:
    cache = DomainCache()
    cache.apply_event(UUID_A, "ghost", "shutoff")
    began = cache.clock
    cache.apply_event(UUID_B, "fresh", "running")  # defined while the listing ran
    changes = cache.apply_full_read([], began)
    assert changes == [(DomainEntry(UUID_A, "ghost", "shutoff"), None)]
    assert [e.name for e in cache] == ["fresh"]


def test_a_read_begun_before_a_removal_does_not_bring_the_domain_back() -> None:
    cache = DomainCache()
    cache.apply_event(UUID_A, "gone", "shutoff")
    began = cache.clock
    cache.apply_event(UUID_A, "gone", None)  # undefined while the read ran
    assert cache.apply_full_read([Read(UUID_A, "gone", "shutoff")], began) == []
    assert len(cache) == 0


async def test_waiting_for_a_state_now_or_later() -> None:
    cache = DomainCache()
    cache.apply_event(UUID_A, "win11", "running")
    assert cache.wait_for(UUID_A, lambda s: s == "running").done()
    off = cache.wait_for(UUID_A, lambda s: s in (None, "shutoff"))
    assert not off.done()
    cache.apply_read(Read(UUID_A, "win11", "shutoff"), cache.clock)  # a read, not an event
    await asyncio.wait_for(off, 1)
