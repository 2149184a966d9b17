"""The Stream Deck app's side of a plugin's WebSocket protocol (Elgato SDK v2), for the tests:
it starts the built plugin as the app does, keeps the settings, sends key events, and records
what the plugin (and a property inspector page) send, to wait on."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType, web

from tests.processes import REPO
from tests.waiting import until

STREAMDECK = REPO / "streamdeck"
PLUGIN_DIR = STREAMDECK / "org.webvirt.streamdeck.sdPlugin"
PLUGIN_UUID = "org.webvirt.streamdeck"
DEVICE = "DEV1"
POWER, USB, USAGE = (f"{PLUGIN_UUID}.{name}" for name in ("power", "usb", "usage"))
INFO = {
    "application": {"font": ".AppleSystemUIFont", "language": "en", "platform": "mac",
                    "platformVersion": "14.0", "version": "6.9.0"},
    "plugin": {"uuid": PLUGIN_UUID, "version": "0.1.0.0"},
    "devicePixelRatio": 2, "colors": {},
    "devices": [{"id": DEVICE, "name": "Stream Deck XL", "size": {"columns": 8, "rows": 4},
                 "type": 2}],
}


class Sent:
    """One message from the plugin or a property inspector, and when it came."""

    __slots__ = ("at", "data", "source")

    def __init__(self, source: str, data: dict[str, Any]):
        self.source = source  # "plugin", or the inspected key's context
        self.data = data
        self.at = time.monotonic()

    @property
    def event(self) -> str:
        return str(self.data.get("event"))

    @property
    def svg(self) -> str:
        """A setImage's image as SVG text."""
        image = self.data["payload"]["image"]
        head, _, body = image.partition(",")
        assert head == "data:image/svg+xml;base64", head
        return base64.b64decode(body).decode()


class FakeStreamDeck:
    def __init__(self, global_settings: dict[str, Any]):
        self.global_settings = dict(global_settings)
        self.settings: dict[str, dict[str, Any]] = {}  # context -> the key's settings
        self.actions: dict[str, str] = {}  # context -> action UUID
        self.coordinates: dict[str, dict[str, int]] = {}
        self.sent: list[Sent] = []
        self.plugin: web.WebSocketResponse | None = None
        self.inspectors: dict[str, web.WebSocketResponse] = {}
        self.process: subprocess.Popen[bytes] | None = None
        self.runner: web.AppRunner | None = None
        self.port = 0
        self._columns = itertools.count()

    async def start(self) -> FakeStreamDeck:
        bundle = PLUGIN_DIR / "bin" / "plugin.js"
        if not bundle.is_file():
            raise RuntimeError(f"{bundle} is missing: scripts/install --test builds it "
                               "(npm run build in streamdeck/)")
        app = web.Application()
        app.router.add_get("/", self._socket)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.process = launch(self.port)
        await self.wait_for(lambda m: m.event == "registerPlugin", 10, "the plugin registers")
        return self

    async def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            await asyncio.to_thread(self.process.wait, 10)
        for socket in [self.plugin, *self.inspectors.values()]:
            if socket is not None:
                await socket.close()
        if self.runner is not None:
            await self.runner.cleanup()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        source = "?"
        async for message in socket:
            if message.type != WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            if data.get("event") == "registerPlugin":
                self.plugin, source = socket, "plugin"
            elif data.get("event") == "registerPropertyInspector":
                self.inspectors[data["uuid"]] = socket
                source = data["uuid"]
            self.sent.append(Sent(source, data))
            await self._route(source, data)
        return socket

    async def _route(self, source: str, data: dict[str, Any]) -> None:
        """As the app does: settings kept and passed on, messages between the two sides."""
        event, context = data.get("event"), data.get("context", "")
        from_plugin = source == "plugin"
        if event == "getGlobalSettings":
            reply = {"event": "didReceiveGlobalSettings",
                     "payload": {"settings": self.global_settings}}
            await (self.to_plugin(reply) if from_plugin else self.to_inspector(source, reply))
        elif event == "setGlobalSettings":
            self.global_settings = data["payload"]
            if not from_plugin:
                await self.to_plugin({"event": "didReceiveGlobalSettings",
                                      "payload": {"settings": self.global_settings}})
        elif event == "setSettings":
            self.settings[context] = data["payload"]
            if not from_plugin:
                await self.to_plugin(self._key_event("didReceiveSettings", context))
        elif event == "sendToPlugin":
            await self.to_plugin({"event": "sendToPlugin", "action": self.actions[context],
                                  "context": context, "payload": data["payload"]})
        elif event == "sendToPropertyInspector":
            await self.to_inspector(context, {"event": "sendToPropertyInspector",
                                              "action": self.actions[context],
                                              "context": context, "payload": data["payload"]})

    async def to_plugin(self, message: dict[str, Any]) -> None:
        assert self.plugin is not None
        await self.plugin.send_json(message)

    async def to_inspector(self, context: str, message: dict[str, Any]) -> None:
        socket = self.inspectors.get(context)
        if socket is not None:
            await socket.send_json(message)

    def _key_event(self, event: str, context: str) -> dict[str, Any]:
        return {"event": event, "action": self.actions[context], "context": context,
                "device": DEVICE, "payload": {
                    "settings": self.settings[context], "coordinates": self.coordinates[context],
                    "controller": "Keypad", "isInMultiAction": False, "state": 0}}

    # What a user does.

    async def appear(self, action: str, settings: dict[str, Any],
                     context: str | None = None) -> str:
        """A key of this action comes into view (a profile page shown); its context."""
        column = next(self._columns)
        context = context or f"KEY{column}"
        self.actions[context] = action
        self.settings[context] = settings
        self.coordinates[context] = {"column": column % 8, "row": column // 8 % 4}
        await self.to_plugin(self._key_event("willAppear", context))
        return context

    async def disappear(self, context: str) -> None:
        await self.to_plugin(self._key_event("willDisappear", context))

    async def key_down(self, context: str) -> None:
        await self.to_plugin(self._key_event("keyDown", context))

    async def key_up(self, context: str) -> None:
        await self.to_plugin(self._key_event("keyUp", context))

    async def press(self, context: str) -> None:
        await self.key_down(context)
        await self.key_up(context)

    async def change_settings(self, context: str, settings: dict[str, Any]) -> None:
        self.settings[context] = settings
        await self.to_plugin(self._key_event("didReceiveSettings", context))

    async def change_global_settings(self, settings: dict[str, Any]) -> None:
        self.global_settings = settings
        await self.to_plugin({"event": "didReceiveGlobalSettings",
                              "payload": {"settings": settings}})

    async def inspect(self, context: str) -> None:
        """The user selects the key: its property inspector appears."""
        await self.to_plugin({"event": "propertyInspectorDidAppear",
                              "action": self.actions[context], "context": context,
                              "device": DEVICE})

    async def ask(self, context: str, payload: dict[str, Any]) -> dict[str, Any]:
        """What a property inspector would send the plugin; the plugin's answer."""
        mark = len(self.sent)
        await self.to_plugin({"event": "sendToPlugin", "action": self.actions[context],
                              "context": context, "payload": payload})
        answer = await self.wait_for(
            lambda m: m.event == "sendToPropertyInspector" and m.data["context"] == context,
            10, f"the plugin's answer to {payload}", after=mark)
        reply: dict[str, Any] = answer.data["payload"]
        return reply

    # What the plugin did.

    async def wait_for(self, accept: Callable[[Sent], bool], seconds: float, what: str,
                       after: int = 0) -> Sent:
        found: list[Sent] = []

        def arrived() -> bool:
            if not self.alive:
                raise AssertionError(f"the plugin exited ({self.process.returncode}): "  # type: ignore[union-attr]
                                     f"{self.log_tail()}")
            found[:] = [m for m in self.sent[after:] if accept(m)]
            return bool(found)

        await until(arrived, seconds, what)
        return found[0]

    def image(self, context: str) -> str | None:
        """The key's latest image, as SVG text."""
        images = [m for m in self.sent if m.event == "setImage" and m.data["context"] == context]
        return images[-1].svg if images else None

    async def shows(self, context: str, *words: str, seconds: float = 5,
                    after: int = 0) -> Sent:
        """Until the key's image holds every word (after message number `after`)."""
        return await self.wait_for(
            lambda m: m.event == "setImage" and m.data["context"] == context
            and all(word in m.svg for word in words), seconds,
            f"key {context} shows {words}", after=after)

    def log_tail(self) -> str:
        logs = sorted((PLUGIN_DIR / "logs").glob("*.log"))
        return logs[0].read_text()[-3000:] if logs else "(no log)"

    def mark(self) -> int:
        return len(self.sent)


def launch(port: int) -> subprocess.Popen[bytes]:
    """The plugin, as the app starts it: in its folder (the SDK reads manifest.json there)."""
    return subprocess.Popen(
        ["node", "bin/plugin.js", "-port", str(port), "-pluginUUID", PLUGIN_UUID,
         "-registerEvent", "registerPlugin", "-info", json.dumps(INFO)],
        cwd=PLUGIN_DIR, stdin=subprocess.DEVNULL, start_new_session=True)
