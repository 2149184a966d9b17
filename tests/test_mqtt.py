"""Home Assistant over MQTT (webvirt/mqtt_bridge.py) against a real mosquitto broker, on
libvirt's test driver (the demo host: win11 shut off, linux-dev running, media-server paused)
and on a real QEMU guest."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import libvirt
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import DEMO_HOST_URI, ClientFactory
from tests.libvirt_daemon import guest_xml
from tests.mosquitto import Broker, Subscriber
from tests.processes import REPO, free_port, spawn_webvirt, wait_until_serving
from tests.waiting import until
from webvirt import host as host_module
from webvirt import mqtt_bridge
from webvirt.appkeys import EVENT_HUB, HOST
from webvirt.config import MqttSettings, MqttUrlError, mqtt_settings
from webvirt.errors import ApiError
from webvirt.hosts import HostSpec
from webvirt.log_throttle import Throttled
from webvirt.mqtt_discovery import Inventory, Layout

WIN11 = "6b1e5c2a-0d7e-4c55-9a52-3f1d0a9c1111"
LINUX = "6b1e5c2a-0d7e-4c55-9a52-3f1d0a9c2222"
MEDIA = "6b1e5c2a-0d7e-4c55-9a52-3f1d0a9c3333"
DEMO = {WIN11: ("win11", "shut off", "OFF"), LINUX: ("linux-dev", "running", "ON"),
        MEDIA: ("media-server", "paused by user", "ON")}
OBJECTS = [("switch", "power"), ("sensor", "state"), ("button", "force_off"),
           ("button", "reboot"), ("button", "reset")]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One anonymous broker for the module; each test has topics of its own (fresh_layout)."""
    broker = Broker(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop()


def fresh_layout() -> Layout:
    tag = secrets.token_hex(3)
    return Layout(f"wv{tag}", f"ha{tag}")


def settings_for(broker: Broker, layout: Layout) -> MqttSettings:
    return MqttSettings("127.0.0.1", broker.port, prefix=layout.prefix,
                        discovery_prefix=layout.discovery_prefix)


class Bridged:
    """A webvirt app with --mqtt, and a subscriber to everything under both prefixes."""

    def __init__(self, client: TestClient, mqtt: Subscriber, layout: Layout, mqtt_port: int):
        self.client = client
        self.mqtt = mqtt
        self.layout = layout
        self.mqtt_port = mqtt_port


@pytest.fixture
async def bridged(make_client: ClientFactory, broker: Broker) -> AsyncIterator[Bridged]:
    layout = fresh_layout()
    async with Subscriber(broker.port, f"{layout.prefix}/#",
                          f"{layout.discovery_prefix}/#") as mqtt:
        client = await make_client(mqtt=settings_for(broker, layout))
        await mqtt.wait(layout.status, "online")
        yield Bridged(client, mqtt, layout, broker.port)


def config(mqtt: Subscriber, topic: str) -> dict[str, Any]:
    payload = mqtt.last(topic)
    assert payload, f"no config on {topic}"
    loaded: dict[str, Any] = json.loads(payload)
    return loaded


async def command(bridged: Bridged, ref: str, payload: bytes | str) -> None:
    await bridged.mqtt.publish(f"{bridged.layout.prefix}/{ref}/set", payload)


async def error_after(bridged: Bridged, ref: str, mark: int) -> dict[str, Any]:
    received = await bridged.mqtt.wait(bridged.layout.error(ref), lambda _: True, after=mark)
    assert not received.retain
    loaded: dict[str, Any] = json.loads(received.payload)
    return loaded


# 1. Discovery

async def test_discovery_makes_one_device_per_domain_with_its_entities(
        bridged: Bridged, broker: Broker) -> None:
    layout, mqtt = bridged.layout, bridged.mqtt
    status = layout.status
    for uuid, (name, text, power) in DEMO.items():
        node = f"{layout.prefix}_{uuid}"
        configs = {}
        for component, object_id in OBJECTS:
            topic = f"{layout.discovery_prefix}/{component}/{node}/{object_id}/config"
            configs[object_id] = entity = config(mqtt, topic)
            assert entity["unique_id"] == f"{node}_{object_id}"
            assert entity["device"]["identifiers"] == [node]
            assert entity["device"]["name"] == name
            assert entity["availability"] == [
                {"topic": topic, "payload_available": "online",
                 "payload_not_available": "offline"}
                for topic in (status, layout.host_status("local"))]
            assert entity["availability_mode"] == "all"
        command_topic = f"{layout.prefix}/{uuid}/set"
        switch = configs["power"]
        assert switch == {**switch, "name": "Power", "state_topic": f"{layout.prefix}/{uuid}/power",
                          "command_topic": command_topic, "payload_on": "ON",
                          "payload_off": "OFF"}
        assert configs["state"]["state_topic"] == f"{layout.prefix}/{uuid}/state"
        assert {(configs[b]["command_topic"], configs[b]["payload_press"])
                for b in ("force_off", "reboot", "reset")} == {
            (command_topic, "FORCE_OFF"), (command_topic, "REBOOT"), (command_topic, "RESET")}
        # States are retained: what a new subscriber (Home Assistant starting) gets at once.
        assert mqtt.last(f"{layout.prefix}/{uuid}/state") == text.encode()
        assert mqtt.last(f"{layout.prefix}/{uuid}/power") == power.encode()
    # A domain's name never goes into a topic (it may hold / + # or spaces).
    assert not any(name in m.topic for m in mqtt.messages for name, *_ in DEMO.values())
    async with Subscriber(broker.port, f"{layout.prefix}/+/state") as late:
        await late.wait(f"{layout.prefix}/{WIN11}/state", "shut off")
        assert all(m.retain for m in late.messages)


def test_mqtt_urls_and_prefixes() -> None:
    env = {"WEBVIRT_MQTT_PASSWORD": "from-env"}
    assert mqtt_settings("mqtt://broker", "webvirt", "homeassistant", {}) == MqttSettings(
        "broker", 1883)
    tls = mqtt_settings("mqtts://ha:s%40cret@broker:8884", "a/b", "ha", env)
    assert (tls.host, tls.port, tls.tls, tls.username, tls.password, tls.prefix) == (
        "broker", 8884, True, "ha", "s@cret", "a/b")
    assert mqtt_settings("mqtts://ha@broker", "w", "h", env).password == "from-env"
    assert mqtt_settings("mqtts://ha@broker", "w", "h", env).port == 8883
    for url, prefix in [("http://broker", "w"), ("mqtt://broker/x", "w"), ("mqtt://", "w"),
                        ("mqtt://broker:99999", "w"), ("mqtt://broker", "w/+"),
                        ("mqtt://broker", "w/"), ("mqtt://broker", "#"), ("mqtt://b", "")]:
        with pytest.raises(MqttUrlError):
            mqtt_settings(url, prefix, "homeassistant", {})


# 2. Availability and last will, with a real process and a broker that wants a password

async def test_online_then_offline_when_webvirt_is_killed(tmp_path: Path) -> None:
    credentials = ("hass", "pa55 word")
    broker = Broker(tmp_path / "broker", credentials=credentials)
    broker.start()
    port = free_port()
    layout = fresh_layout()
    process = spawn_webvirt(
        "test:///default", port, "--mqtt", f"mqtt://hass@127.0.0.1:{broker.port}",
        "--mqtt-prefix", layout.prefix, "--mqtt-discovery-prefix", layout.discovery_prefix,
        state_dir=tmp_path / "state",
        env={**os.environ, "WEBVIRT_MQTT_PASSWORD": credentials[1]})
    try:
        await asyncio.to_thread(wait_until_serving, f"http://127.0.0.1:{port}/api/0/version",
                                process)
        async with Subscriber(broker.port, f"{layout.prefix}/#", f"{layout.discovery_prefix}/#",
                              credentials=credentials) as mqtt:
            await mqtt.wait(layout.status, "online", seconds=10)
            # test:///default has one domain, "test", running.
            uuid = await asyncio.to_thread(default_test_uuid)
            assert config(mqtt, layout.config("switch", uuid, "power"))["device"]["name"] == "test"
            assert mqtt.last(layout.state(uuid)) == b"running"
            mark = mqtt.mark()
            process.send_signal(signal.SIGKILL)
            await mqtt.wait(layout.status, "offline", after=mark)
    finally:
        process.kill()
        process.communicate()
        broker.stop()


def default_test_uuid() -> str:
    conn = libvirt.open("test:///default")
    try:
        return str(conn.lookupByName("test").UUIDString())
    finally:
        conn.close()


# 3. States follow libvirt's events

async def test_states_follow_lifecycle_events_within_a_second(bridged: Bridged) -> None:
    layout, mqtt, client = bridged.layout, bridged.mqtt, bridged.client
    told: dict[str, float] = {}
    client.app[EVENT_HUB].listen(lambda e: told.setdefault(
        f"{e.get('event')}", time.monotonic()) if e["type"] == "lifecycle" else None)
    mark = mqtt.mark()
    assert (await client.get("/api/0/start/win11")).status == 200
    running = await mqtt.wait(layout.state(WIN11), "running", after=mark)
    power = await mqtt.wait(layout.power(WIN11), "ON", after=mark)
    assert max(running.at, power.at) - told["started"] < 1.0
    print(f"libvirt event -> MQTT state: {(running.at - told['started']) * 1000:.1f} ms")
    # A change made behind webvirt's back, straight through libvirt, too.
    await client.app[HOST].call(lambda conn: conn.lookupByUUIDString(WIN11).destroy())
    off = await mqtt.wait(layout.state(WIN11), "shut off", after=mark)
    assert off.at - told["stopped"] < 1.0
    await mqtt.wait(layout.power(WIN11), "OFF", after=mark)


@pytest.mark.qemu
async def test_a_real_guest_that_starts_is_running(
        make_client: ClientFactory, libvirt_daemon: Any, qemu_conn: libvirt.virConnect,
        broker: Broker) -> None:
    dom = qemu_conn.defineXML(guest_xml("ha-guest"))
    layout = fresh_layout()
    async with Subscriber(broker.port, f"{layout.prefix}/#") as mqtt:
        client = await make_client(uri=libvirt_daemon.uri, mqtt=settings_for(broker, layout))
        await mqtt.wait(layout.state(dom.UUIDString()), "shut off")
        mark = mqtt.mark()
        assert (await client.get("/api/0/start/ha-guest")).status == 200
        await mqtt.wait(layout.state(dom.UUIDString()), "running", after=mark)
        await mqtt.wait(layout.power(dom.UUIDString()), "ON", after=mark)


# 4. Commands

async def test_the_switch_and_the_buttons_act_on_the_domain(bridged: Bridged) -> None:
    layout, mqtt = bridged.layout, bridged.mqtt
    mark = mqtt.mark()
    await command(bridged, WIN11, "ON")
    await mqtt.wait(layout.state(WIN11), "running", after=mark)
    await command(bridged, WIN11, "OFF")  # the test driver stops at once on a shutdown
    await mqtt.wait(layout.state(WIN11), "shut off", after=mark)
    # By name too, where the name is one topic level.
    mark = mqtt.mark()
    await command(bridged, "win11", "ON")
    await mqtt.wait(layout.state(WIN11), "running", after=mark)
    await command(bridged, WIN11, "FORCE_OFF")
    await mqtt.wait(layout.state(WIN11), "shut off", after=mark)
    # On a shut-off domain libvirt refuses a reboot: the REST action's 409, on the error topic.
    await command(bridged, WIN11, "REBOOT")
    refused = await error_after(bridged, WIN11, mark)
    assert refused == {**refused, "action": "reboot", "status": 409, "error": "wrong_state"}


async def test_reboot_and_reset_go_through_libvirt(bridged: Bridged,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The test driver sends no event on either: the action's log line says it was done."""
    caplog.set_level("INFO", "webvirt.api_domains")
    for payload, action, said in [("REBOOT", "reboot", "rebooting"), ("RESET", "reset", "reset")]:
        await command(bridged, LINUX, payload)
        await until(lambda a=action, s=said: f"{a} linux-dev: {s}" in caplog.text, 5,
                    f"{action} done")


async def test_a_busy_domain_an_unknown_one_and_bad_payloads_are_errors(
        bridged: Bridged) -> None:
    layout, mqtt, client = bridged.layout, bridged.mqtt, bridged.client
    host = client.app[HOST]
    mark = mqtt.mark()
    with host.exclusive(await host.resolve("win11")):
        await command(bridged, WIN11, "ON")
        busy = await error_after(bridged, WIN11, mark)
    assert busy == {"action": "start", "error": "operation_in_progress", "status": 409,
                    "message": "another operation on domain 'win11' is in progress"}
    for ref in ("no-such-vm", "00000000-0000-0000-0000-000000000000"):
        mark = mqtt.mark()
        await command(bridged, ref, "ON")
        unknown = await error_after(bridged, ref, mark)
        assert unknown == {**unknown, "action": "start", "status": 404}
    for payload in (b"BANANA", b"", b"x" * 1_000_000, b"\xff\xfe\x00ON", b"on", b"ON" * 40):
        mark = mqtt.mark()
        await command(bridged, WIN11, payload)
        bad = await error_after(bridged, WIN11, mark)
        assert bad == {**bad, "action": None, "error": "bad_command", "status": 400}
        assert len(bad["message"]) < 200
    # The bridge still obeys.
    mark = mqtt.mark()
    await command(bridged, WIN11, "ON")
    await mqtt.wait(layout.state(WIN11), "running", after=mark)
    assert await (await client.get("/api/0/state/win11")).json() == "running"


async def test_a_retained_command_is_not_obeyed(make_client: ClientFactory,
                                                broker: Broker) -> None:
    """A command left on the broker would be obeyed again at every reconnect."""
    layout = fresh_layout()
    async with Subscriber(broker.port, f"{layout.prefix}/#") as mqtt:
        await mqtt.publish(layout.command(WIN11), "ON", retain=True)
        client = await make_client(mqtt=settings_for(broker, layout))
        await mqtt.wait(layout.status, "online")
        # Messages come in order: once a later command is answered, the retained one was seen.
        mark = mqtt.mark()
        await mqtt.publish(layout.command(WIN11), "nonsense")
        await mqtt.wait(layout.error(WIN11), lambda _: True, after=mark)
        assert await (await client.get("/api/0/state/win11")).json() == "shut off"
        # Removed from the broker: it comes at no later connect.
        await mqtt.wait(layout.command(WIN11), b"")


# 5. The broker goes away and comes back

async def test_a_broker_restart_gets_discovery_and_states_again(
        make_client: ClientFactory, tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker")
    broker.start()
    layout = fresh_layout()
    try:
        async with Subscriber(broker.port, f"{layout.prefix}/#") as mqtt:
            client = await make_client(mqtt=settings_for(broker, layout))
            await mqtt.wait(layout.status, "online")
        broker.stop()
        # HTTP is served meanwhile, and a change while the broker is away is not lost.
        assert (await client.get("/api/0/start/win11")).status == 200
        assert (await client.get("/api/0/domains")).status == 200
        broker.start()  # same port, no persistence: it knows nothing
        async with Subscriber(broker.port, f"{layout.prefix}/#",
                              f"{layout.discovery_prefix}/#") as mqtt:
            state = await mqtt.wait(layout.state(WIN11), "running", seconds=10)
            assert state.retain or mqtt.messages[0].topic != layout.state(WIN11)
            await mqtt.wait(layout.status, "online")
            await mqtt.wait(layout.config("switch", WIN11, "power"), lambda p: bool(p))
        # Retained: a subscriber that comes later gets it from the broker at once.
        async with Subscriber(broker.port, layout.state(WIN11)) as late:
            assert (await late.wait(layout.state(WIN11), "running")).retain
    finally:
        broker.stop()


async def test_webvirt_starts_while_the_broker_is_down(make_client: ClientFactory,
                                                      tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker")  # not started yet
    layout = fresh_layout()
    client = await make_client(mqtt=settings_for(broker, layout))
    assert (await client.get("/api/0/state/win11")).status == 200
    broker.start()
    try:
        async with Subscriber(broker.port, f"{layout.prefix}/#") as mqtt:
            await mqtt.wait(layout.status, "online", seconds=10)
            await mqtt.wait(layout.state(LINUX), "running")
    finally:
        broker.stop()


async def test_webvirt_stops_just_after_the_broker(make_client: ClientFactory,
                                                  tmp_path: Path) -> None:
    """The bridge, cancelled while its lost connection was being wound up, went on
    reconnecting for ever: the end of its reader (an MqttError) replaced the cancel, and
    shutdown waited for it."""
    broker = Broker(tmp_path / "broker")
    broker.start()
    layout = fresh_layout()
    try:
        async with Subscriber(broker.port, layout.status) as mqtt:
            client = await make_client(mqtt=settings_for(broker, layout))
            await mqtt.wait(layout.status, "online")
    finally:
        broker.stop()
    # Not asyncio.timeout: the swallowed cancel was its own too, and close() "ended" at 10 s.
    closing = asyncio.create_task(client.close())
    done, _ = await asyncio.wait([closing], timeout=5)
    assert done == {closing}, "webvirt did not stop"


# 6. Domains defined and undefined

EVIL_NAME = "évil +#name"  # libvirt refuses only "/"


async def test_a_defined_domain_appears_and_an_undefined_one_goes(bridged: Bridged) -> None:
    layout, mqtt, host = bridged.layout, bridged.mqtt, bridged.client.app[HOST]
    uuid = "6b1e5c2a-0d7e-4c55-9a52-3f1d0a9c4444"
    xml = (f"<domain type='test'><name>{EVIL_NAME}</name><uuid>{uuid}</uuid>"
           "<memory>1024</memory><os><type>hvm</type></os></domain>")
    mark = mqtt.mark()
    await host.call(lambda conn: conn.defineXML(xml))
    topics = [layout.config(component, uuid, object_id) for component, object_id in OBJECTS]
    for topic in topics:
        await mqtt.wait(topic, lambda p: bool(p), after=mark)
    assert config(mqtt, topics[0])["device"]["name"] == EVIL_NAME
    assert mqtt.last(layout.state(uuid)) == b"shut off"
    mark = mqtt.mark()
    await host.call(lambda conn: conn.lookupByUUIDString(uuid).undefine())
    for topic in [*topics, layout.state(uuid), layout.power(uuid)]:
        assert (await mqtt.wait(topic, b"", after=mark)).payload == b""


# 7. Home Assistant starts

async def test_home_assistant_online_gets_discovery_again(bridged: Bridged) -> None:
    layout, mqtt = bridged.layout, bridged.mqtt
    topic = layout.config("switch", WIN11, "power")
    mark = mqtt.mark()
    await mqtt.publish(layout.home_assistant_status, "offline")
    await mqtt.publish(layout.home_assistant_status, "online")
    again = await mqtt.wait(topic, lambda p: bool(p), after=mark)
    assert json.loads(again.payload)["unique_id"] == f"{layout.prefix}_{WIN11}_power"
    await mqtt.wait(layout.state(MEDIA), "paused by user", after=mark)


# 8. USB rules

async def test_a_usb_rule_is_a_binary_sensor_driven_by_the_reconciler(bridged: Bridged) -> None:
    layout, mqtt, client = bridged.layout, bridged.mqtt, bridged.client
    response = await client.post("/api/0/rules", json={
        "domain": "win11", "match": {"vendor_id": "046d", "product_id": "c52b"}})
    assert response.status == 201
    rule = (await response.json())["id"]
    topic = layout.rule_config_topic(WIN11, rule)
    await mqtt.wait(topic, lambda p: bool(p))
    sensor = config(mqtt, topic)
    assert sensor == {**sensor, "state_topic": layout.attached(WIN11, rule), "payload_on": "ON",
                      "payload_off": "OFF", "unique_id": f"{layout.prefix}_{WIN11}_usb_rule_{rule}",
                      "availability_mode": "all"}
    assert sensor["device"]["identifiers"] == [f"{layout.prefix}_{WIN11}"]
    await mqtt.wait(layout.attached(WIN11, rule), "OFF")
    # The test driver refuses every attach, so the reconciler never says "ok" by itself: say it
    # as it would (the USB lab tests that it does).
    mark = mqtt.mark()
    client.app[EVENT_HUB].publish("rule", rule=rule, domain="win11", uuid=WIN11,
                                  device="usb_1_4", address="1:4", action="attach", result="ok")
    await mqtt.wait(layout.attached(WIN11, rule), "ON", after=mark)
    # win11 starts: the reconciler tries, libvirt refuses, the rule gives up and says so.
    mark = mqtt.mark()
    assert (await client.get("/api/0/start/win11")).status == 200
    await mqtt.wait(layout.attached(WIN11, rule), "OFF", seconds=15, after=mark)
    # Deleted: its entity goes.
    mark = mqtt.mark()
    assert (await client.delete(f"/api/0/rules/{rule}")).status == 204
    await mqtt.wait(topic, b"", after=mark)


# 9. libvirt away, and several hosts

async def test_domains_are_unavailable_while_their_libvirt_host_is_away(
        bridged: Bridged, monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker is fine but webvirt has lost libvirt: Home Assistant must not show the last
    known states as current (availability_mode all: webvirt's and the host's topic)."""
    layout, mqtt, host = bridged.layout, bridged.mqtt, bridged.client.app[HOST]
    host_status = layout.host_status("local")
    await mqtt.wait(host_status, "online")
    mark = mqtt.mark()
    monkeypatch.setattr(host_module, "RECONNECT_DELAYS_S", (0.5,))
    with pytest.raises(ApiError):  # a call past its time retires the session
        await host.call(lambda _conn: time.sleep(0.3), seconds=0.05)
    await mqtt.wait(host_status, "offline", after=mark)
    await until(lambda: mqtt.last(host_status) == b"online", 10, "online again on reconnect")
    assert mqtt.last(layout.status) == b"online"  # webvirt itself never went away


async def test_several_hosts_have_devices_of_their_own(make_client: ClientFactory,
                                                       broker: Broker) -> None:
    """Two hosts with the same domains (copies: same names, same UUIDs) give two devices per
    domain, keyed HOST-UUID, and a command acts on its own host only."""
    layout = fresh_layout()
    async with Subscriber(broker.port, f"{layout.prefix}/#",
                          f"{layout.discovery_prefix}/#") as mqtt:
        client = await make_client(mqtt=settings_for(broker, layout),
                                   hosts=(HostSpec("a", DEMO_HOST_URI),
                                          HostSpec("b", DEMO_HOST_URI)))
        await mqtt.wait(layout.status, "online")
        for name in "ab":
            key = f"{name}-{WIN11}"
            await mqtt.wait(layout.state(key), "shut off")
            switch = config(mqtt, layout.config("switch", key, "power"))
            assert switch["unique_id"] == f"{layout.prefix}_{key}_power"
            assert switch["availability"][1]["topic"] == layout.host_status(name)
            assert mqtt.last(layout.host_status(name)) == b"online"
        assert mqtt.last(layout.state(WIN11)) is None  # no topic without its host

        several = Bridged(client, mqtt, layout, broker.port)
        await command(several, f"b-{WIN11}", "ON")
        await mqtt.wait(layout.state(f"b-{WIN11}"), "running")
        assert await (await client.get("/api/0/state/win11@a")).json() == "shut off"
        assert mqtt.last(layout.state(f"a-{WIN11}")) == b"shut off"
        # A name that two hosts have is ambiguous; NAME@HOST is not.
        mark = mqtt.mark()
        await command(several, "win11", "ON")
        error = await error_after(several, "win11", mark)
        assert (error["status"], error["error"]) == (409, "ambiguous_domain")
        await command(several, "win11@a", "ON")
        await mqtt.wait(layout.state(f"a-{WIN11}"), "running")


# 10. What the review found

def test_overlapping_prefixes_and_url_mistakes_are_refused(tmp_path: Path) -> None:
    def refused(url: str, prefix: str = "webvirt", discovery: str = "homeassistant",
                env: dict[str, str] | None = None, ca: Path | None = None) -> str:
        with pytest.raises(MqttUrlError) as caught:
            mqtt_settings(url, prefix, discovery, env or {}, ca)
        return str(caught.value)

    # The bridge would take its own status for Home Assistant's birth, and loop.
    for prefix, discovery in [("ha", "ha"), ("ha/webvirt", "ha"), ("ha", "ha/x")]:
        assert "overlap" in refused("mqtt://broker", prefix, discovery)
    assert mqtt_settings("mqtt://broker", "hab", "ha", {}).prefix == "hab"
    assert "1 to 65535" in refused("mqtt://broker:0")
    assert "needs a user" in refused("mqtt://:pw@broker")
    assert "needs a user" in refused("mqtt://broker", env={"WEBVIRT_MQTT_PASSWORD": "pw"})
    for url in ("mqtt://u:pa#ss@broker", "mqtt://u:pa/ss@broker", "mqtt://u:pa?ss@broker"):
        assert "percent-encode" in refused(url)
    assert mqtt_settings("mqtt://u:pa%23ss@broker", "w", "h", {}).password == "pa#ss"
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    assert "mqtts://" in refused("mqtt://broker", ca=ca)
    assert "not a file" in refused("mqtts://broker", ca=tmp_path / "missing.pem")
    assert mqtt_settings("mqtts://broker", "w", "h", {}, ca).ca_file == ca


async def test_own_status_is_never_home_assistants_birth(
        make_client: ClientFactory, broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    """With one prefix for both (refused by the command line, not by MqttSettings), the
    bridge's own PREFIX/status "online" is on Home Assistant's birth topic."""
    caplog.set_level("DEBUG", "webvirt.mqtt_bridge")
    tag = secrets.token_hex(3)
    layout = Layout(f"same{tag}", f"same{tag}")
    async with Subscriber(broker.port, f"{layout.prefix}/#") as mqtt:
        await make_client(mqtt=settings_for(broker, layout))
        await mqtt.wait(layout.status, "online")
        # In order: the bridge got its own "online" back before this command.
        mark = mqtt.mark()
        await mqtt.publish(layout.command(WIN11), "nonsense")
        await mqtt.wait(layout.error(WIN11), lambda _: True, after=mark)
    assert "Home Assistant is online" not in caplog.text


async def test_a_burst_of_births_is_one_publish(bridged: Bridged) -> None:
    layout, mqtt = bridged.layout, bridged.mqtt
    switch = layout.config("switch", WIN11, "power")
    mark = mqtt.mark()
    await asyncio.gather(*(mqtt.publish(layout.home_assistant_status, "online")
                           for _ in range(30)))
    # Commands come in order: once this one is answered, every birth was read.
    await command(bridged, WIN11, "nonsense")
    await error_after(bridged, WIN11, mark)
    await mqtt.wait(switch, lambda p: bool(p), after=mark)
    # Published behind any re-publish already asked for.
    assert (await bridged.client.get("/api/0/start/win11")).status == 200
    await mqtt.wait(layout.state(WIN11), "running", after=mark)
    assert [m.topic for m in mqtt.messages[mark:]].count(switch) == 1


def usb_hostdev(bus: int, device: int, vendor: str, product: str) -> str:
    return (f"<hostdev mode='subsystem' type='usb' managed='yes'><source>"
            f"<vendor id='0x{vendor}'/><product id='0x{product}'/>"
            f"<address bus='{bus}' device='{device}'/></source></hostdev>")


def holding_host(tmp_path: Path) -> str:
    """The demo host where linux-dev (running) holds the Unifying Receiver (1:4), and win11
    (shut off) will hold the Apex keyboard (1:5) once it starts: passed through as libvirt
    starts them, not by webvirt, so no rule event says so."""
    xml = (REPO / "demo" / "host.xml").read_text()
    xml = xml.replace("<vcpu>4</vcpu>", "<vcpu>4</vcpu><devices>"
                      f"{usb_hostdev(1, 4, '046d', 'c52b')}</devices>", 1)
    xml = xml.replace("</hostdev>\n    </devices>", "</hostdev>\n"
                      f"{usb_hostdev(1, 5, '1038', '0024')}</devices>", 1)
    path = tmp_path / "holding.xml"
    path.write_text(xml)
    return f"test://{path}"


async def test_a_device_the_vm_held_already_is_on(make_client: ClientFactory, broker: Broker,
                                                 tmp_path: Path) -> None:
    """The sensor followed the rule events since webvirt started: a device the VM held
    already (attached before webvirt started, or while libvirt was away) was OFF for good.
    It says what the USB reconciler reads the VM holds."""
    layout = fresh_layout()
    async with Subscriber(broker.port, f"{layout.prefix}/#") as mqtt:
        client = await make_client(uri=holding_host(tmp_path), mqtt=settings_for(broker, layout))
        await mqtt.wait(layout.status, "online")
        rule = await add_rule(client, "linux-dev")
        await mqtt.wait(layout.attached(LINUX, rule), "ON")


async def test_a_rule_made_before_webvirt_started_is_on_for_a_device_held_already(
        make_client: ClientFactory, broker: Broker, tmp_path: Path) -> None:
    """The reconciler's first pass can come before the bridge has its rules (or exists): what
    it read is applied once they are loaded, not at the pass 30 s later."""
    uri, state = holding_host(tmp_path), tmp_path / "kept"
    first = await make_client(uri=uri, state_dir=state)
    rule = await add_rule(first, "linux-dev")
    await first.close()
    layout = fresh_layout()
    async with Subscriber(broker.port, f"{layout.prefix}/#") as mqtt:
        await make_client(uri=uri, state_dir=state, mqtt=settings_for(broker, layout))
        await mqtt.wait(layout.attached(LINUX, rule), "ON")


async def test_changes_while_the_broker_is_away_are_published_on_reconnect(
        make_client: ClientFactory, tmp_path: Path) -> None:
    """The model follows libvirt while the broker is away: the device of a domain destroyed
    meanwhile is OFF, that of one started meanwhile ON."""
    broker = Broker(tmp_path / "broker")
    broker.start()
    layout = fresh_layout()
    try:
        async with Subscriber(broker.port, f"{layout.prefix}/#") as mqtt:
            client = await make_client(uri=holding_host(tmp_path),
                                       mqtt=settings_for(broker, layout))
            linux_rule = await add_rule(client, "linux-dev")
            win11_rule = await add_rule(client, "win11", "1038", "0024")
            await mqtt.wait(layout.attached(LINUX, linux_rule), "ON")
            await mqtt.wait(layout.attached(WIN11, win11_rule), "OFF")
        broker.stop()
        assert (await client.get("/api/0/destroy/linux-dev")).status == 200
        assert (await client.get("/api/0/start/win11")).status == 200
        broker.start()
        async with Subscriber(broker.port, f"{layout.prefix}/#") as mqtt:
            await mqtt.wait(layout.status, "online", seconds=10)
            await mqtt.wait(layout.attached(LINUX, linux_rule), "OFF")
            await mqtt.wait(layout.attached(WIN11, win11_rule), "ON")
    finally:
        broker.stop()


async def add_rule(client: TestClient, domain: str, vendor_id: str = "046d",
                   product_id: str = "c52b") -> int:
    response = await client.post("/api/0/rules", json={
        "domain": domain, "match": {"vendor_id": vendor_id, "product_id": product_id}})
    assert response.status == 201
    rule: int = (await response.json())["id"]
    return rule


def attach(hub: Any, rule: int, domain: str, uuid: str, address: str,
           result: str = "ok") -> None:
    """What the reconciler says after an attach (the test driver refuses every real one)."""
    hub.publish("rule", rule=rule, domain=domain, uuid=uuid, device="usb_x", address=address,
                action="attach", result=result)


async def test_a_rule_with_several_devices_is_on_while_one_is_attached(
        bridged: Bridged) -> None:
    layout, mqtt, hub = bridged.layout, bridged.mqtt, bridged.client.app[EVENT_HUB]
    rule = await add_rule(bridged.client, "linux-dev")
    topic = layout.attached(LINUX, rule)
    await mqtt.wait(topic, "OFF")
    mark = mqtt.mark()
    attach(hub, rule, "linux-dev", LINUX, "9:1")
    attach(hub, rule, "linux-dev", LINUX, "9:2")
    await mqtt.wait(topic, "ON", after=mark)
    mark = mqtt.mark()
    hub.publish("node-device-removed", device="usb_x", device_type="usb", address="9:2")
    attach(hub, rule, "linux-dev", LINUX, "9:3", result="error")  # another device
    # What is published says the model after both (9:1 is still attached).
    assert (await mqtt.wait(topic, lambda _: True, after=mark)).payload == b"ON"
    hub.publish("node-device-removed", device="usb_x", device_type="usb", address="9:1")
    await mqtt.wait(topic, "OFF", after=mark)


async def test_a_rename_keeps_the_entities(bridged: Bridged) -> None:
    """Removing them would make Home Assistant drop their entity ids and settings."""
    layout, mqtt, host = bridged.layout, bridged.mqtt, bridged.client.app[HOST]
    switch = layout.config("switch", WIN11, "power")
    mark = mqtt.mark()
    await host.call(lambda conn: conn.lookupByUUIDString(WIN11).rename("win12", 0))
    renamed = await mqtt.wait(switch, lambda p: b'"win12"' in p, after=mark)
    assert json.loads(renamed.payload)["device"]["name"] == "win12"
    assert b"" not in [m.payload for m in mqtt.messages[mark:]]


async def retained(port: int, *topics: str) -> dict[str, bytes]:
    """The retained messages on these topics, non-empty: all of them, as the broker sends a
    subscription's retained messages before a later message (a marker to ourselves)."""
    marker = f"echo/{secrets.token_hex(4)}"
    async with Subscriber(port, *topics, marker) as late:
        await late.publish(marker, "marker")
        await late.wait(marker, "marker")
        return {m.topic: m.payload for m in late.messages if m.retain and m.payload}


def persistent_broker(directory: Path) -> Broker:
    """As Home Assistant's Mosquitto add-on: retained messages survive a restart."""
    broker = Broker(directory)
    broker.config.write_text(broker.config.read_text().replace(
        "persistence false", f"persistence true\npersistence_location {directory}/"))
    return broker


async def test_what_went_while_webvirt_was_away_is_removed(
        make_client: ClientFactory, tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker")
    broker.start()
    layout = fresh_layout()
    everything = (f"{layout.prefix}/#", f"{layout.discovery_prefix}/#")
    try:
        async with Subscriber(broker.port, layout.status) as mqtt:
            client = await make_client(mqtt=settings_for(broker, layout))
            rule = await add_rule(client, "win11")
            await mqtt.wait(layout.status, "online")
        async with Subscriber(broker.port, layout.rule_config_topic(WIN11, rule)) as seen:
            await seen.wait(layout.rule_config_topic(WIN11, rule), lambda p: bool(p))
        await client.close()
        # Next start: a host without win11 (test:///default has one domain, "test").
        async with Subscriber(broker.port, layout.status) as mqtt:
            await make_client(uri="test:///default", mqtt=settings_for(broker, layout))
            await mqtt.wait(layout.status, "online")
        left = await retained(broker.port, *everything)
        assert not [topic for topic in left if WIN11 in topic], left
        assert layout.config("switch", await asyncio.to_thread(default_test_uuid),
                             "power") in left
    finally:
        broker.stop()


async def test_a_rule_deleted_while_the_broker_was_away_is_removed(
        make_client: ClientFactory, tmp_path: Path) -> None:
    broker = persistent_broker(tmp_path / "broker")
    broker.start()
    layout = fresh_layout()
    try:
        async with Subscriber(broker.port, f"{layout.discovery_prefix}/#") as mqtt:
            client = await make_client(mqtt=settings_for(broker, layout))
            rule = await add_rule(client, "win11")
            await mqtt.wait(layout.rule_config_topic(WIN11, rule), lambda p: bool(p))
        broker.stop()
        assert (await client.delete(f"/api/0/rules/{rule}")).status == 204
        broker.start()
        async with Subscriber(broker.port, layout.status) as mqtt:
            await mqtt.wait(layout.status, "online", seconds=10)
        left = await retained(broker.port, f"{layout.prefix}/#", f"{layout.discovery_prefix}/#")
        assert not [topic for topic in left if "rule" in topic], left
        assert layout.config("switch", WIN11, "power") in left
    finally:
        broker.stop()


async def test_a_command_flood_is_a_few_lines_and_told_on_the_error_topic(
        bridged: Bridged, caplog: pytest.LogCaptureFixture) -> None:
    layout, mqtt = bridged.layout, bridged.mqtt
    caplog.set_level("WARNING")
    mark = mqtt.mark()
    # libvirt busy for a while: the commands (force off takes no lock) pile up behind it.
    host = bridged.client.app[HOST]
    busy = asyncio.create_task(host.call(lambda _conn: time.sleep(1)))
    flood = aiomqtt.Client("127.0.0.1", bridged.mqtt_port, max_inflight_messages=1000,
                           logger=logging.getLogger("tests.flood"))
    async with flood:
        await asyncio.gather(*(flood.publish(layout.command(WIN11), "FORCE_OFF", qos=1)
                               for _ in range(2000)))
    dropped = await mqtt.wait(layout.error(WIN11), lambda p: b"too_many" in p, after=mark)
    assert json.loads(dropped.payload)["status"] == 503
    await busy

    async def answered() -> bool:  # in order: once answered, the flood was read
        await command(bridged, LINUX, "nonsense")
        return any(m.topic == layout.error(LINUX) for m in mqtt.messages[mark:])

    await until(answered, 10, "a command after the flood answered")
    lines = [r for r in caplog.records
             if r.name.startswith("webvirt.mqtt_bridge") and r.levelno >= logging.WARNING]
    assert 0 < len(lines) < 10, [r.getMessage() for r in lines]


async def test_no_log_line_holds_the_mqtt_password(tmp_path: Path) -> None:
    """A short password ("test") is not redacted either: redacting it would garble every line
    that happens to hold it, and say what it is."""
    broker = Broker(tmp_path / "broker", credentials=("hass", "test"))
    broker.start()
    port = free_port()
    layout = fresh_layout()
    process = spawn_webvirt(
        "test:///default", port, "--log-level", "debug",
        "--mqtt", f"mqtt://hass:test@127.0.0.1:{broker.port}", "--mqtt-prefix", layout.prefix,
        "--mqtt-discovery-prefix", layout.discovery_prefix, state_dir=tmp_path / "state")
    try:
        async with Subscriber(broker.port, layout.status, credentials=("hass", "test")) as mqtt:
            await mqtt.wait(layout.status, "online", seconds=10)
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(process.communicate, timeout=10)
    finally:
        process.kill()
        broker.stop()
    assert "test:///default" in stderr and "MQTT: connected" in stderr
    assert "***" not in stderr and "hass:test" not in stderr and "mqtt://" not in stderr


async def test_refused_credentials_are_a_warning_after_a_reconnect(
        make_client: ClientFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker's password changed while webvirt was connected: the refusal that follows a
    lost connection must show at the default log level."""
    monkeypatch.setattr(mqtt_bridge, "RECONNECT_DELAYS_S", (0.2,))
    caplog.set_level("WARNING", "webvirt.mqtt_bridge")
    broker = Broker(tmp_path / "broker", credentials=("hass", "old"))
    broker.start()
    layout = fresh_layout()
    settings = MqttSettings("127.0.0.1", broker.port, username="hass", password="old",
                            prefix=layout.prefix, discovery_prefix=layout.discovery_prefix)
    try:
        async with Subscriber(broker.port, layout.status, credentials=("hass", "old")) as mqtt:
            await make_client(mqtt=settings)
            await mqtt.wait(layout.status, "online")
        broker.stop()
        await asyncio.to_thread(subprocess.run, ["mosquitto_passwd", "-b",
                                str(tmp_path / "broker" / "passwords"), "hass", "new"],
                                check=True, capture_output=True)
        broker.start()
        await until(lambda: "refused webvirt's credentials" in caplog.text, 10, "a warning")
        assert "Not authorized" in caplog.text
    finally:
        broker.stop()


# 11. Cancellation

async def test_a_cancel_that_comes_as_a_publish_completes_is_not_lost() -> None:
    """aiomqtt waits for a PUBACK with asyncio.wait_for, which on Python 3.11 drops a cancel
    that comes as the wait completes: the bridge's publishing task then went on, and a
    shutdown or a reconnect waited for it forever (1 run in 6 of one test hung)."""
    acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    after: list[str] = []

    async def publishing() -> None:
        await mqtt_bridge.finished(asyncio.wait_for(acked, timeout=10))  # as aiomqtt waits
        after.append("went on")
        await asyncio.Event().wait()  # the next change that never comes

    task = asyncio.create_task(publishing())
    await asyncio.sleep(0)  # waiting for the PUBACK
    acked.set_result(None)  # the PUBACK arrives...
    task.cancel()  # ...as the bridge is told to stop
    done, _ = await asyncio.wait([task], timeout=2)
    assert done == {task} and task.cancelled()
    assert after == []


# 12. mqtts://

# paho closes no socket whose TLS handshake failed (paho/mqtt/client.py, _ssl_wrap_socket): it
# is closed, with a ResourceWarning, once the error that holds it is freed, at each attempt.
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <ssl.SSLSocket:pytest.PytestUnraisableExceptionWarning")
async def test_mqtts_trusts_the_ca_it_is_given_and_no_other(
        make_client: ClientFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A home broker's certificate is usually signed by a CA of its own: without --mqtt-ca,
    webvirt must refuse it (and say why); with it, talk to the broker over TLS."""
    broker = Broker(tmp_path / "broker", tls=True)
    broker.start()
    assert broker.tls_port is not None and broker.ca_file is not None
    layout = fresh_layout()
    untrusted = MqttSettings("127.0.0.1", broker.tls_port, tls=True, prefix=layout.prefix,
                             discovery_prefix=layout.discovery_prefix)
    try:
        async with Subscriber(broker.port, f"{layout.prefix}/#") as mqtt:  # the plain listener
            client = await make_client(mqtt=untrusted)
            await until(lambda: "give the CA that signed it with --mqtt-ca" in caplog.text,
                        10, "the untrusted certificate refused")
            await client.close()
            assert mqtt.last(layout.status) is None
            await make_client(mqtt=dataclasses.replace(untrusted, ca_file=broker.ca_file))
            await mqtt.wait(layout.status, "online", seconds=10)
            await mqtt.wait(layout.state(LINUX), "running")
    finally:
        broker.stop()


# 13. What the broker holds is not to be trusted

GONE = "6b1e5c2a-0d7e-4c55-9a52-3f1d0a9c9999"  # a VM undefined while webvirt was away


async def test_a_bad_retained_inventory_is_dropped_and_the_rest_used(
        make_client: ClientFactory, broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    """Anyone who may publish under the prefix could retain an inventory naming "+": the
    bridge published to webvirt/+/state at every connect, aiomqtt refused it, and the bridge
    reconnected for ever (no status, no states, no commands)."""
    caplog.set_level("INFO", "webvirt.mqtt_bridge")
    layout = fresh_layout()
    bad = {"domains": {"+": "local", "#": "local", "a/b": "local", "": "local", "x\0": "local",
                       f"a-{GONE}": 7, f"b-{GONE}": "+", GONE: "local", f"old-{GONE}": "old"},
           "rules": [["+", 1], [GONE, "2"], [GONE, True], [GONE, 2**70], [GONE, 3]]}
    async with Subscriber(broker.port, f"{layout.prefix}/#",
                          f"{layout.discovery_prefix}/#") as mqtt:
        await mqtt.publish(layout.inventory, json.dumps(bad), retain=True)
        await make_client(mqtt=settings_for(broker, layout))
        await mqtt.wait(layout.status, "online")
        await mqtt.wait(layout.config("switch", WIN11, "power"), lambda p: bool(p))
        await mqtt.wait(layout.state(LINUX), "running")
        # Its valid entries are used: what they list and is gone is removed.
        for topic in (layout.config("switch", GONE, "power"), layout.state(GONE),
                      layout.rule_config_topic(GONE, 3),
                      layout.config("switch", f"old-{GONE}", "power")):
            await mqtt.wait(topic, b"")
        # Cleaned on the broker: the next connect finds nothing to drop.
        await mqtt.wait(layout.inventory, lambda p: json.loads(p or "null") == {
            "domains": {uuid: "local" for uuid in sorted(DEMO)}, "rules": []})
        mark = mqtt.mark()
        await mqtt.publish(layout.command(WIN11), "ON")
        await mqtt.wait(layout.state(WIN11), "running", after=mark)
    lines = [r for r in caplog.records if r.name.startswith("webvirt.mqtt_bridge")]
    warnings = [r.getMessage() for r in lines if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "'+'" in warnings[0] and "'x\\x00'" in warnings[0], warnings
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in lines].count(
        f"MQTT: connected to 127.0.0.1:{broker.port} (topics under {layout.prefix}/)") == 1


def test_an_inventory_keeps_only_what_webvirt_can_have_written() -> None:
    several = f"a.b_c-{WIN11}"
    good = {"domains": {WIN11: "local", several: "a.b_c"},
            "rules": [[WIN11, 1], [several, 2**63 - 1]]}
    inventory, dropped = Inventory.load(json.dumps(good).encode())
    assert inventory == Inventory(good["domains"], {(WIN11, 1), (several, 2**63 - 1)})
    assert dropped == [] and Inventory.load(inventory.payload().encode()) == (inventory, [])
    # What no webvirt makes: no topic level, or not a key (UUID, HOST-UUID) at all.
    keys = ["+", "#", "/", "", "\0", "x" * 10_000, WIN11.upper(), WIN11[:-1], f"{WIN11}/x",
            f"+-{WIN11}", f"{'h' * 65}-{WIN11}", f"a/b-{WIN11}"]
    mixed = {"domains": {**dict.fromkeys(keys, "local"), WIN11: "local", LINUX: 7,
                         MEDIA: "+", GONE: None},
             "rules": [*([key, 1] for key in keys),
                       *([GONE, rule] for rule in ("1", True, 0, -1, 2**63, 1.0, None)),
                       [GONE], [GONE, 1, 2], "x", None, {}, [GONE, 5]]}
    inventory, dropped = Inventory.load(json.dumps(mixed).encode())
    assert inventory == Inventory({WIN11: "local"}, {(GONE, 5)})
    assert len(dropped) == 2 * len(keys) + 3 + 7 + 5
    assert all(len(what) < 100 for what in dropped), dropped
    # Not an inventory at all: nothing is used, and that is said.
    for payload in (b"[" * 100_000, b"\xff", b"null", b"[]", b'{"domains": [], "rules": {}}'):
        inventory, dropped = Inventory.load(payload)
        assert inventory == Inventory() and dropped, payload[:20]
    assert Inventory.load(b"") == (Inventory(), [])  # a removed inventory: nothing to say


async def test_a_command_topic_too_long_for_its_error_topic_is_ignored(
        bridged: Bridged, caplog: pytest.LogCaptureFixture) -> None:
    """PREFIX/REF/error is two bytes longer than PREFIX/REF/set: for the longest topic there
    is, publishing the error failed in the command's task (ValueError, a traceback)."""
    layout, mqtt = bridged.layout, bridged.mqtt
    longest = "x" * (65535 - len(layout.command("")))
    mark = mqtt.mark()
    await command(bridged, longest, "nonsense")
    # In order: once a later command is answered, the long one was read.
    await command(bridged, WIN11, "nonsense")
    await error_after(bridged, WIN11, mark)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_a_command_retained_while_webvirt_is_connected_is_not_obeyed(
        bridged: Bridged, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """MQTT 3.1.1 gives a message published with retain to the subscribers already there
    without the flag: the bridge took a retained command for a live one, and obeyed it."""
    # A fresh throttle: another test's line within LOG_EVERY_S would hold this one back.
    monkeypatch.setattr(mqtt_bridge.command_log, "filters",
                        [Throttled(mqtt_bridge.LOG_EVERY_S)])
    caplog.set_level("WARNING", "webvirt.mqtt_bridge")
    layout, mqtt, client = bridged.layout, bridged.mqtt, bridged.client
    host = client.app[HOST]
    mark = mqtt.mark()
    # A start the bridge tried would be refused at once (409), on the error topic, in order.
    with host.exclusive(await host.resolve("win11")):
        await mqtt.publish(layout.command(WIN11), "ON", retain=True)
        await command(bridged, WIN11, "REBOOT")
        refused = await error_after(bridged, WIN11, mark)
    assert (refused["action"], refused["error"]) == ("reboot", "operation_in_progress")
    assert "ignored a retained command" in caplog.text
    # Removed from the broker (so that it comes at no later connect), and not obeyed.
    await mqtt.wait(layout.command(WIN11), b"", after=mark)
    assert layout.command(WIN11) not in await retained(bridged.mqtt_port, layout.command(WIN11))
    assert await (await client.get("/api/0/state/win11")).json() == "shut off"
    # The bridge still listens.
    await command(bridged, WIN11, "ON")
    await mqtt.wait(layout.state(WIN11), "running", after=mark)
