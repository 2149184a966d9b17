"""aiomqtt's Client, whose socket watches cannot outlive paho's socket.

aiomqtt (2.5) asks the event loop to watch paho's socket through call_soon_threadsafe, even on
the loop thread, and stops watching it at once. A watch asked for just before the socket
closed (a publish as the broker went away) was added after the close, on a number the process
may have reused meanwhile (a libvirt socket's duplicate, a client's connection). asyncio then
held a watch of a file that was not its own; once that file closed, the next socket on the
number could never be watched (epoll: FileNotFoundError): an HTTP connection that was never
read (a request that never answered), or an MQTT connection that never received. Here a watch
is added only if, when it runs, paho's open socket is still the one on that number.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import aiomqtt
import paho.mqtt.client as paho


class Client(aiomqtt.Client):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loop = cast(asyncio.AbstractEventLoop, _CheckedWatches(self._loop, self._client))


class _CheckedWatches:
    """The event loop as aiomqtt sees it: the same, but for watches asked for later."""

    __slots__ = ("_loop", "_paho")

    def __init__(self, loop: asyncio.AbstractEventLoop, client: paho.Client) -> None:
        self._loop = loop
        self._paho = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)

    def call_soon_threadsafe(self, callback: Callable[..., object], *args: Any,
                             context: Any = None) -> asyncio.Handle:
        if callback == self._loop.add_reader or callback == self._loop.add_writer:
            return self._loop.call_soon_threadsafe(self._watch, callback, *args,
                                                   context=context)
        return self._loop.call_soon_threadsafe(callback, *args, context=context)

    def _watch(self, add: Callable[..., None], fd: int, *args: Any) -> None:
        sock = self._paho.socket()
        if sock is not None and sock.fileno() == fd:
            add(fd, *args)
