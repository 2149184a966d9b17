"""Home Assistant over MQTT (--mqtt): every domain as a device with entities, its state pushed
from the event hub, commands from Home Assistant obeyed. Topics and payloads:
webvirt/mqtt_discovery.py.

A consumer like any other: facts come from the hub (no polling), commands go through
actions.perform, the code path of the REST actions (same locks, same errors). A command that
fails is logged and published on PREFIX/REF/error; nothing a broker client sends ends the
bridge. The broker may come and go: HTTP is served meanwhile, the bridge reconnects with
backoff and publishes discovery and every state again (retained: a broker without
persistence has lost them).

The hub's events update the model (domains, rules, attached devices) at once, broker or not;
only the publishing waits for the broker, and a connection publishes the whole model. What this
webvirt has configs for is kept retained on PREFIX/inventory: at each connect, what it lists
and is gone (a VM undefined, a rule deleted while webvirt or the broker was away) is removed.

Whoever can publish to PREFIX/+/set controls the VMs, like a holder of the API token: secure
the broker (credentials, ACLs). The bridge reacts to its own command topics and to Home
Assistant's birth message, nothing else, and never obeys a retained command (MQTT 5 tells
them apart). No topic it publishes is made of what the broker sent unchecked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import aiomqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from webvirt import domains
from webvirt.actions import Operation, perform
from webvirt.config import MqttSettings
from webvirt.domain_cache import DomainEntry
from webvirt.errors import ApiError
from webvirt.host import Host
from webvirt.hosts import Hosts, split_ref
from webvirt.hub import EventHub
from webvirt.log_throttle import Throttle, Throttled
from webvirt.mqtt_client import Client
from webvirt.mqtt_discovery import (
    OFF,
    OFFLINE,
    ON,
    ONLINE,
    Inventory,
    Layout,
    power,
    state_text,
)
from webvirt.rules import Rule
from webvirt.rules_store import Change, RuleStore
from webvirt.tasks import cancel_and_wait

log = logging.getLogger(__name__)
T = TypeVar("T")
# Lines a broker client can cause once per message (a command flood): throttled (Throttled).
command_log = logging.getLogger(f"{__name__}.commands")
client_log = logging.getLogger(f"{__name__}.client")  # aiomqtt's and paho's

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
BACKLOG = 1000  # items waiting to be published; beyond, everything is published afresh
STOP_PUBLISH_S = 2.0
# Home Assistant asks to wait a little after its birth: the births of a burst are one publish.
RESYNC_DELAY_S = 0.5
INVENTORY_WAIT_S = 5.0  # for the broker's echo at connect (PREFIX/inventory has arrived)
DROPPED_SHOWN = 5  # entries of a bad inventory named in the warning (it may hold thousands)
LOG_EVERY_S = 10.0  # at most one line per this time for a warning a flood repeats
DROPPED_ERROR_EVERY_S = 1.0  # and one error message for dropped commands
# Connection refused for the user or password: MQTT 5's 134 and 135.
REFUSED_CREDENTIALS = frozenset({134, 135})
# MQTT 5's Retain As Published: a command published retained arrives retained also to a
# subscriber connected already (MQTT 3.1.1 clears the flag then, and the bridge obeyed it).
COMMAND_SUBSCRIPTION = SubscribeOptions(qos=1, retainAsPublished=True)
# The hub events that change what is published.
WANTED = frozenset({"lifecycle", "state", "connection", "rule", "detach",
                    "node-device-removed"})

# What to publish, read from the model when published: ("domain", (key, configs too)),
# ("remove", key), ("rule", id), ("unrule", (key, id)), ("attached", id), ("host", Host),
# ("error", (ref, error)), ("clear", topic), ("resync", None).
Item = tuple[str, Any]


command_log.addFilter(Throttled(LOG_EVERY_S))
client_log.addFilter(Throttled(LOG_EVERY_S))


async def finished(operation: Awaitable[T]) -> T:
    """Awaits an aiomqtt operation, and then a cancel that came as it completed. aiomqtt waits
    with asyncio.wait_for, which before Python 3.12 drops such a cancel (CPython gh-86296):
    a cancelled publishing task went on waiting for the next change, and shutdown or a
    reconnect waited for it forever."""
    result = await operation
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
    return result


class MqttBridge:
    __slots__ = ("_attached", "_backlog", "_birth_timer", "_client", "_commands",
                 "_domains", "_dropped", "_holding", "_inventory", "_last_error", "_online",
                 "_resync_queued", "_rules", "_rules_loaded", "_stop_listening", "_task",
                 "hosts", "hub", "layout", "rules", "settings")

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
        self._resync_queued = False
        self._birth_timer: asyncio.TimerHandle | None = None
        self._commands: set[asyncio.Task[None]] = set()
        self._dropped = Throttle(DROPPED_ERROR_EVERY_S)
        self._last_error: str | None = None  # of the connection, to log each new one once
        # The model, kept by the events whether the broker is there or not: domains by key
        # (see key()) with their host, rules by id, the device addresses each rule attached.
        self._domains: dict[str, tuple[Host, DomainEntry]] = {}
        self._rules: dict[int, Rule] = {}
        self._rules_loaded = False
        self._attached: dict[int, set[str]] = {}
        # Per host, what its rules hold as its USB reconciler last read (held()).
        self._holding: dict[Host, Mapping[int, frozenset[str]]] = {}
        self._inventory = Inventory()  # what the broker holds configs of
        self._stop_listening = hub.listen(self._on_event)
        rules.listeners.append(self._on_rule_change)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Tells Home Assistant webvirt is going (the last will is for an unclean end)."""
        self._stop_listening()
        with contextlib.suppress(ValueError):
            self.rules.listeners.remove(self._on_rule_change)
        if self._birth_timer is not None:
            self._birth_timer.cancel()
        client = self._client
        if client is not None and self._online:
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                async with asyncio.timeout(STOP_PUBLISH_S):
                    await client.publish(self.layout.status, OFFLINE, qos=1, retain=True)
        await cancel_and_wait(*self._commands, self._task)

    def key(self, host: Host, uuid: str) -> str:
        """A domain's topic level and id: its UUID; with several hosts, HOST-UUID (a VM copied
        to a second machine may keep its UUID)."""
        return f"{host.name}-{uuid}" if self.hosts.several else uuid

    def _host_of(self, event: dict[str, Any]) -> Host | None:
        name = event.get("host")
        return self.hosts.default if name is None else self.hosts.by_name.get(name)

    def _rule_host(self, rule: Rule) -> Host:
        return self.hosts.by_name.get(split_ref(rule.domain)[1] or "", self.hosts.default)

    def _rule_key(self, rule: Rule) -> str:
        return self.key(self._rule_host(rule), rule.domain_uuid)

    def _rules_of(self, key: str) -> list[Rule]:
        return [rule for rule in self._rules.values() if self._rule_key(rule) == key]

    # The model: called synchronously by the hub and the rule store; quick, never raise.

    def _on_event(self, event: dict[str, Any]) -> None:
        if event["type"] not in WANTED:
            return
        try:
            self._apply(event)
        except Exception:  # a bug must not reach the hub's other listeners
            log.exception("MQTT: applying a %s event failed", event["type"])

    def _apply(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        host = self._host_of(event)
        if host is None:
            return
        if kind in ("lifecycle", "state"):
            self._apply_state(host, event)
        elif kind == "connection":
            # Its domains are unavailable while it is away; back, everything is told again.
            self._queue(("host", host))
            if event.get("state") == "restored":
                self._queue(("resync", None))
        elif kind == "rule" and event.get("action") == "attach":
            self._apply_attach(event)
        elif kind in ("rule", "detach"):  # taken by an older rule, or unplugged
            key = self.key(host, str(event.get("uuid")))
            self._detach(lambda rule, address: (
                self._rule_key(rule) == key and address == event.get("address")))
        elif kind == "node-device-removed":
            self._detach(lambda rule, address: (
                address == event.get("address") and self._rule_host(rule) is host))

    def _apply_state(self, host: Host, event: dict[str, Any]) -> None:
        key, state = self.key(host, event["uuid"]), event["state"]
        if state == "undefined":
            # A rename is UNDEFINED then DEFINED, both "renamed": the same entities, renamed
            # by the DEFINED (removing them would lose Home Assistant's ids and settings).
            if event.get("detail") != "renamed":
                self._domains.pop(key, None)
                self._detach(lambda rule, _address: self._rule_key(rule) == key)
                self._queue(("remove", key))
            return
        known = self._domains.get(key)
        entry = DomainEntry(event["uuid"], event["domain"], state)
        self._domains[key] = (host, entry)
        self._queue(("domain", (key, known is None or known[1].name != entry.name)))
        if power(state) == OFF:  # a stopped domain holds no device
            self._detach(lambda rule, _address: self._rule_key(rule) == key)

    def held(self, host: Host, holding: Mapping[int, frozenset[str]]) -> None:
        """What the rules of `host` hold, as its USB reconciler's latest pass read it. The
        events since start miss a device attached before webvirt started, or while libvirt
        was away; the pass's own attaches and detaches follow as events."""
        self._holding[host] = holding
        try:
            self._apply_holding(host)
        except Exception:  # a bug must not reach the reconciler
            log.exception("MQTT: applying what the USB rules hold failed")

    def _apply_holding(self, host: Host) -> None:
        holding = self._holding.get(host)
        if holding is None:
            return
        for rule in self._rules.values():
            if self._rule_host(rule) is not host:
                continue
            now = set(holding.get(rule.id, ()))
            if now != self._attached.get(rule.id, set()):
                if now:
                    self._attached[rule.id] = now
                else:
                    self._attached.pop(rule.id, None)
                self._queue(("attached", rule.id))

    def _apply_attach(self, event: dict[str, Any]) -> None:
        rule = self._rules.get(event["rule"])
        if rule is None:
            return
        address = str(event.get("address"))
        if event.get("result") == "ok":
            self._attached.setdefault(rule.id, set()).add(address)
            self._queue(("attached", rule.id))
        else:  # that device is not attached; the rule's others still are
            self._detach(lambda other, at: other.id == rule.id and at == address)
            self._queue(("attached", rule.id))  # OFF after a failure, if none is attached

    def _detach(self, which: Callable[[Rule, str], bool]) -> None:
        for rule_id, addresses in list(self._attached.items()):
            rule = self._rules.get(rule_id)
            gone = {a for a in addresses if rule is None or which(rule, a)}
            if gone:
                addresses -= gone
                if not addresses:
                    del self._attached[rule_id]
                self._queue(("attached", rule_id))

    def _on_rule_change(self, change: Change, rule: Rule) -> None:
        old = self._rules.pop(rule.id, None)
        if old is not None and (change == "deleted"
                                or self._rule_key(old) != self._rule_key(rule)):
            self._attached.pop(rule.id, None)
            self._queue(("unrule", (self._rule_key(old), old.id)))
        if change != "deleted":
            self._rules[rule.id] = rule
            self._queue(("rule", rule.id))

    def _refresh_domains(self) -> None:
        """The domains from the caches of the connected hosts (a host that is away keeps its
        domains: they are unavailable, not gone), and no device attached where none can be."""
        for host in self.hosts:
            if host.connected:
                for key in [k for k, (h, _e) in self._domains.items() if h is host]:
                    del self._domains[key]
                for entry in host.cache:
                    self._domains[self.key(host, entry.uuid)] = (host, entry)
        for rule_id in [r for r in self._attached if r not in self._rules]:
            del self._attached[rule_id]
        self._detach(lambda rule, _address: power(self._domains.get(
            self._rule_key(rule), (None, DomainEntry("", "", "undefined")))[1].state) == OFF)

    # Publishing waits for the broker: a connection publishes the whole model anyway.

    def _queue(self, item: Item) -> None:
        if not self._online:
            return
        if item[0] == "resync":
            if self._resync_queued:
                return  # one is coming: it publishes what this one would
            self._resync_queued = True
        try:
            self._backlog.put_nowait(item)
        except asyncio.QueueFull:
            # The broker is too slow for the events: what is queued is stale, start afresh.
            while not self._backlog.empty():
                self._backlog.get_nowait()
            self._resync_queued = True
            self._backlog.put_nowait(("resync", None))

    def _birth(self) -> None:
        """Home Assistant (re)started: publish everything once, shortly."""
        log.debug("MQTT: Home Assistant is online")
        if self._birth_timer is None:
            self._birth_timer = asyncio.get_running_loop().call_later(RESYNC_DELAY_S,
                                                                      self._birth_due)

    def _birth_due(self) -> None:
        self._birth_timer = None
        self._queue(("resync", None))

    # The connection.

    def _new_client(self) -> Client:
        settings = self.settings
        tls = None
        if settings.tls:
            ca_file = str(settings.ca_file) if settings.ca_file else None
            tls = ssl.create_default_context(cafile=ca_file)
        return Client(
            settings.host, settings.port, username=settings.username,
            password=settings.password,
            identifier=f"webvirt-{secrets.token_hex(4)}",
            protocol=aiomqtt.ProtocolVersion.V5,
            will=aiomqtt.Will(self.layout.status, OFFLINE, qos=1, retain=True),
            tls_context=tls, logger=client_log,
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
                    attempt, self._last_error = 0, None
                    await self._serve(client)
            except aiomqtt.MqttError as err:
                self._report(where, err)
            except ApiError as err:  # the rule store, unreadable or stuck: tried again
                log.warning("MQTT: %s; reconnecting", err.detail)
            except Exception:  # a bug must not end the bridge for good
                log.exception("MQTT bridge failed; reconnecting")
            finally:
                self._online = False
                self._client = None
            await asyncio.sleep(RECONNECT_DELAYS_S[min(attempt,
                                                       len(RECONNECT_DELAYS_S) - 1)])
            attempt += 1

    def _report(self, where: str, err: aiomqtt.MqttError) -> None:
        """Each new reason once as a warning (a changed password must show), repeats at debug."""
        text = str(err)
        if text == self._last_error:
            log.debug("MQTT: broker %s still unavailable (%s)", where, text)
            return
        self._last_error = text
        rc = getattr(err, "rc", None)
        if getattr(rc, "value", rc) in REFUSED_CREDENTIALS:
            log.warning("MQTT: the broker %s refused webvirt's credentials (%s); check the "
                        "user and password; retrying", where, text)
        elif "CERTIFICATE_VERIFY_FAILED" in text:  # ssl's reason, in paho's OSError
            log.warning("MQTT: webvirt could not verify the broker %s's certificate (%s); "
                        "if a CA of your own signed it, give the CA that signed it with "
                        "--mqtt-ca; retrying", where, text)
        else:
            log.warning("MQTT: broker %s unavailable (%s); reconnecting", where, text)

    async def _serve(self, client: aiomqtt.Client) -> None:
        if not self._rules_loaded:  # from then on the store's listener keeps them
            self._rules = {rule.id: rule for rule in await self.rules.list()}
            self._rules_loaded = True
            for host in list(self._holding):
                self._apply_holding(host)
        found, dropped = await self._read_inventory(client)
        self._inventory.merge(found)
        if dropped:  # replaced by the inventory without them: not dropped at every connect
            more = len(dropped) - DROPPED_SHOWN
            log.warning("MQTT: dropped from the retained %s what webvirt cannot have written: "
                        "%s%s", self.layout.inventory, "; ".join(dropped[:DROPPED_SHOWN]),
                        f" and {more} more" if more > 0 else "")
            await self._publish(client, self.layout.inventory, self._inventory.payload())
        await finished(client.subscribe(self.layout.commands, options=COMMAND_SUBSCRIPTION))
        await finished(client.subscribe(self.layout.home_assistant_status, qos=1))
        while not self._backlog.empty():
            self._backlog.get_nowait()
        self._resync_queued = False
        self._online = True  # from here on, changes queue up behind the full publish
        await self._publish_all(client)
        tasks = [asyncio.create_task(self._drain(client)),
                 asyncio.create_task(self._read(client))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(*tasks)
        for task in done:
            task.result()  # its error; a clean end of the messages is a lost connection
        raise aiomqtt.MqttError("the connection ended")

    async def _read_inventory(self, client: aiomqtt.Client) -> tuple[Inventory, list[str]]:
        """The retained PREFIX/inventory, if any, and what of it was dropped (Inventory.load).
        The broker sends a subscription's retained message before anything published later:
        once a marker sent to a private topic comes back, the inventory came or there is
        none."""
        echo = self.layout.echo(secrets.token_hex(8))
        found: tuple[Inventory, list[str]] = (Inventory(), [])
        await finished(client.subscribe(self.layout.inventory, qos=1))
        await finished(client.subscribe(echo, qos=1))
        await finished(client.publish(echo, b"marker", qos=1))
        try:
            async with asyncio.timeout(INVENTORY_WAIT_S):
                async for message in client.messages:
                    if message.topic.value == self.layout.inventory:
                        found = Inventory.load(message.payload)
                    elif message.topic.value == echo:
                        break
        except TimeoutError:
            log.warning("MQTT: no echo from the broker in %g s: what webvirt published before "
                        "and is gone is not removed this time", INVENTORY_WAIT_S)
        await finished(client.unsubscribe(self.layout.inventory))
        await finished(client.unsubscribe(echo))
        return found

    # Publishing: one task, in the order of the changes.

    async def _drain(self, client: aiomqtt.Client) -> None:
        while True:
            kind, value = await self._backlog.get()
            try:
                await self._publish_item(client, kind, value)
            except aiomqtt.MqttError:
                raise
            except Exception:  # a bug on one change must not stop the others
                log.exception("MQTT: publishing %s failed", kind)

    async def _publish_item(self, client: aiomqtt.Client, kind: str, value: Any) -> None:
        if kind == "domain":
            await self._publish_domain(client, *value)
        elif kind == "remove":
            await self._remove_domain(client, value)
        elif kind == "rule":
            await self._publish_rule(client, value)
        elif kind == "unrule":
            await self._remove_rule(client, *value)
        elif kind == "attached":
            await self._publish_attached(client, value)
        elif kind == "host":
            await self._publish_host(client, value)
        elif kind == "error":
            ref, error = value
            await self._publish(client, self.layout.error(ref), json.dumps(error),
                                retain=False)
        elif kind == "clear":
            await self._publish(client, value, b"")
        else:
            self._resync_queued = False
            await self._publish_all(client)

    async def _publish(self, client: aiomqtt.Client, topic: str, payload: str | bytes,
                       retain: bool = True) -> None:
        await finished(client.publish(topic, payload, qos=1, retain=retain))

    async def _record(self, client: aiomqtt.Client,
                      change: Callable[[Inventory], object]) -> None:
        """Changes the inventory, retained: before a config is published, after one is
        removed (so that it always lists every config there is)."""
        before = self._inventory.payload()
        change(self._inventory)
        if self._inventory.payload() != before:
            await self._publish(client, self.layout.inventory, self._inventory.payload())

    async def _publish_all(self, client: aiomqtt.Client) -> None:
        """Discovery and every state from the model; the configs of what is gone, removed."""
        self._refresh_domains()
        for key, host_name in list(self._inventory.domains.items()):
            host = self.hosts.by_name.get(host_name)
            if key not in self._domains and (host is None or host.connected):
                await self._remove_domain(client, key)
        current = {(self._rule_key(rule), rule.id) for rule in self._rules.values()}
        for key, rule_id in sorted(self._inventory.rules - current):
            await self._remove_rule(client, key, rule_id)
        for key in list(self._domains):
            await self._publish_domain(client, key, configs=True)
        for host in self.hosts:
            await self._publish_host(client, host)
        await self._publish(client, self.layout.status, ONLINE)

    async def _publish_host(self, client: aiomqtt.Client, host: Host) -> None:
        await self._publish(client, self.layout.host_status(host.name),
                            ONLINE if host.connected else OFFLINE)

    async def _publish_domain(self, client: aiomqtt.Client, key: str, configs: bool) -> None:
        known = self._domains.get(key)
        if known is None:
            return  # gone since
        host, entry = known
        if configs:
            await self._record(client, lambda inventory: inventory.domains.update(
                {key: host.name}))
            for topic, payload in self.layout.domain_configs(key, entry.name,
                                                             host.name).items():
                await self._publish(client, topic, json.dumps(payload))
            for rule in self._rules_of(key):
                await self._publish_rule(client, rule.id)
        await self._publish(client, self.layout.state(key), state_text(entry.state))
        await self._publish(client, self.layout.power(key), power(entry.state))

    async def _remove_domain(self, client: aiomqtt.Client, key: str) -> None:
        """An empty retained payload removes a config (and a retained state) from the broker,
        and the entity from Home Assistant."""
        if key in self._domains:
            return  # defined again since
        rules = {(k, rule_id) for k, rule_id in self._inventory.rules if k == key}
        rules |= {(key, rule.id) for rule in self._rules_of(key)}
        topics = [*self.layout.domain_config_topics(key), self.layout.state(key),
                  self.layout.power(key)]
        for _key, rule_id in sorted(rules):
            topics += [self.layout.rule_config_topic(key, rule_id),
                       self.layout.attached(key, rule_id)]
        for topic in topics:
            await self._publish(client, topic, b"")
        await self._record(client, lambda inventory: inventory.forget(key, rules))

    async def _publish_rule(self, client: aiomqtt.Client, rule_id: int) -> None:
        rule = self._rules.get(rule_id)
        known = self._domains.get(self._rule_key(rule)) if rule else None
        if rule is None or known is None:
            return  # deleted since, or its domain has no device
        key, (host, entry) = self._rule_key(rule), known
        device = ":".join(rule.match.as_dict().values())
        config = self.layout.rule_config(key, entry.name, host.name, rule.id, device)
        await self._record(client, lambda inventory: inventory.rules.add((key, rule_id)))
        await self._publish(client, self.layout.rule_config_topic(key, rule.id),
                            json.dumps(config))
        await self._publish_attached(client, rule_id)

    async def _remove_rule(self, client: aiomqtt.Client, key: str, rule_id: int) -> None:
        rule = self._rules.get(rule_id)
        if rule is not None and self._rule_key(rule) == key:
            return  # there again since
        for topic in (self.layout.rule_config_topic(key, rule_id),
                      self.layout.attached(key, rule_id)):
            await self._publish(client, topic, b"")
        await self._record(client, lambda inventory: inventory.rules.discard((key, rule_id)))

    async def _publish_attached(self, client: aiomqtt.Client, rule_id: int) -> None:
        rule = self._rules.get(rule_id)
        if rule is None or self._rule_key(rule) not in self._domains:
            return
        await self._publish(client, self.layout.attached(self._rule_key(rule), rule_id),
                            ON if self._attached.get(rule_id) else OFF)

    # Commands.

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = message.topic.value
            if topic == self.layout.status:
                continue  # webvirt's own, never Home Assistant's birth (however configured)
            if topic == self.layout.home_assistant_status:
                if message.payload == ONLINE.encode():  # Home Assistant (re)started
                    self._birth()
                continue
            ref = self.layout.command_ref(topic)
            if ref is None:
                continue
            if message.retain:
                # Left on the broker, it comes again at every connect: never obeyed, and
                # removed (unless it is a removal, as the bridge's own coming back is).
                if message.payload:
                    command_log.warning("MQTT: ignored a retained command on %s; removing it "
                                        "from the broker", topic)
                    self._queue(("clear", topic))
                continue
            if len(self._commands) >= MAX_COMMANDS:
                self._drop(ref, topic)
                continue
            task = asyncio.create_task(self._command(client, ref, message.payload))
            self._commands.add(task)
            task.add_done_callback(self._commands.discard)

    def _drop(self, ref: str, topic: str) -> None:
        """A command beyond MAX_COMMANDS: logged and told on the error topic, both throttled
        (a flood must not become a flood of lines and messages)."""
        command_log.warning("MQTT: %d commands in progress; dropped one on %s", MAX_COMMANDS,
                            topic)
        if self._dropped.take() is not None:
            self._queue(("error", (ref, {
                "action": None, "error": "too_many_commands", "status": 503,
                "message": f"{MAX_COMMANDS} commands in progress: this one was dropped (and "
                           "others within a second, told once)"})))

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
            command_log.warning("MQTT command %s on %s failed: %s", action or "?", ref,
                                err.detail)
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
