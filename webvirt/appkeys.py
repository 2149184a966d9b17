"""Typed keys for what the application object carries."""

from __future__ import annotations

from aiohttp import web

from webvirt.config import Settings
from webvirt.host import Host
from webvirt.hosts import Hosts
from webvirt.hub import EventHub
from webvirt.metrics import Metrics
from webvirt.mqtt_bridge import MqttBridge
from webvirt.rules_store import RuleStore
from webvirt.templates import TemplateStore
from webvirt.usage import UsageSampler
from webvirt.usb_reconciler import UsbReconciler

SETTINGS = web.AppKey("settings", Settings)
# The first (with one --connect, the only) host; handlers go through HOSTS.
HOST = web.AppKey("host", Host)
HOSTS = web.AppKey("hosts", Hosts)
TEMPLATES = web.AppKey("templates", TemplateStore)
EVENT_HUB = web.AppKey("event_hub", EventHub)
RULES = web.AppKey("rules", RuleStore)
USB_RECONCILER = web.AppKey("usb_reconciler", UsbReconciler)  # the first host's
USB_RECONCILERS = web.AppKey("usb_reconcilers", list[UsbReconciler])  # one per host
METRICS = web.AppKey("metrics", Metrics)
USAGE = web.AppKey("usage", list[UsageSampler])  # one per host
MQTT_BRIDGE = web.AppKey("mqtt_bridge", MqttBridge)  # only with --mqtt
