"""Server settings, filled by the command line (or by tests directly)."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from webvirt.hosts import HostSpec

PACKAGE_DIR = Path(__file__).resolve().parent
# A libvirt host's name in webvirt (--connect NAME=URI): it goes into topics and ids too.
HOST_NAME = r"[A-Za-z0-9._-]{1,64}"


def default_static_dir() -> Path:
    """The dashboard's and ReDoc's files: webvirt/static when installed (pip, wheel, single-file
    build), else the repository's static/ (a checkout, an editable install)."""
    packaged = PACKAGE_DIR / "static"
    return packaged if packaged.is_dir() else PACKAGE_DIR.parent / "static"


DEFAULT_STATIC_DIR = default_static_dir()


@dataclass(frozen=True)
class MqttSettings:
    """The broker the Home Assistant bridge (webvirt/mqtt_bridge.py) talks to."""

    host: str
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    # Topics: state and commands under `prefix`, discovery configs under `discovery_prefix`.
    prefix: str = "webvirt"
    discovery_prefix: str = "homeassistant"
    # A CA bundle to trust for mqtts:// (a broker with a self-signed certificate); None: the
    # system's CAs.
    ca_file: Path | None = None


# A prefix is one or more topic levels: no wildcards, no empty level, no NUL.
_TOPIC_PREFIX = re.compile(r"[^/+#\x00]+(?:/[^/+#\x00]+)*")


class MqttUrlError(ValueError):
    """An --mqtt URL or prefix that cannot be used; the message says why."""


def mqtt_settings(url: str, prefix: str, discovery_prefix: str,
                  environ: Mapping[str, str], ca_file: Path | None = None) -> MqttSettings:
    """mqtt://[user[:password]@]host[:port] (or mqtts://); the password may instead come from
    $WEBVIRT_MQTT_PASSWORD, which keeps it out of the process list."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise MqttUrlError("--mqtt: the URL must start with mqtt:// or mqtts://")
    if "@" in url.partition("://")[2] and "@" not in parts.netloc:
        # urlsplit ends the user part at the first # / or ?: the rest became a path.
        raise MqttUrlError("--mqtt: percent-encode # / ? in the user or password (%23 %2F %3F),"
                           " or give the password in $WEBVIRT_MQTT_PASSWORD")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise MqttUrlError("--mqtt: only mqtt://[USER[:PASSWORD]@]HOST[:PORT], no path or query")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:  # urlsplit takes 0; a default in its place would hide the typo
        raise MqttUrlError("--mqtt: the port must be a number from 1 to 65535")
    if not parts.hostname:
        raise MqttUrlError("--mqtt: the URL names no host")
    check_prefixes(prefix, discovery_prefix)
    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = (urllib.parse.unquote(parts.password) if parts.password is not None
                else environ.get("WEBVIRT_MQTT_PASSWORD") or None)
    if password and not username:  # aiomqtt would drop it silently: no user, no password
        raise MqttUrlError("--mqtt: a password needs a user: mqtt://USER[:PASSWORD]@HOST")
    tls = parts.scheme == "mqtts"
    if ca_file is not None and not tls:
        raise MqttUrlError("--mqtt-ca: only for an mqtts:// URL")
    if ca_file is not None and not ca_file.is_file():
        raise MqttUrlError(f"--mqtt-ca: {ca_file} is not a file")
    return MqttSettings(host=parts.hostname, port=port or (8883 if tls else 1883),
                        username=username, password=password, tls=tls, prefix=prefix,
                        discovery_prefix=discovery_prefix, ca_file=ca_file)


def check_prefixes(prefix: str, discovery_prefix: str) -> None:
    for name, value in (("--mqtt-prefix", prefix), ("--mqtt-discovery-prefix", discovery_prefix)):
        if not _TOPIC_PREFIX.fullmatch(value):
            raise MqttUrlError(f"{name}: {value!r} is not a topic prefix (levels joined by /, "
                               "none empty, no + or #)")
    # One tree inside the other: the bridge would take its own topics for Home Assistant's.
    if f"{prefix}/".startswith(f"{discovery_prefix}/") or \
            f"{discovery_prefix}/".startswith(f"{prefix}/"):
        raise MqttUrlError(f"--mqtt-prefix {prefix!r} and --mqtt-discovery-prefix "
                           f"{discovery_prefix!r} overlap: give them separate topic trees")


@dataclass(frozen=True)
class Settings:
    uri: str | None = None
    # Several libvirt hosts (--connect repeated); when empty, the one host at `uri`.
    hosts: tuple[HostSpec, ...] = ()
    devices_dir: Path = Path("devices")
    static_dir: Path = DEFAULT_STATIC_DIR
    # Seconds one libvirt call may take before the request fails with 504.
    call_timeout: float = 30.0
    # Seconds between full re-reads of every domain's state: the safety net under events.
    reconcile_s: float = 30.0
    # Seconds between heartbeat messages (and WebSocket pings) on the event stream.
    heartbeat_s: float = 15.0
    # Events kept for clients that resume after a reconnect (by count).
    replay_events: int = 1000
    # Seconds between live `stats` messages (sampled only while a client asks for them).
    stats_interval_s: float = 2.0
    token: str | None = field(default=None, repr=False)  # as the MQTT password
    # Tokens that may read (state, lists, events) but not act.
    read_tokens: tuple[str, ...] = field(default=(), repr=False)
    # Other sites' pages (e.g. an OBS overlay hosted elsewhere) that may read the API and the
    # event stream in a browser: exact origins, "null" only when named.
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = field(default_factory=tuple)
    # The user's own overlay pages, served at /overlays/ (--overlays DIR); None: not served.
    overlays_dir: Path | None = None
    # Where webvirt keeps what it must remember (the USB rules). No default here: whoever
    # makes Settings says where (the command line's default is the user's state folder), so a
    # test or a script never writes to the real one by accident.
    state_dir: Path = field(kw_only=True)
    # The Home Assistant bridge (--mqtt); None: nothing MQTT runs.
    mqtt: MqttSettings | None = field(default=None, kw_only=True)
