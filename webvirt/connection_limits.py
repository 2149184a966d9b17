"""What one client can hold on to: connections, file descriptors, header bytes and time.

With aiohttp's defaults alone, 300 connections that send half a request head (slowloris) used
up a limit of 256 open files and locked every other client out, and 200 unfinished requests
with 1 MB of headers each took about 400 MiB.
"""

from __future__ import annotations

import asyncio
import logging
import re
import resource
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_PER_CLIENT = 64
# For aiohttp's RequestHandler. Its keep-alive timer starts when a connection opens and again
# after each response, and closes the connection if no complete request head has arrived by
# then: it is also the header read timeout (aiohttp's default is an hour).
HEADER_TIMEOUT = 15.0
HTTP_LIMITS: dict[str, Any] = {
    "keepalive_timeout": HEADER_TIMEOUT,
    # aiohttp's defaults, stated: one request line, one header line (cookies can be large),
    # and how many headers. Together they still allow 1 MB of headers per request.
    "max_line_size": 8190,
    "max_field_size": 8190,
    "max_headers": 128,
}
# What bounds the head of one request in total: aiohttp keeps an unfinished head (twice over,
# as bytes and text) until it is complete. Browsers send 1-8 KiB.
MAX_HEAD_BYTES = 64 * 1024
# A client that keeps opening connections over its limit (or sending heads that are too large)
# is named in the log once per this many seconds.
WARN_INTERVAL = 60.0
BLANK_LINE = b"\r\n\r\n"
HEAD_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n"
                  b"Connection: close\r\n\r\n")
# What bounds one request's body (aiohttp's client_max_size: 413 beyond). A rule is a few
# hundred bytes.
MAX_BODY_BYTES = 64 * 1024
# A head's body, as its Content-Length says. A chunked body is counted as if it were a head
# (431 beyond MAX_HEAD_BYTES, where aiohttp would answer 413 anyway): its last chunk ends in a
# blank line, where counting starts afresh. Skipped unseen, it let a client send heads as
# large as it liked.
_BODY = re.compile(rb"\r\ncontent-length[ \t]*:[ \t]*(\d{1,18})", re.IGNORECASE)


def raise_open_file_limit() -> None:
    """Raise the soft limit on open files to the hard limit: each connection is one, and the
    usual soft limit of 1024 is far below what the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return  # Linux does not allow it as a soft limit; keep what there is
    if soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class ClientGate:
    """A protocol factory for loop.create_server: admits at most `per_client` open connections
    from one IP address (None: no limit), closing the others at once, and closes a connection
    whose request head grows over MAX_HEAD_BYTES, before aiohttp holds it."""

    def __init__(self, protocol_factory: Callable[[], asyncio.Protocol],
                 per_client: int | None) -> None:
        self.protocol_factory = protocol_factory
        self._per_client = per_client
        self._open: dict[str, int] = {}
        self.refusals = RateLimitedWarning(
            "refused %d connection(s) from %s: it already has " f"{per_client} open "
            "(--max-connections-per-client)")
        self.oversized = RateLimitedWarning(
            "closed %d connection(s) from %s: request head over " f"{MAX_HEAD_BYTES} bytes")

    def __call__(self) -> asyncio.Protocol:
        return _GatedProtocol(self)

    def admit(self, client: str) -> bool:
        count = self._open.get(client, 0)
        if self._per_client is not None and count >= self._per_client:
            self.refusals.warn(client)
            return False
        self._open[client] = count + 1
        return True

    def release(self, client: str) -> None:
        count = self._open.pop(client) - 1
        if count:
            self._open[client] = count


class RateLimitedWarning:
    """A warning about a client, logged at most once per WARN_INTERVAL for each client, with
    how many times it happened: a client doing it thousands of times a second must not flood
    the log."""

    def __init__(self, message: str) -> None:
        self._message = message  # arguments: the count, the client
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def warn(self, client: str) -> None:
        self._count[client] = self._count.get(client, 0) + 1
        now = time.monotonic()
        if now - self._last.get(client, now - WARN_INTERVAL) < WARN_INTERVAL:
            return
        if len(self._last) > 1000:  # forget clients not seen for a while
            for old in [c for c, when in self._last.items() if now - when > WARN_INTERVAL]:
                del self._last[old]
                self._count.pop(old, None)
        self._last[client] = now
        log.warning(self._message, self._count.pop(client), client)


class _HeadBytes:
    """How many bytes of a request head a connection has sent: those since the end of the
    previous request, its body left out (what the head's Content-Length says; aiohttp bounds
    bodies, MAX_BODY_BYTES). Counting starts afresh every HEADER_TIMEOUT, so that a WebSocket's
    small frames never add up."""

    __slots__ = ("body_left", "head", "since")

    def __init__(self) -> None:
        self.body_left = 0  # bytes of the current request's body still to come
        self.head = bytearray()  # the head so far (bounded: MAX_HEAD_BYTES closes it)
        self.since = time.monotonic()

    def add(self, data: bytes) -> int:
        """The bytes of an unfinished head once `data` has come."""
        if not self.head and not self.body_left and data.endswith(BLANK_LINE) \
                and data.find(BLANK_LINE) == len(data) - len(BLANK_LINE) \
                and _BODY.search(data) is None:
            # Nearly every request: a whole head without a body, alone in one read.
            self.since = time.monotonic()
            return 0
        if time.monotonic() - self.since > HEADER_TIMEOUT:
            self.head.clear()
            self.since = time.monotonic()
        while data:
            if self.body_left:
                taken = min(self.body_left, len(data))
                self.body_left -= taken
                data = data[taken:]
                continue
            # The blank line may straddle two reads: look from the head's last three bytes.
            start = max(0, len(self.head) - 3)
            self.head += data
            end = self.head.find(BLANK_LINE, start)
            if end < 0:
                break
            end += len(BLANK_LINE)
            data = bytes(self.head[end:])
            match = _BODY.search(self.head, 0, end)
            self.body_left = 0 if match is None else int(match.group(1))
            self.head.clear()
            self.since = time.monotonic()
        return len(self.head)


class _GatedProtocol(asyncio.Protocol):
    """Stands between the transport and aiohttp's protocol, which gets the connection only if
    the client is admitted, and the data only while the head is within bounds."""

    def __init__(self, gate: ClientGate) -> None:
        self._gate = gate
        self._client = ""
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._head = _HeadBytes()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        peer = transport.get_extra_info("peername")
        self._client = peer[0] if isinstance(peer, tuple) else str(peer)
        if not self._gate.admit(self._client):
            transport.abort()
            return
        self._transport = transport
        self._inner = self._gate.protocol_factory()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            self._gate.release(self._client)
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is None or self._transport is None or self._transport.is_closing():
            return
        if self._head.add(data) > MAX_HEAD_BYTES:
            self._gate.oversized.warn(self._client)
            self._transport.write(HEAD_TOO_LARGE)
            self._transport.close()
            return
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()
