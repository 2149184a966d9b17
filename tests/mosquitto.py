"""A real MQTT broker for the tests (Debian's mosquitto), and a subscriber that records what it
gets, to wait on."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import aiomqtt

from tests.processes import free_port
from tests.waiting import until, until_sync

MOSQUITTO = "/usr/sbin/mosquitto"


def _die_with_parent() -> None:
    """In the child: be killed when the test process ends, however it ends."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def make_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """A CA of its own, and a certificate it signed for 127.0.0.1: (CA, certificate, key)."""
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    certificate, key = directory / "broker.pem", directory / "broker.key"
    request, extensions = directory / "broker.csr", directory / "broker.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for command in (
            ["req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2",
             "-subj", "/CN=webvirt test CA"],
            ["req", *ec, "-keyout", key, "-out", request, "-subj", "/CN=127.0.0.1"],
            ["x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-out", certificate, "-days", "2", "-extfile", extensions]):
        subprocess.run(["openssl", *map(str, command)], check=True, capture_output=True)
    return ca, certificate, key


class Broker:
    """mosquitto on 127.0.0.1, no persistence; anonymous, or with one user and password. With
    `tls`, a second listener (tls_port) speaks TLS with a certificate from a CA of its own
    (ca_file), as a home broker with a self-signed certificate does."""

    def __init__(self, directory: Path, credentials: tuple[str, str] | None = None,
                 tls: bool = False):
        if not os.access(MOSQUITTO, os.X_OK):
            raise RuntimeError("mosquitto not found: scripts/install --test installs it")
        self.directory = directory
        self.port = free_port()
        self.credentials = credentials
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)
        # As root mosquitto would switch to the user "mosquitto", who cannot read tmp_path.
        lines = [f"user {pwd.getpwuid(os.getuid()).pw_name}", "persistence false",
                 f"listener {self.port} 127.0.0.1"]
        self.tls_port = self.ca_file = None
        if tls:
            self.tls_port = free_port()
            self.ca_file, certificate, key = make_certificate(directory)
            # Certificates are the settings of the listener named before them.
            lines += [f"listener {self.tls_port} 127.0.0.1", f"cafile {self.ca_file}",
                      f"certfile {certificate}", f"keyfile {key}"]
        if credentials is None:
            lines.append("allow_anonymous true")
        else:
            password_file = directory / "passwords"
            subprocess.run(["mosquitto_passwd", "-b", "-c", str(password_file), *credentials],
                           check=True, capture_output=True)
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        self.config = directory / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.directory / "mosquitto.log", "ab") as log:
            self.process = subprocess.Popen([MOSQUITTO, "-c", str(self.config)], stdout=log,
                                            stderr=log, stdin=subprocess.DEVNULL,
                                            preexec_fn=_die_with_parent)
        process = self.process
        until_sync(lambda: process.poll() is not None or self.accepts(), 10,
                   "mosquitto listens")
        if process.poll() is not None:
            raise RuntimeError(f"mosquitto exited; see {self.directory / 'mosquitto.log'}")

    def accepts(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


@dataclass(frozen=True, slots=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    at: float  # time.monotonic() when it arrived


class Subscriber:
    """An aiomqtt client that records every message on its topics, to wait on."""

    def __init__(self, port: int, *topics: str, credentials: tuple[str, str] | None = None):
        username, password = credentials or (None, None)
        self.client = aiomqtt.Client("127.0.0.1", port, username=username, password=password)
        self.topics = topics
        self.messages: list[Received] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Subscriber:
        await self.client.__aenter__()
        for topic in self.topics:
            await self.client.subscribe(topic, qos=1)
        self._task = asyncio.create_task(self._collect())
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.client.__aexit__(kind, error, traceback)

    async def _collect(self) -> None:
        async for message in self.client.messages:
            payload = message.payload
            assert isinstance(payload, bytes | bytearray)
            self.messages.append(Received(message.topic.value, bytes(payload), message.retain,
                                          time.monotonic()))

    def mark(self) -> int:
        return len(self.messages)

    def last(self, topic: str) -> bytes | None:
        """The latest payload on the topic; None if none came."""
        return next((m.payload for m in reversed(self.messages) if m.topic == topic), None)

    async def wait(self, topic: str, accept: Callable[[bytes], bool] | bytes | str,
                   seconds: float = 5, after: int = 0) -> Received:
        """The first message on `topic` since message number `after` that `accept` takes (or
        that is this payload)."""
        if not callable(accept):
            wanted = accept.encode() if isinstance(accept, str) else accept
            accept = wanted.__eq__
        check = accept
        found: list[Received] = []

        def arrived() -> bool:
            found[:] = [m for m in self.messages[after:] if m.topic == topic and check(m.payload)]
            return bool(found)

        await until(arrived, seconds, f"a message on {topic}")
        return found[0]

    async def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> None:
        await self.client.publish(topic, payload, qos=1, retain=retain)
