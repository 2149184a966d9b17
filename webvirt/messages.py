"""A message to event clients, serialized once, and the signals that end a stream."""

from __future__ import annotations

import enum
import struct


class Signal(enum.Enum):
    END = "end"  # the server is shutting down
    LAGGING = "lagging"  # the client fell behind and is dropped


class Outgoing:
    """One message as sent: serialized once, its WebSocket frame built once, on first use."""

    __slots__ = ("_frame", "text")

    def __init__(self, text: str):
        self.text = text
        self._frame: bytes | None = None

    @property
    def websocket_frame(self) -> bytes:
        if self._frame is None:
            self._frame = websocket_text_frame(self.text.encode())
        return self._frame


def websocket_text_frame(payload: bytes) -> bytes:
    """A single unmasked, uncompressed text frame, as a server sends it (RFC 6455, 5.2)."""
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x81, length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, length)
    else:
        header = struct.pack("!BBQ", 0x81, 127, length)
    return header + payload
