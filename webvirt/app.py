"""The application: every route in one table, what the app owns, its start-up and clean-up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from functools import partial

from aiohttp import web
from aiohttp_apigami import docs

from webvirt import __version__, connection_limits
from webvirt.api_devices import attach, detach, domain_devices, host_devices, list_templates, toggle
from webvirt.api_domains import (
    destroy,
    get_state,
    list_domains,
    power,
    reboot,
    reset,
    resume,
    shutdown,
    start,
    status,
    suspend,
)
from webvirt.api_events import events
from webvirt.api_hosts import list_hosts
from webvirt.api_metrics import metrics
from webvirt.api_rules import (
    create_rule,
    delete_rule,
    get_rule,
    list_rules,
    publish_change,
    replace_rule,
)
from webvirt.appkeys import (
    EVENT_HUB,
    HOST,
    HOSTS,
    METRICS,
    MQTT_BRIDGE,
    RULES,
    SETTINGS,
    TEMPLATES,
    USAGE,
    USB_RECONCILER,
    USB_RECONCILERS,
)
from webvirt.config import Settings
from webvirt.deadline import Budgets
from webvirt.hosts import Hosts, HostSpec, default_name
from webvirt.hub import EventHub
from webvirt.metrics import Metrics
from webvirt.middlewares import answers, streams
from webvirt.mqtt_bridge import MqttBridge
from webvirt.openapi import setup_openapi
from webvirt.rules_store import RuleStore
from webvirt.security import Guard, reads
from webvirt.tasks import cancel_and_wait
from webvirt.templates import TemplateStore
from webvirt.usage import UsageSampler
from webvirt.usb_reconciler import UsbReconciler


async def request_time(budgets: Budgets, _app: web.Application) -> AsyncIterator[None]:
    sweeping = asyncio.create_task(budgets.sweeping())
    yield
    await cancel_and_wait(sweeping)


async def rule_store(app: web.Application) -> AsyncIterator[None]:
    store = app[RULES]
    await store.open()
    store.listeners.append(partial(publish_change, app[HOSTS]))
    yield
    await store.close()


async def libvirt_connection(app: web.Application) -> AsyncIterator[None]:
    hosts = app[HOSTS]
    await hosts.open()
    yield
    await hosts.close()


async def usb_reconciler(app: web.Application) -> AsyncIterator[None]:
    # One per host: a frozen host's pass holds up no other host's devices.
    reconcilers = [UsbReconciler(host, app[EVENT_HUB], app[RULES], host.tags,
                                 first=host is app[HOSTS].default)
                   for host in app[HOSTS]]
    app[USB_RECONCILER] = reconcilers[0]
    app[USB_RECONCILERS] = reconcilers
    for reconciler in reconcilers:
        reconciler.start()
    yield
    for reconciler in reconcilers:
        await reconciler.close()


async def event_stream(app: web.Application) -> AsyncIterator[None]:
    heartbeats = asyncio.create_task(send_heartbeats(app[EVENT_HUB], app[SETTINGS].heartbeat_s))
    yield
    await cancel_and_wait(heartbeats)


async def send_heartbeats(hub: EventHub, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        hub.heartbeat()


async def live_usage(app: web.Application) -> AsyncIterator[None]:
    for sampler in app[USAGE]:
        sampler.start()
    yield
    for sampler in app[USAGE]:
        await sampler.close()


async def mqtt_bridge(app: web.Application) -> AsyncIterator[None]:
    """Home Assistant over MQTT (--mqtt). It never fails the start: a broker that is away is
    retried in the background while HTTP is served."""
    settings = app[SETTINGS].mqtt
    assert settings is not None
    app[MQTT_BRIDGE] = bridge = MqttBridge(settings, app[HOSTS], app[EVENT_HUB], app[RULES])
    listeners = [(r, partial(bridge.held, r.host)) for r in app[USB_RECONCILERS]]
    for reconciler, listener in listeners:
        reconciler.holding_listeners.append(listener)
        if reconciler.holding is not None:  # its first pass came first
            listener(reconciler.holding)
    bridge.start()
    yield
    for reconciler, listener in listeners:
        reconciler.holding_listeners.remove(listener)
    await bridge.close()


async def end_event_streams(app: web.Application) -> None:
    # Streams never end by themselves; without this, shutdown waits for its timeout.
    app[EVENT_HUB].end_all()


async def end_libvirt_calls(app: web.Application) -> None:
    # aiohttp waits for every request before the clean-up closes the hosts: a request waiting
    # on a frozen daemon held the stop until keepalive gave up. Closed now, they answer 503.
    await app[HOSTS].close()


async def dashboard(request: web.Request) -> web.FileResponse:
    return web.FileResponse(request.app[SETTINGS].static_dir / "index.html")


async def overlay(request: web.Request) -> web.FileResponse:
    """The OBS browser-source overlay (static/overlay.html; options in its query string)."""
    return web.FileResponse(request.app[SETTINGS].static_dir / "overlay.html")


@docs(
    tags=["server"],
    summary="Get API version",
    description="The server version (semantic versioning).",
    responses={200: {"description": "Version", "schema": {"type": "string"}}},
)
async def version(request: web.Request) -> web.Response:
    return web.json_response(__version__)


def setup_routes(app: web.Application) -> None:
    """Every path webvirt serves. Actions take GET (Stream Deck buttons, the seed's style) and
    POST. No HEAD routes: the OpenAPI spec would list each GET twice."""
    router = app.router
    router.add_get("/", dashboard, allow_head=False)
    router.add_static("/static", app[SETTINGS].static_dir)
    router.add_get("/overlay", overlay, allow_head=False)
    overlays_dir = app[SETTINGS].overlays_dir
    if overlays_dir is not None:
        # The user's own overlay pages, from this origin so they need no CORS. No listing; a
        # path (or a symlink) that leads out of the folder is a 404.
        router.add_static("/overlays", overlays_dir, show_index=False, follow_symlinks=False)
    # Reads (what a read token may use and an allowed other origin may fetch) are marked;
    # every other /api/ route is an action.
    router.add_get("/api/0/version", reads(version), allow_head=False)
    # The seed's API, word for word.
    router.add_get("/api/0/state/{domain}", reads(get_state), allow_head=False)
    for method in ("GET", "POST"):
        router.add_route(method, "/api/0/start/{domain}", start)
        router.add_route(method, "/api/0/shutdown/{domain}", shutdown)
        router.add_route(method, "/api/0/attach/{domain}/{xml_name}", attach)
        router.add_route(method, "/api/0/detach/{domain}/{xml_name}", detach)
    # Beyond the seed.
    router.add_get("/api/0/domains", reads(list_domains), allow_head=False)
    router.add_get("/api/0/status/{domain}", reads(status), allow_head=False)
    for method in ("GET", "POST"):
        router.add_route(method, "/api/0/power/{domain}", power)
        router.add_route(method, "/api/0/reboot/{domain}", reboot)
        router.add_route(method, "/api/0/destroy/{domain}", destroy)
        router.add_route(method, "/api/0/reset/{domain}", reset)
        router.add_route(method, "/api/0/suspend/{domain}", suspend)
        router.add_route(method, "/api/0/resume/{domain}", resume)
        router.add_route(method, "/api/0/toggle/{domain}/{xml_name}", toggle)
    router.add_get("/api/0/devices/{domain}", reads(domain_devices), allow_head=False)
    router.add_get("/api/0/templates", reads(list_templates), allow_head=False)
    router.add_get("/api/0/host/devices", reads(host_devices), allow_head=False)
    router.add_get("/api/0/hosts", reads(list_hosts), allow_head=False)
    router.add_get("/api/0/events", reads(streams(events)), allow_head=False)
    router.add_get("/api/0/rules", reads(list_rules), allow_head=False)
    router.add_post("/api/0/rules", create_rule)
    router.add_get("/api/0/rules/{id}", reads(get_rule), allow_head=False)
    router.add_put("/api/0/rules/{id}", replace_rule)
    router.add_delete("/api/0/rules/{id}", delete_rule)
    # Where Prometheus looks by default; guarded like /api/ (security.PROTECTED_PATHS).
    router.add_get("/metrics", reads(metrics), allow_head=False)
    setup_openapi(app)  # last: the spec is built from the routes above


def create_app(settings: Settings) -> web.Application:
    guard = Guard(settings)
    budgets = Budgets(settings.call_timeout)
    app = web.Application(middlewares=[answers(budgets), guard.middleware],
                          client_max_size=connection_limits.MAX_BODY_BYTES)
    app[SETTINGS] = settings
    app[EVENT_HUB] = hub = EventHub(settings.replay_events)
    specs = settings.hosts or (HostSpec(default_name(settings.uri), settings.uri),)
    app[HOSTS] = hosts = Hosts(specs, hub, call_timeout=settings.call_timeout,
                               reconcile_s=settings.reconcile_s)
    app[HOST] = hosts.default
    app[TEMPLATES] = TemplateStore(settings.devices_dir)
    app[RULES] = RuleStore(settings.state_dir, settings.call_timeout)
    app[METRICS] = Metrics(hub, hosts)
    # One sampler per host: each reads its own host at its own pace.
    app[USAGE] = [UsageSampler(host, hub, settings.stats_interval_s) for host in hosts]
    # The rule store first: a state folder that cannot be used is said before libvirt is tried.
    app.cleanup_ctx.extend([partial(request_time, budgets), rule_store, libvirt_connection,
                            usb_reconciler, event_stream, live_usage])
    if settings.mqtt is not None:
        app.cleanup_ctx.append(mqtt_bridge)
    app.on_shutdown.extend([end_event_streams, end_libvirt_calls])
    app.on_response_prepare.append(guard.cors_headers)

    setup_routes(app)
    return app
