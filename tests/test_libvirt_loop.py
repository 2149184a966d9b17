"""libvirt's event loop on asyncio (webvirt/libvirt_loop.py), with a real libvirtd."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import libvirt
import libvirtaio
import pytest

from tests.libvirt_daemon import LibvirtDaemon
from tests.waiting import until
from webvirt.libvirt_loop import ThreadSafeImpl, ensure_event_impl

READABLE = libvirt.VIR_EVENT_HANDLE_READABLE
CALLS = 100


def watched(loop: asyncio.AbstractEventLoop, fd: int) -> int:
    """What asyncio's selector watches fd for, as libvirt's event bits (private: selectors)."""
    selector = loop._selector  # type: ignore[attr-defined]
    if fd not in selector.get_map():
        return 0
    reader, writer = selector.get_key(fd).data
    return (READABLE if reader else 0) | (libvirt.VIR_EVENT_HANDLE_WRITABLE if writer else 0)


def watches_settled(impl: ThreadSafeImpl) -> bool:
    """Each fd is watched by the asyncio loop as libvirt last asked (through its duplicate)."""
    for descriptor in list(impl.descriptors.values()):
        wanted = 0
        for callback in list(descriptor.callbacks.values()):
            wanted |= callback.event or 0
        if watched(impl.loop, getattr(descriptor, "_watched", descriptor.fd)) != wanted:
            return False
    return True


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_socket_on_a_reused_fd_number_is_watched(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """libvirt closes a connection's socket on whichever thread drops it, before the loop has
    unwatched it; a socket opened meanwhile can get the same number. asyncio, still holding
    the old watch, took the new one's for a change of nothing and never watched it: that
    connection's replies and events went unread."""
    impl = ThreadSafeImpl(asyncio.get_running_loop())
    monkeypatch.setattr(impl, "schedule_ff_callback", lambda iden, opaque: None)
    fds_before = open_fds()
    old, old_peer = socket.socketpair()
    fd = old.fileno()
    watch = await asyncio.to_thread(impl._add_handle, fd, READABLE, lambda *_: None, None)
    await until(lambda: watches_settled(impl), 5, "the first socket watched")
    heard = threading.Event()
    loop_busy = threading.Event()
    asyncio.get_running_loop().call_soon(loop_busy.wait, 10)  # the loop lags behind

    def drop_and_reopen() -> tuple[socket.socket, socket.socket]:
        impl._remove_handle(watch)
        old.close()
        old_peer.close()
        new, peer = socket.socketpair()
        if new.fileno() != fd:  # make sure the number is reused
            os.dup2(new.fileno(), fd)
            new.close()
            new = socket.socket(fileno=fd)
        impl._add_handle(fd, READABLE, lambda *_: heard.set(), None)
        loop_busy.set()
        return new, peer

    new, peer = await asyncio.to_thread(drop_and_reopen)
    try:
        peer.send(b"x")
        await until(heard.is_set, 5, "the new socket's reply noticed")
    finally:
        for watch_id in list(impl.callbacks):
            impl._remove_handle(watch_id)
        new.close()
        peer.close()
    await until(lambda: open_fds() == fds_before, 5, "every duplicate closed")


@pytest.mark.qemu
async def test_a_call_wakes_the_event_loop_at_most_twice(
        libvirt_daemon: LibvirtDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """A libvirt call unwatches its connection's socket and watches it again, and libvirt
    re-arms the keepalive timer at each message. Applied one change at a time, these woke the
    event loop five times a call, wake-ups that competed with the calls for the GIL (/metrics
    with 50 running guests: 98 ms, 94 without). The loop still ends up watching the socket."""
    ensure_event_impl()
    impl = libvirtaio.getCurrentImpl()
    assert isinstance(impl, ThreadSafeImpl)
    loop_thread = threading.get_ident()
    counting = threading.Event()
    woken = [0]
    original = impl.on_loop

    def counted(fn: Callable[[], Any]) -> None:
        if counting.is_set() and threading.get_ident() != loop_thread:
            woken[0] += 1
        original(fn)

    monkeypatch.setattr(impl, "on_loop", counted)
    called, done = threading.Event(), threading.Event()

    def calls() -> None:
        conn = libvirt.open(libvirt_daemon.uri)
        try:
            conn.setKeepAlive(2, 3)
            counting.set()
            for _ in range(CALLS):
                conn.getLibVersion()
            counting.clear()
            called.set()
            done.wait(30)  # the connection stays open while its watch is checked
        finally:
            conn.close()

    thread = asyncio.create_task(asyncio.to_thread(calls))
    try:
        await until(called.is_set, 30, "the calls")
        assert 0 < woken[0] <= 2 * CALLS
        await until(lambda: watches_settled(impl), 5, "every socket watched as libvirt asked")
        assert any(d.callbacks for d in impl.descriptors.values())  # the open connection's
    finally:
        done.set()
        await thread


def test_a_watch_dropped_after_its_loop_closed_closes_its_duplicate() -> None:
    """At exit libvirt drops connections after the loop has closed: nothing is left to
    unwatch, and the duplicate, closed on the loop thread otherwise, kept the socket open
    (the daemon saw no end of the connection)."""
    fds_before = open_fds()
    loop = asyncio.new_event_loop()
    impl = ThreadSafeImpl(loop)
    mine, peer = socket.socketpair()
    watch = impl._add_handle(mine.fileno(), READABLE, lambda *_: None, None)
    loop.close()
    dropping = threading.Thread(target=impl._remove_handle, args=(watch,))
    dropping.start()
    dropping.join()
    mine.close()
    peer.settimeout(5)
    assert peer.recv(1) == b""  # the end of the connection, seen by the other side
    peer.close()
    assert open_fds() == fds_before


async def test_a_watch_dropped_while_the_loop_applies_it_is_removed_before_its_close(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """libvirt drops a connection's watch on its own thread whenever it likes, also while the
    loop applies the watch's latest change. The drop came between the loop's two looks at
    it: the duplicate was closed with asyncio still watching it, and the next file on that
    number could not be watched at all (epoll: ENOENT), an HTTP client's connection once."""
    loop = asyncio.get_running_loop()
    impl = ThreadSafeImpl(loop)
    monkeypatch.setattr(impl, "schedule_ff_callback", lambda iden, opaque: None)
    mine, peer = socket.socketpair()
    watch = await asyncio.to_thread(impl._add_handle, mine.fileno(), READABLE,
                                    lambda *_: None, None)
    await until(lambda: watches_settled(impl), 5, "the socket watched")
    descriptor = impl.descriptors[mine.fileno()]
    duplicate = descriptor._watched
    assert watched(loop, duplicate) == READABLE

    class DroppedAsItIsRead(type(descriptor.callbacks[watch])):  # type: ignore[misc]
        """Its watch is dropped, on another thread, as the loop reads what it wants."""

        @property
        def event(self) -> int:
            dropping = threading.Thread(target=impl._remove_handle, args=(watch,))
            dropping.start()
            dropping.join()
            type(self).event = None  # once: a plain attribute again
            return int(self.__dict__["event"])

        @event.setter
        def event(self, value: int) -> None:
            self.__dict__["event"] = value

    descriptor.callbacks[watch].__class__ = DroppedAsItIsRead
    await asyncio.to_thread(impl._update_handle, watch, READABLE)  # the loop applies it
    await until(lambda: descriptor._watched < 0, 5, "the duplicate closed")
    try:
        assert watched(loop, duplicate) == 0  # nothing watches the closed number
    finally:
        mine.close()
        peer.close()


def test_a_watch_added_on_the_thread_of_a_closed_loop_is_no_error() -> None:
    """After asyncio.run() has ended, a libvirt connection opened on the same thread (a
    script, the bench) added its watch and keepalive timer to the closed loop: an error
    printed for each."""
    loop = asyncio.new_event_loop()
    impl = ThreadSafeImpl(loop)
    loop.close()
    mine, peer = socket.socketpair()
    try:
        watch = impl._add_handle(mine.fileno(), READABLE, lambda *_: None, None)
        timer = impl._add_timeout(1000, lambda *_: None, None)
        impl._update_timeout(timer, 500)
        impl._remove_timeout(timer)
        impl._remove_handle(watch)
    finally:
        mine.close()
        peer.close()
