"""One libvirt connection and the one thread that makes every call on it.

libvirt 9.0's client (Debian 12) has a use-after-free (CVE-2024-4418, fixed in 10.3): when
keepalive closes a connection while two or more threads are inside calls on it, the process
crashes. So a connection is never shared between threads: its own thread opens it, makes its
calls one after the other, and closes it. For concurrency, a host holds several connections.

A connection that fails, times out, or is closed by libvirt is retired: it takes no new calls,
its owner is told once, and its thread closes it after whatever call it is stuck in returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import libvirt

from webvirt import deadline
from webvirt.errors import CallTimeout, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

# Remote connections ping the daemon, so a dead or frozen daemon is noticed within seconds.
KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_COUNT = 3

_Job = tuple[Future[Any], Callable[[], Any]]


@dataclass(eq=False, frozen=True, slots=True)
class _Call(Generic[T]):
    job: Future[T]  # done by the connection's thread
    answer: asyncio.Future[T]  # what the caller awaits, on the loop


class Connection:
    __slots__ = ("_calls", "_conn", "_jobs", "_loop", "_on_retired", "_thread", "callback_ids",
                 "ended", "name", "pending", "retired", "uri")

    def __init__(self, uri: str | None, name: str,
                 on_retired: Callable[[Connection, str], None]):
        self.uri = uri
        self.name = name
        self._on_retired = on_retired
        self._loop = asyncio.get_running_loop()
        self._conn: libvirt.virConnect | None = None
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"libvirt-{name}")
        self.ended: asyncio.Future[None] = self._loop.create_future()  # its thread is done
        self.pending = 0  # calls queued or running, to spread work over a host's connections
        self._calls: set[_Call[Any]] = set()  # the same, as their callers wait for them
        self.retired = False
        # Event callbacks registered on this connection, deregistered before it closes:
        # each holds a reference that would otherwise keep the connection (and an fd) alive.
        self.callback_ids: list[tuple[str, int]] = []

    async def open(self, seconds: float | None) -> str:
        """Open the connection on its thread; answers the URI libvirt resolved."""
        self._thread.start()
        try:
            return await self._await(self._open_blocking, seconds)
        except libvirt.libvirtError as err:
            self.retire("could not open")
            raise Unavailable(f"cannot connect to libvirt at {self.uri or 'the default URI'}: "
                              f"{err.get_error_message()}") from None

    def _open_blocking(self) -> str:
        self._conn = conn = libvirt.open(self.uri)
        with contextlib.suppress(libvirt.libvirtError):
            # Only remote connections support keepalive; local drivers refuse it.
            conn.setKeepAlive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT)
        loop, retire = self._loop, self.retire
        # libvirt runs this on the loop thread, or on this connection's thread while a call
        # is in flight: only hop to the loop (it holds the connection's lock meanwhile).
        conn.registerCloseCallback(
            lambda _c, reason, _o: _call_soon(loop, retire, close_reason(reason)), None)
        try:
            return str(conn.getURI())
        except libvirt.libvirtError:
            return "?"

    async def call(self, fn: Callable[[libvirt.virConnect], T], seconds: float | None) -> T:
        """Run fn(conn) on this connection's thread. A timeout retires the connection."""
        if self.retired or self._conn is None:
            raise Unavailable("the libvirt connection is gone; reconnecting")
        conn = self._conn
        return await self._await(lambda: fn(conn), seconds)

    def _submit(self, fn: Callable[[], T]) -> _Call[T]:
        job: Future[T] = Future()
        call = _Call(job, self._loop.create_future())
        self.pending += 1
        self._calls.add(call)
        job.add_done_callback(lambda _job: _call_soon(self._loop, self._answered, call))
        self._jobs.put((job, fn))
        return call

    def _answered(self, call: _Call[Any]) -> None:
        self.pending -= 1
        self._calls.discard(call)
        if call.answer.done() or call.job.cancelled():
            return  # told already (retired), or nobody waits any more (timed out)
        error = call.job.exception()
        if error is not None:
            call.answer.set_exception(error)
        else:
            call.answer.set_result(call.job.result())

    async def _await(self, fn: Callable[[], T], seconds: float | None) -> T:
        limit, budget = deadline.within(seconds)
        if limit is not None and limit <= 0 and budget is not None:
            raise CallTimeout(f"no time was left for libvirt in this request ({budget.seconds:g} "
                              "s in all, --call-timeout); the call was not made")
        call = self._submit(fn)
        try:
            async with asyncio.timeout(limit) as timeout:
                return await call.answer
        except TimeoutError:
            if not timeout.expired():
                raise  # the call's own (a socket's timeout in libvirt's Python code)
            call.job.cancel()
            outcome = not_made_or_may_complete(call)
            if budget is None:
                # The thread is stuck (in this call or one before it): nothing more may
                # queue behind it.
                self.retire(f"no answer within {seconds:g} s")
                raise CallTimeout(f"libvirt did not answer within {seconds:g} s (is the daemon "
                                  f"stuck?); {outcome}") from None
            raise CallTimeout(f"libvirt did not answer in the time this request has "
                              f"({budget.seconds:g} s in all, --call-timeout); {outcome}"
                              ) from None
        except asyncio.CancelledError:
            call.job.cancel()  # whoever cancels the caller (the sweep, a stop): not made
            raise

    def retire(self, reason: str, abandon: bool = False) -> None:
        """No new calls; the owner is told once; the thread closes the connection and ends.
        Calls not begun are not made (their callers are told now); with `abandon`, the callers
        of the call under way are told too, without waiting for it (webvirt stops)."""
        if not self.retired:
            self.retired = True
            self._on_retired(self, reason)
            self._jobs.put((Future(), self._close_blocking))
            self._jobs.put(None)
        for call in list(self._calls):
            if call.answer.done() or not (call.job.cancel() or abandon):
                continue
            call.answer.set_exception(Unavailable(
                f"the libvirt connection was closed ({reason}); {not_made_or_may_complete(call)}"))

    def _close_blocking(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        for kind, callback_id in self.callback_ids:
            with contextlib.suppress(libvirt.libvirtError):
                if kind == "domain":
                    conn.domainEventDeregisterAny(callback_id)
                else:
                    conn.nodeDeviceEventDeregisterAny(callback_id)
        self.callback_ids.clear()
        # While the close callback is registered, close() returns 1 and closes nothing.
        with contextlib.suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn = job
            del job  # hold no libvirt object longer than the call
            if future.set_running_or_notify_cancel():
                try:
                    result = fn()
                except BaseException as exc:  # the caller gets it, whatever it is
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del future, fn
        self._close_blocking()  # a no-op unless the loop ended without a retire
        _call_soon(self._loop, self._ended)

    def _ended(self) -> None:
        if not self.ended.done():
            self.ended.set_result(None)


def not_made_or_may_complete(call: _Call[Any]) -> str:
    """What became of a call its caller stops waiting for (cancel it first, if not begun)."""
    return "the call was not made" if call.job.cancelled() else "the call may still complete"


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is already closed
        loop.call_soon_threadsafe(fn, *args)


def close_reason(reason: int) -> str:
    return {
        libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "connection error",
        libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "daemon closed the connection",
        libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "daemon stopped answering keepalives",
        libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by client",
    }.get(reason, f"reason {reason}")
