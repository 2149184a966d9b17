"""libvirt's event loop on asyncio, safe when libvirt changes watches from worker threads.

libvirtaio assumes every add/update/remove of a handle or timer comes from the loop's own
thread. It does not: a worker thread inside a libvirt call arms the keepalive timer and the
event-dispatch timer, and (un)watches the socket. Done from another thread, asyncio is not
woken (a frozen daemon went unnoticed on an idle server; events waited for the next wake-up)
and its selector is changed unsafely. Here the bookkeeping stays synchronous, as libvirt
expects, while every change to the asyncio loop itself happens on the loop thread.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from typing import Any

import libvirt
import libvirtaio


class ThreadSafeImpl(libvirtaio.virEventAsyncIOImpl):
    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__(loop)
        self._loop_thread = threading.get_ident()
        self.descriptors = _Descriptors(self)

    def on_loop_thread(self) -> bool:
        return threading.get_ident() == self._loop_thread

    def on_loop(self, fn: Callable[[], Any]) -> None:
        """Run fn now on the loop thread, or soon from any other thread (and wake the loop)."""
        if self.loop.is_closed():
            return  # at exit, libvirt objects freed late: nothing left to watch or free
        if self.on_loop_thread():
            fn()
        else:
            try:
                self.loop.call_soon_threadsafe(fn)
            except RuntimeError:  # the loop is closed: nothing left to watch
                pass

    def schedule_ff_callback(self, iden: int, opaque: Any) -> None:
        self.on_loop(lambda: super(ThreadSafeImpl, self).schedule_ff_callback(iden, opaque))

    def _add_timeout(self, timeout: int, cb: Any, opaque: Any) -> int:
        callback = _Timer(self, cb, opaque)
        self.callbacks[callback.iden] = callback
        callback.update(timeout=timeout)
        self._pending_inc()
        return int(callback.iden)


class _Descriptor(libvirtaio.Descriptor):
    """One fd libvirt watches. asyncio watches a duplicate of it, closed on the loop thread
    once libvirt no longer wants it: libvirt closes its own fd on whichever thread drops the
    connection, and a number reused before the loop caught up would otherwise leave asyncio
    with a stale watch (a new socket never watched, or another's watch removed).

    Every libvirt call unwatches its connection's socket and watches it again: from a worker
    thread, the loop is woken once for both, and asyncio's watch changes only when the result
    differs."""

    impl: ThreadSafeImpl

    def __init__(self, impl: ThreadSafeImpl, fd: int):
        super().__init__(impl, fd)
        self._lock = threading.Lock()
        self._scheduled = False
        self._applied = 0
        self._gone = False
        self._watched = os.dup(fd)  # while libvirt's fd is still open: added on its thread

    def update(self) -> None:
        if self.impl.on_loop_thread():
            self.impl.on_loop(self._apply)  # now, unless the loop is closed: nothing to watch
            return
        with self._lock:
            if self._scheduled:
                return  # the pending apply reads the callbacks as they are by then
            self._scheduled = True
        self.impl.on_loop(self._apply)

    def drop(self) -> None:
        """libvirt removed its last watch of the fd (and may close it at once)."""
        self._gone = True
        if self.impl.loop.is_closed():  # nothing watches it any more: only close it
            self._close()
        else:
            self.update()

    def _close(self) -> None:
        with self._lock:
            watched, self._watched = self._watched, -1
        if watched >= 0:
            os.close(watched)

    def _apply(self) -> None:
        with self._lock:
            self._scheduled = False
            if self._watched < 0:
                return
            # Read once: drop() may come from a worker thread at any moment, and then asks
            # for an apply of its own. Read twice, a drop between the reads closed the
            # duplicate with asyncio still watching it: the next file on that number could
            # not be watched (epoll ENOENT), an HTTP connection on it never read.
            gone = self._gone
        wanted = 0
        if not gone:
            # A copy: worker threads add and remove this descriptor's callbacks meanwhile.
            for callback in list(self.callbacks.values()):
                wanted |= callback.event or 0
        if wanted != self._applied:
            self._watch(wanted)
        if gone:
            self._close()

    def _watch(self, wanted: int) -> None:
        loop, fd = self.impl.loop, self._watched
        self._applied = 0  # until asyncio has taken each change
        if wanted & libvirt.VIR_EVENT_HANDLE_READABLE:
            loop.add_reader(fd, self._handle, libvirt.VIR_EVENT_HANDLE_READABLE)
        else:
            loop.remove_reader(fd)
        if wanted & libvirt.VIR_EVENT_HANDLE_WRITABLE:
            loop.add_writer(fd, self._handle, libvirt.VIR_EVENT_HANDLE_WRITABLE)
        else:
            loop.remove_writer(fd)
        self._applied = wanted


class _Descriptors(libvirtaio.DescriptorDict):
    impl: ThreadSafeImpl

    def __missing__(self, fd: int) -> _Descriptor:
        descriptor = _Descriptor(self.impl, fd)
        self[fd] = descriptor
        return descriptor

    def __delitem__(self, fd: int) -> None:
        descriptor = self[fd]
        super().__delitem__(fd)
        descriptor.drop()


class _Timer(libvirtaio.TimeoutCallback):
    """libvirt re-arms a connection's keepalive timer at every message: the loop is woken
    only when the timer is to start or stop."""

    impl: ThreadSafeImpl
    _task: asyncio.Future[None] | None

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self._scheduled = False

    def update(self, timeout: int) -> None:
        if self.impl.on_loop_thread():
            self.timeout = timeout
            self.impl.on_loop(self._apply)  # now, unless the loop is closed: nothing to time
            return
        with self._lock:
            self.timeout = timeout
            # The running timer reads the new timeout itself, as libvirtaio's does.
            if self._scheduled or (self._task is not None) == (timeout >= 0):
                return
            self._scheduled = True
        self.impl.on_loop(self._apply)

    def _apply(self) -> None:
        # Reads the latest timeout, so updates applied late or out of turn still end right.
        with self._lock:
            self._scheduled = False
            if self.timeout >= 0 and self._task is None:
                self._task = asyncio.ensure_future(self._timer(), loop=self.impl.loop)
            elif self.timeout < 0 and self._task is not None:
                self._task.cancel()
                self._task = None


def ensure_event_impl() -> None:
    """Join libvirt's event loop to the running asyncio loop (libvirt allows one per process)."""
    loop = asyncio.get_running_loop()
    impl = libvirtaio.getCurrentImpl()
    if impl is None:
        libvirtaio._current_impl = ThreadSafeImpl(loop).register()
    elif impl.loop is not loop:
        raise RuntimeError(
            "libvirt's event loop is already bound to another asyncio loop; "
            "libvirt allows one event loop implementation per process"
        )


# libvirt prints every error to stderr unless a handler is set; webvirt reports errors itself.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
