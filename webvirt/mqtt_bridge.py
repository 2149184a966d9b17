"""Home Assistant over MQTT (--mqtt): every domain as a device with entities, its state pushed
from the event hub, commands from Home Assistant obeyed. Topics and payloads:
webvirt/mqtt_discovery.py.

A consumer like any other: facts come from the hub (no polling), commands go through
actions.perform, the code path of the REST actions (same locks, same errors). A command that
fails is logged and published on PREFIX/REF/error; nothing a broker client sends ends the
bridge. The broker may come and go: HTTP is served meanwhile, the bridge reconnects with
backoff and publishes discovery and every state again (retained: a broker without
persistence has lost them).

Whoever can publish to PREFIX/+/set controls the VMs, like a holder of the API token: secure
the broker (credentials, ACLs). The bridge reacts to its own command topics and to Home
Assistant's birth message, nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import ssl
from collections.abc import Callable
from typing import Any

import aiomqtt

from webvirt import domains
from webvirt.actions import Operation, perform
from webvirt.config import MqttSettings
from webvirt.domain_cache import DomainEntry
from webvirt.errors import ApiError
from webvirt.host import Host
from webvirt.hosts import Hosts, split_ref
from webvirt.hub import EventHub
from webvirt.mqtt_discovery import OFF, OFFLINE, ON, ONLINE, Layout, power, state_text
from webvirt.rules import Rule
from webvirt.rules_store import Change, RuleStore

log = logging.getLogger(__name__)

RECONNECT_DELAYS_S = (0.5, 1, 2, 4)
# Payload -> (action as logged and reported, operation, exclusive), as the REST handlers do.
COMMANDS: dict[str, tuple[str, Operation, bool]] = {
    "ON": ("start", domains.start, True),
    "OFF": ("shutdown", domains.shutdown, True),
    "FORCE_OFF": ("destroy", domains.destroy, False),  # force off works on a busy domain
    "REBOOT": ("reboot", domains.reboot, True),
    "RESET": ("reset", domains.reset, True),
}
MAX_PAYLOAD = 64  # bytes; every command is a short word
MAX_COMMANDS = 32  # in progress at once; more are dropped (a flood must not pile up tasks)
BACKLOG = 1000  # events waiting to be published; beyond, everything is published afresh
STOP_PUBLISH_S = 2.0
# The hub events that change what is published.
WANTED = frozenset({"lifecycle", "state", "connection", "rule", "detach",
                    "node-device-removed"})

Item = tuple[str, Any]  # ("event", hub event) | ("rule", (change, rule)) | ("resync", None)


class MqttBridge:
    __slots__ = ("_attached", "_backlog", "_client", "_commands", "_domains", "_online",
                 "_rules", "_stop_listening", "_task", "hosts", "hub", "layout", "rules",
                 "settings")

    def __init__(self, settings: MqttSettings, hosts: Hosts, hub: EventHub, rules: RuleStore):
        self.settings = settings
        self.layout = Layout(settings.prefix, settings.discovery_prefix)
        self.hosts = hosts
        self.hub = hub
        self.rules = rules
        self._task: asyncio.Task[None] | None = None
        self._client: aiomqtt.Client | None = None
        self._online = False  # connected, and publishing what the backlog gets
        self._backlog: asyncio.Queue[Item] = asyncio.Queue(BACKLOG)
        self._commands: set[asyncio.Task[None]] = set()
        # What the broker was told (its retained topics): domains by key (see key()) with
        # their host, rules by id, and the device address each rule attached.
        self._domains: dict[str, tuple[Host, DomainEntry]] = {}
        self._rules: dict[int, Rule] = {}
        self._attached: dict[int, str] = {}
        self._stop_listening = hub.listen(self._on_event)
        rules.listeners.append(self._on_rule_change)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Tells Home Assistant webvirt is going (the last will is for an unclean end)."""
        self._stop_listening()
        with contextlib.suppress(ValueError):
            self.rules.listeners.remove(self._on_rule_change)
        client = self._client
        if client is not None and self._online:
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                async with asyncio.timeout(STOP_PUBLISH_S):
                    await client.publish(self.layout.status, OFFLINE, qos=1, retain=True)
        for task in (*self._commands, self._task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def key(self, host: Host, uuid: str) -> str:
        """A domain's topic level and id: its UUID; with several hosts, HOST-UUID (a VM copied
        to a second machine may keep its UUID)."""
        return f"{host.name}-{uuid}" if self.hosts.several else uuid

    def _host_of(self, event: dict[str, Any]) -> Host | None:
        name = event.get("host")
        return self.hosts.default if name is None else self.hosts.by_name.get(name)

    def _rule_key(self, rule: Rule) -> str:
        return self.key(self._rule_host(rule), rule.domain_uuid)

    # Feeding: called synchronously by the hub and the rule store; quick, never raise.

    def _on_event(self, event: dict[str, Any]) -> None:
        if event["type"] in WANTED:
            self._queue(("event", event))

    def _on_rule_change(self, change: Change, rule: Rule) -> None:
        self._queue(("rule", (change, rule)))

    def _queue(self, item: Item) -> None:
        if not self._online:
            return  # a connection publishes everything first
        try:
            self._backlog.put_nowait(item)
        except asyncio.QueueFull:
            # The broker is too slow for the events: what is queued is stale, start afresh.
            while not self._backlog.empty():
                self._backlog.get_nowait()
            self._backlog.put_nowait(("resync", None))

    # The connection.

    def _new_client(self) -> aiomqtt.Client:
        settings = self.settings
        return aiomqtt.Client(
            settings.host, settings.port, username=settings.username,
            password=settings.password,
            identifier=f"webvirt-{secrets.token_hex(4)}",
            will=aiomqtt.Will(self.layout.status, OFFLINE, qos=1, retain=True),
            tls_context=ssl.create_default_context() if settings.tls else None,
            keepalive=30, timeout=10, max_queued_incoming_messages=BACKLOG)

    async def _run(self) -> None:
        where = f"{self.settings.host}:{self.settings.port}"
        attempt = 0
        while True:
            try:
                async with self._new_client() as client:
                    self._client = client
                    log.info("MQTT: connected to %s (topics under %s/)", where,
                             self.settings.prefix)
                    attempt = 0
                    await self._serve(client)
            except aiomqtt.MqttError as err:
                # The first failure is worth a warning; the retries that follow are not.
                (log.warning if attempt == 0 else log.debug)(
                    "MQTT: broker %s unavailable (%s); reconnecting", where, err)
            except Exception:  # a bug must not end the bridge for good
                log.exception("MQTT bridge failed; reconnecting")
            finally:
                self._online = False
                self._client = None
            await asyncio.sleep(RECONNECT_DELAYS_S[min(attempt,
                                                       len(RECONNECT_DELAYS_S) - 1)])
            attempt += 1

    async def _serve(self, client: aiomqtt.Client) -> None:
        await client.subscribe(self.layout.commands, qos=1)
        await client.subscribe(self.layout.home_assistant_status, qos=1)
        while not self._backlog.empty():
            self._backlog.get_nowait()
        self._online = True  # from here on, events queue up behind the full publish
        await self._publish_all(client)
        tasks = [asyncio.create_task(self._drain(client)),
                 asyncio.create_task(self._read(client))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for task in done:
            task.result()  # its error; a clean end of the messages is a lost connection
        raise aiomqtt.MqttError("the connection ended")

    # Publishing: one task, in the order of the events.

    async def _drain(self, client: aiomqtt.Client) -> None:
        while True:
            kind, value = await self._backlog.get()
            try:
                if kind == "event":
                    await self._apply_event(client, value)
                elif kind == "rule":
                    await self._apply_rule_change(client, *value)
                else:
                    await self._publish_all(client)
            except aiomqtt.MqttError:
                raise
            except Exception:  # a bug on one event must not stop the others
                log.exception("MQTT: publishing %s failed", kind)

    async def _publish(self, client: aiomqtt.Client, topic: str, payload: str | bytes,
                       retain: bool = True) -> None:
        await client.publish(topic, payload, qos=1, retain=retain)

    async def _publish_all(self, client: aiomqtt.Client) -> None:
        """Discovery and every state, from the hosts' caches and the rule store."""
        self._rules = {rule.id: rule for rule in await self.rules.list()}
        current = {self.key(host, entry.uuid): (host, entry)
                   for host in self.hosts for entry in host.cache}
        for key, (host, _entry) in list(self._domains.items()):
            # A host that is away keeps its domains: they are unavailable, not gone.
            if key not in current and host.connected:
                await self._remove_domain(client, key)
        for key, (host, entry) in current.items():
            await self._publish_domain(client, key, host, entry, configs=True)
        for host in self.hosts:
            await self._publish_host(client, host)
        await self._publish(client, self.layout.status, ONLINE)

    async def _publish_host(self, client: aiomqtt.Client, host: Host) -> None:
        await self._publish(client, self.layout.host_status(host.name),
                            ONLINE if host.connected else OFFLINE)

    async def _publish_domain(self, client: aiomqtt.Client, key: str, host: Host,
                              entry: DomainEntry, configs: bool) -> None:
        self._domains[key] = (host, entry)
        if configs:
            for topic, payload in self.layout.domain_configs(key, entry.name,
                                                             host.name).items():
                await self._publish(client, topic, json.dumps(payload))
            for rule in self._rules_of(key):
                await self._publish_rule(client, rule, key)
        await self._publish(client, self.layout.state(key), state_text(entry.state))
        await self._publish(client, self.layout.power(key), power(entry.state))

    async def _remove_domain(self, client: aiomqtt.Client, key: str) -> None:
        """An empty retained payload removes a config (and a retained state) from the broker,
        and the entity from Home Assistant."""
        self._domains.pop(key, None)
        topics = [*self.layout.domain_config_topics(key), self.layout.state(key),
                  self.layout.power(key)]
        for rule in self._rules_of(key):
            self._attached.pop(rule.id, None)
            topics += [self.layout.rule_config_topic(key, rule.id),
                       self.layout.attached(key, rule.id)]
        for topic in topics:
            await self._publish(client, topic, b"")

    def _rules_of(self, key: str) -> list[Rule]:
        return [rule for rule in self._rules.values() if self._rule_key(rule) == key]

    async def _publish_rule(self, client: aiomqtt.Client, rule: Rule, key: str) -> None:
        device = ":".join(rule.match.as_dict().values())
        host, entry = self._domains[key]
        config = self.layout.rule_config(key, entry.name, host.name, rule.id, device)
        await self._publish(client, self.layout.rule_config_topic(key, rule.id),
                            json.dumps(config))
        await self._publish_attached(client, rule)

    async def _publish_attached(self, client: aiomqtt.Client, rule: Rule) -> None:
        await self._publish(client, self.layout.attached(self._rule_key(rule), rule.id),
                            ON if rule.id in self._attached else OFF)

    async def _apply_event(self, client: aiomqtt.Client, event: dict[str, Any]) -> None:
        kind = event["type"]
        host = self._host_of(event)
        if host is None:
            return
        if kind in ("lifecycle", "state"):
            key, state = self.key(host, event["uuid"]), event["state"]
            if state == "undefined":
                if key in self._domains:
                    await self._remove_domain(client, key)
                return
            known = self._domains.get(key)
            entry = DomainEntry(event["uuid"], event["domain"], state)
            await self._publish_domain(client, key, host, entry,
                                       configs=known is None or known[1].name != entry.name)
            if power(state) == OFF:  # a stopped domain holds no device
                await self._detached(client, lambda rule, _address: self._rule_key(rule) == key)
        elif kind == "connection":
            # Its domains are unavailable while it is away; back, everything is told again.
            await self._publish_host(client, host)
            if event.get("state") == "restored":
                await self._publish_all(client)
        elif kind == "rule" and event.get("action") == "attach":
            rule = self._rules.get(event["rule"])
            if rule is None:
                return
            if event.get("result") == "ok":
                self._attached[rule.id] = event["address"]
            else:
                self._attached.pop(rule.id, None)
            await self._publish_attached(client, rule)
        elif kind in ("rule", "detach"):  # taken by an older rule, or unplugged
            key = self.key(host, str(event.get("uuid")))
            await self._detached(client, lambda rule, address: (
                self._rule_key(rule) == key and address == event.get("address")))
        elif kind == "node-device-removed":
            await self._detached(client, lambda rule, address: (
                address == event.get("address") and self._rule_host(rule) is host))

    def _rule_host(self, rule: Rule) -> Host:
        return self.hosts.by_name.get(split_ref(rule.domain)[1] or "", self.hosts.default)

    async def _detached(self, client: aiomqtt.Client,
                        which: Callable[[Rule, str], bool]) -> None:
        for rule_id, address in list(self._attached.items()):
            rule = self._rules.get(rule_id)
            if rule is not None and which(rule, address):
                del self._attached[rule_id]
                await self._publish_attached(client, rule)

    async def _apply_rule_change(self, client: aiomqtt.Client, change: Change,
                                 rule: Rule) -> None:
        old = self._rules.pop(rule.id, None)
        if old is not None and (change == "deleted"
                                or self._rule_key(old) != self._rule_key(rule)):
            self._attached.pop(rule.id, None)
            for topic in (self.layout.rule_config_topic(self._rule_key(old), old.id),
                          self.layout.attached(self._rule_key(old), old.id)):
                await self._publish(client, topic, b"")
        if change == "deleted":
            return
        self._rules[rule.id] = rule
        key = self._rule_key(rule)
        if key in self._domains:
            await self._publish_rule(client, rule, key)

    # Commands.

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = message.topic.value
            if topic == self.layout.home_assistant_status:
                if message.payload == ONLINE.encode():  # Home Assistant (re)started
                    self._queue(("resync", None))
                continue
            ref = self.layout.command_ref(topic)
            if ref is None:
                continue
            if message.retain:
                # A retained command would be obeyed again at every reconnect.
                log.warning("MQTT: ignored a retained command on %s", topic)
                continue
            if len(self._commands) >= MAX_COMMANDS:
                log.warning("MQTT: %d commands in progress; dropped one on %s", MAX_COMMANDS,
                            topic)
                continue
            task = asyncio.create_task(self._command(client, ref, message.payload))
            self._commands.add(task)
            task.add_done_callback(self._commands.discard)

    async def _command(self, client: aiomqtt.Client, ref: str, payload: Any) -> None:
        command = COMMANDS.get(decode(payload) or "")
        action = command[0] if command else None
        try:
            if command is None:
                raise ApiError(f"unknown command {show(payload)}; send one of "
                               f"{', '.join(COMMANDS)}", code="bad_command")
            action, operation, exclusive = command
            known = self._domains.get(ref)
            host, entry = known if known else await self.hosts.resolve(ref)
            await perform(host, entry, action, operation, exclusive=exclusive)
            return
        except ApiError as err:
            error = {"action": action, "error": err.code, "status": err.status,
                     "message": err.detail}
            log.warning("MQTT command %s on %s failed: %s", action or "?", ref, err.detail)
        except Exception:  # a bug must not go unreported, nor end the bridge
            log.exception("MQTT command %s on %s failed", action or "?", ref)
            error = {"action": action, "error": "internal_error", "status": 500,
                     "message": "internal error; see webvirt's log"}
        with contextlib.suppress(aiomqtt.MqttError):
            await self._publish(client, self.layout.error(ref), json.dumps(error),
                                retain=False)


def decode(payload: Any) -> str | None:
    """A command word, or None when the payload cannot be one."""
    if not isinstance(payload, bytes | bytearray) or len(payload) > MAX_PAYLOAD:
        return None
    try:
        return bytes(payload).decode().strip()
    except UnicodeDecodeError:
        return None


def show(payload: Any) -> str:
    """A payload for an error message, cut short."""
    if isinstance(payload, bytes | bytearray):
        return repr(bytes(payload[:40])) + ("..." if len(payload) > 40 else "")
    return repr(payload)
