"""Typed keys for what the application object carries."""

from __future__ import annotations

from aiohttp import web

from webvirt.config import Settings
from webvirt.host import Host
from webvirt.hub import EventHub
from webvirt.metrics import Metrics
from webvirt.mqtt_bridge import MqttBridge
from webvirt.rules_store import RuleStore
from webvirt.templates import TemplateStore
from webvirt.usage import UsageSampler
from webvirt.usb_reconciler import UsbReconciler

SETTINGS = web.AppKey("settings", Settings)
HOST = web.AppKey("host", Host)
TEMPLATES = web.AppKey("templates", TemplateStore)
EVENT_HUB = web.AppKey("event_hub", EventHub)
RULES = web.AppKey("rules", RuleStore)
USB_RECONCILER = web.AppKey("usb_reconciler", UsbReconciler)
METRICS = web.AppKey("metrics", Metrics)
USAGE = web.AppKey("usage", UsageSampler)
MQTT_BRIDGE = web.AppKey("mqtt_bridge", MqttBridge)  # only with --mqtt
