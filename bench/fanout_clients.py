"""Event fan-out clients: N WebSockets in one process, each timing every lifecycle event (or
`stats` message, with a fifth argument `stats`) from the server's publish time (the libvirt
callback) to its own receipt. Prints JSON lines.
With --resume: N WebSockets that resume at once from an id and time getting what they missed.

Raw sockets on epoll with minimal frame parsing, timestamped at recv(): one Python process
playing 1000 browsers must not itself be the bottleneck it measures.
"""

from __future__ import annotations

import base64
import json
import os
import re
import resource
import selectors
import socket
import sys
import time

TIME = re.compile(rb'"time": ([0-9.]+)')
OPCODE_TEXT, OPCODE_CLOSE, OPCODE_PING = 0x1, 0x8, 0x9


class Connection:
    def __init__(self, host: str, port: int, path: str):
        self.sock = socket.create_connection((host, port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(head.decode(errors="replace"))
        self.buffer = bytearray(rest)
        self.snapshot = False
        self.events = 0
        self.closed = False
        self.sock.setblocking(False)

    def frames(self) -> list[tuple[int, bytes]]:
        frames, buffer = [], self.buffer
        while len(buffer) >= 2:
            length, start = buffer[1] & 0x7F, 2
            if length == 126:
                if len(buffer) < 4:
                    break
                length, start = int.from_bytes(buffer[2:4], "big"), 4
            elif length == 127:
                if len(buffer) < 10:
                    break
                length, start = int.from_bytes(buffer[2:10], "big"), 10
            if len(buffer) < start + length:
                break
            frames.append((buffer[0] & 0x0F, bytes(buffer[start:start + length])))
            del buffer[:start + length]
        return frames

    def pong(self, payload: bytes) -> None:
        # Client frames are masked; an all-zero mask leaves the payload as it is.
        self.sock.send(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)


def main(url: str, clients: int, expected: int, seconds: float, kind: str = "lifecycle") -> None:
    # Stats come on a clock: a client that connected early counts only its first `expected`.
    marker, capped = f'"type": "{kind}"'.encode(), kind == "stats"
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    hostport, _, path = url.removeprefix("ws://").partition("/")
    host, _, port = hostport.partition(":")
    selector = selectors.EpollSelector()
    connections = [Connection(host, int(port), "/" + path) for _ in range(clients)]
    for connection in connections:
        selector.register(connection.sock, selectors.EVENT_READ, connection)
    delays: list[float] = []
    announced = False
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for key, _mask in selector.select(timeout=0.5):
            connection: Connection = key.data
            try:
                chunk = connection.sock.recv(65536)
            except BlockingIOError:
                continue
            now = time.time()
            if not chunk:
                connection.closed = True
                selector.unregister(connection.sock)
                continue
            connection.buffer += chunk
            for opcode, payload in connection.frames():
                if opcode == OPCODE_PING:
                    connection.pong(payload)
                elif opcode == OPCODE_CLOSE:
                    connection.closed = True
                elif opcode == OPCODE_TEXT and not connection.snapshot:
                    connection.snapshot = True
                elif opcode == OPCODE_TEXT and marker in payload and not (
                        capped and connection.events >= expected):
                    delays.append(now - float(TIME.search(payload).group(1)))
                    connection.events += 1
        if not announced and all(c.snapshot for c in connections):
            announced = True
            print(json.dumps({"ready": clients}), flush=True)  # the coordinator may start
        if all(c.events >= expected or c.closed for c in connections):
            break
    complete = sum(1 for c in connections if c.events == expected and not c.closed)
    print(json.dumps({"complete_clients": complete, "delays": delays}), flush=True)
    for connection in connections:
        connection.sock.close()


def resume(url: str, clients: int, missed: int, seconds: float) -> None:
    """Seconds until every client has connected and received the `missed` events it asks
    for (the URL carries last_event_id); the first message must not be a snapshot."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    hostport, _, path = url.removeprefix("ws://").partition("/")
    host, _, port = hostport.partition(":")
    selector = selectors.EpollSelector()
    started = time.monotonic()
    connections = []
    for _ in range(clients):
        connection = Connection(host, int(port), "/" + path)
        selector.register(connection.sock, selectors.EVENT_READ, connection)
        connections.append(connection)
    resynced = 0
    deadline = started + seconds
    while time.monotonic() < deadline and not all(c.events >= missed for c in connections):
        for key, _mask in selector.select(timeout=0.5):
            connection = key.data
            try:
                chunk = connection.sock.recv(1 << 20)
            except BlockingIOError:
                continue
            connection.buffer += chunk
            for opcode, payload in connection.frames():
                if opcode == OPCODE_PING:
                    connection.pong(payload)
                elif opcode == OPCODE_TEXT and b'"type": "snapshot"' in payload:
                    resynced += 1
                elif opcode == OPCODE_TEXT:
                    connection.events += 1
    elapsed = time.monotonic() - started
    complete = sum(1 for c in connections if c.events == missed)
    print(json.dumps({"seconds": elapsed, "complete_clients": complete, "resynced": resynced}),
          flush=True)
    for connection in connections:
        connection.sock.close()


if __name__ == "__main__":
    if sys.argv[1] == "--resume":
        resume(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
    else:
        main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), *sys.argv[5:])
