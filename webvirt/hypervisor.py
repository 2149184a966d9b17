"""The one shared libvirt connection: opening it, calling it off the event loop, reconnecting."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from typing import Protocol, TypeVar

import libvirt
import libvirtaio

from webvirt.errors import ApiError, CallTimeout, Unavailable, from_libvirt, is_connection_error
from webvirt.worker_threads import DaemonThreadPool

log = logging.getLogger(__name__)
T = TypeVar("T")

# libvirt prints every error to stderr unless a handler is set; we report errors ourselves.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

# Remote connections ping the daemon so a dead or frozen daemon is noticed within seconds.
KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_COUNT = 3
RECONNECT_DELAYS_S = (0.2, 0.5, 1, 2, 5)
SHUTDOWN_CALL_S = 2


class ConnectionListener(Protocol):
    async def connected(self, conn: libvirt.virConnect) -> None: ...

    def disconnected(self, reason: str) -> None: ...


def ensure_event_impl() -> None:
    """Join libvirt's event loop to the running asyncio loop (libvirt allows one per process)."""
    loop = asyncio.get_running_loop()
    impl = libvirtaio.getCurrentImpl()
    if impl is None:
        libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)
    elif impl.loop is not loop:
        raise RuntimeError(
            "libvirt's event loop is already bound to another asyncio loop; "
            "libvirt allows one event loop implementation per process"
        )


class Hypervisor:
    """Owns the libvirt connection; every blocking call goes through `call` on a worker thread."""

    def __init__(self, uri: str | None, *, call_timeout: float = 30.0, max_calls: int = 16):
        self.uri = uri
        self.call_timeout = call_timeout
        self._conn: libvirt.virConnect | None = None
        self.connected_uri = "?"  # the URI libvirt resolved, for logs and events
        self._listeners: list[ConnectionListener] = []
        self._executor = DaemonThreadPool(max_calls, "libvirt")
        # One slot per worker thread; a hung call keeps its slot, so hung calls cannot pile up
        # and later callers time out waiting for a slot instead.
        self._slots = asyncio.Semaphore(max_calls)
        self._reconnect_task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def display_uri(self) -> str:
        return self.uri or "libvirt's default URI"

    def add_listener(self, listener: ConnectionListener) -> None:
        self._listeners.append(listener)

    async def open(self) -> None:
        """Open the connection; raises Unavailable with libvirt's reason when it cannot."""
        ensure_event_impl()
        self._closing = False
        conn = await self._open_connection()
        await self._adopt(conn)
        log.info("connected to libvirt at %s", self.connected_uri)

    async def close(self) -> None:
        self._closing = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnect_task
        conn, self._conn = self._conn, None
        if conn is not None:
            for listener in self._listeners:
                listener.disconnected("server shutting down")
            # Short: at shutdown a stuck daemon is not worth waiting for.
            with contextlib.suppress(libvirt.libvirtError, CallTimeout):
                await self.run_blocking(partial(_release, conn), seconds=SHUTDOWN_CALL_S)
            del conn
        # Free libvirt objects still held in reference cycles now, while their handles can
        # still be released through the running loop, not at interpreter exit.
        gc.collect()
        await asyncio.sleep(0)
        self._executor.shutdown()

    async def call(
        self, fn: Callable[[libvirt.virConnect], T], seconds: float | None = None
    ) -> T:
        """Run fn(conn) on a worker thread; libvirt errors come back as ApiError."""
        conn = self._conn
        if conn is None:
            raise Unavailable(f"not connected to libvirt at {self.display_uri}; reconnecting")
        try:
            return await self.run_blocking(lambda: fn(conn), seconds=seconds)
        except libvirt.libvirtError as err:
            if is_connection_error(err):
                self._lost(conn, f"call failed: {err.get_error_message()}")
            error = from_libvirt(err)
        # Raised outside the except block: a chained libvirtError's traceback would keep
        # domain objects (and so the connection) alive in a reference cycle.
        raise error

    async def run_blocking(self, fn: Callable[[], T], *, seconds: float | None = None) -> T:
        timeout = self.call_timeout if seconds is None else seconds
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                await self._slots.acquire()
                try:
                    future: Future[T] = self._executor.submit(fn)
                except BaseException:
                    self._slots.release()
                    raise
                # The slot is freed when the thread returns, not when the caller gives up.
                future.add_done_callback(lambda _f: _call_soon(loop, self._slots.release))
                return await asyncio.wrap_future(future, loop=loop)
        except TimeoutError:
            raise CallTimeout(
                f"libvirt did not answer within {timeout:g} s (is the daemon stuck?)"
            ) from None

    async def _open_connection(self) -> libvirt.virConnect:
        try:
            conn, self.connected_uri = await self.run_blocking(self._connect_blocking)
        except libvirt.libvirtError as err:
            raise Unavailable(
                f"cannot connect to libvirt at {self.display_uri}: {err.get_error_message()}"
            ) from None
        return conn

    def _connect_blocking(self) -> tuple[libvirt.virConnect, str]:
        conn = libvirt.open(self.uri)
        with contextlib.suppress(libvirt.libvirtError):
            # Only remote connections support keepalive; local drivers refuse it.
            conn.setKeepAlive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT)
        return conn, conn_uri(conn)

    async def _adopt(self, conn: libvirt.virConnect) -> None:
        self._conn = conn
        # Registered from a thread like every libvirt call; libvirtaio then runs the callback
        # on the event loop thread.
        await self.run_blocking(lambda: conn.registerCloseCallback(
            lambda c, reason, _o: self._lost(c, close_reason(reason)), None))
        for listener in self._listeners:
            await listener.connected(conn)

    def _lost(self, conn: libvirt.virConnect, reason: str) -> None:
        if self._conn is not conn or self._closing:
            return
        log.warning("lost the libvirt connection (%s); reconnecting", reason)
        self._conn = None
        # No unregisterCloseCallback here: this may run inside that callback, which holds the
        # connection's lock (a deadlock). A stale connection's callback is ignored above.
        for listener in self._listeners:
            listener.disconnected(reason)
        # Closing may block on a dead socket, so it happens off the loop and is not awaited.
        self._executor.submit(partial(_close_quietly, conn))
        self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        attempt = 0
        while not self._closing:
            await asyncio.sleep(RECONNECT_DELAYS_S[min(attempt, len(RECONNECT_DELAYS_S) - 1)])
            attempt += 1
            try:
                conn = await self._open_connection()
            except ApiError as err:
                log.debug("reconnect attempt %d failed: %s", attempt, err.detail)
                continue
            if self._closing:
                with contextlib.suppress(CallTimeout):
                    await self.run_blocking(partial(_close_quietly, conn), seconds=SHUTDOWN_CALL_S)
                return
            try:
                await self._adopt(conn)
            except (ApiError, libvirt.libvirtError) as err:
                log.debug("reconnect attempt %d failed while setting up: %s", attempt, err)
                self._lost(conn, "failed while setting up")
                return  # _lost started a new reconnect task
            log.info("reconnected to libvirt at %s after %d attempt(s)", self.connected_uri,
                     attempt)
            return


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], object]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is already closed
        loop.call_soon_threadsafe(fn)


def _release(conn: libvirt.virConnect) -> None:
    with contextlib.suppress(libvirt.libvirtError):  # a broken connection is closed all the same
        conn.unregisterCloseCallback()
    conn.close()


def _close_quietly(conn: libvirt.virConnect) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()


def conn_uri(conn: libvirt.virConnect) -> str:
    try:
        return conn.getURI()
    except libvirt.libvirtError:
        return "?"


def close_reason(reason: int) -> str:
    return {
        libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "connection error",
        libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "daemon closed the connection",
        libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "daemon stopped answering keepalives",
        libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by client",
    }.get(reason, f"reason {reason}")
