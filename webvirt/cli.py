"""Command line: `webvirt` and `python -m webvirt`."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import re
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from aiohttp import web

from webvirt import __version__, connection_limits, log_output
from webvirt.access_log import AccessLogger
from webvirt.app import create_app
from webvirt.config import MqttSettings, MqttUrlError, Settings, mqtt_settings
from webvirt.errors import ApiError
from webvirt.hosts import HostError, host_specs
from webvirt.security import split_hosts

log = logging.getLogger("webvirt")

# A short token is guessed. Only a Bearer token's characters (RFC 6750): a header carries them
# as they are (a URL too, but + as %2B), and the log's credential masks (log_format) hide them
# whole, where a space or a quote would end the mask and show the rest.
MIN_TOKEN_LENGTH = 16
TOKEN_SYNTAX = re.compile(r"[A-Za-z0-9._~+/-]+=*")

DESCRIPTION = """\
A small web server with a REST-inspired API for libvirt virtual machines:
start, shut down and query VMs, attach and detach host devices from XML templates,
and follow VM state live over a WebSocket.

API docs of the running server: http://ADDRESS:PORT/docs (Swagger UI), /redoc (ReDoc)."""

EPILOG = """\
examples:
  webvirt                                    serve on 127.0.0.1:5000, libvirt's default URI
  webvirt --connect qemu:///system           manage the system QEMU/KVM daemon
  webvirt --connect test:///default          try it on libvirt's built-in test driver
  webvirt --connect qemu:///system --connect desk=qemu+ssh://me@desktop/system
                                             two hosts: this machine (local) and desk
  curl http://127.0.0.1:5000/api/0/start/win11

Do not expose webvirt to untrusted networks: anyone who can reach it can control your VMs."""


def default_devices_dir() -> Path:
    # A single-file build looks next to the executable, like the seed did.
    if getattr(sys, "frozen", False):
        return Path(sys.executable).resolve().parent / "devices"
    return Path("devices")


def default_state_dir(environ: Mapping[str, str], euid: int, home: Path) -> Path:
    """Where webvirt keeps its state: the system's place for a daemon's state when run as
    root, else the user's ($XDG_STATE_HOME, which must be absolute to count)."""
    if euid == 0:
        return Path("/var/lib/webvirt")
    xdg = environ.get("XDG_STATE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else home / ".local" / "state"
    return base / "webvirt"


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def seconds(text: str) -> float:
    value = float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="webvirt",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--address", default="127.0.0.1",
                        help="address to listen on (default: %(default)s; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=5000,
                        help="TCP port to listen on (default: %(default)s)")
    parser.add_argument("--connect", metavar="[NAME=]URI", action="append", default=[],
                        help="libvirt connection URI, e.g. qemu:///system (default: libvirt's "
                             "own default, or $LIBVIRT_DEFAULT_URI). Repeat it for several "
                             "hosts, each named NAME (default: the URI's host part, or local); "
                             "then address a domain as NAME@HOST when its name is on several")
    parser.add_argument("--devices", metavar="DIR", type=Path, default=None,
                        help="folder of device templates NAME.xml (default: ./devices, or "
                             "devices/ next to a single-file executable)")
    parser.add_argument("--token", default=os.environ.get("WEBVIRT_TOKEN") or None,
                        help="require this token on /api/ (Authorization: Bearer TOKEN or "
                             f"?token=TOKEN): at least {MIN_TOKEN_LENGTH} characters, of "
                             "letters, digits and - . _ ~ + / (e.g. `openssl rand -hex 16`); "
                             "default: $WEBVIRT_TOKEN, else no token")
    parser.add_argument("--read-token", metavar="TOKEN", action="append",
                        default=split_tokens(os.environ.get("WEBVIRT_READ_TOKEN", "")),
                        help="a token that may read (state, lists, devices, templates, events) "
                             "but gets 403 on every action, e.g. for an OBS overlay on another "
                             "PC (repeatable; default: $WEBVIRT_READ_TOKEN, comma-separated); "
                             f"needs --token; at least {MIN_TOKEN_LENGTH} characters, as for "
                             "--token")
    parser.add_argument("--allow-origin", metavar="ORIGIN", action="append", default=[],
                        help="let pages from this origin (e.g. http://192.168.1.20:8080, or "
                             "null for local files) read the API and the event stream in a "
                             "browser (CORS); actions stay refused (repeatable)")
    parser.add_argument("--allow-host", metavar="NAME", action="append", default=[],
                        help="also accept requests whose Host header is NAME (repeatable, or "
                             "comma-separated; '*' for any). IP addresses, localhost and this "
                             "machine's hostname are always accepted")
    parser.add_argument("--call-timeout", metavar="SECONDS", type=seconds, default=30.0,
                        help="the time a request may wait for libvirt and the rule store, "
                             "together: past it, 504 saying what did not answer (default: "
                             "%(default)s)")
    parser.add_argument("--replay-buffer", metavar="EVENTS", type=int, default=1000,
                        help="events kept for event clients that resume after a reconnect "
                             "(default: %(default)s)")
    parser.add_argument("--stats-interval", metavar="SECONDS", type=seconds, default=2.0,
                        help="seconds between live usage messages (CPU, memory, disk, network) "
                             "on the event stream, sent to clients that ask with ?type=stats "
                             "(default: %(default)s)")
    parser.add_argument("--overlays", metavar="DIR", type=Path, default=None,
                        help="serve your own overlay pages (OBS browser sources) from DIR at "
                             "/overlays/ (default: none)")
    parser.add_argument("--state-dir", metavar="DIR", type=Path,
                        default=default_state_dir(os.environ, os.geteuid(),
                                                  Path(os.path.expanduser("~"))),
                        help="folder where webvirt keeps its USB rules (rules.sqlite3); created "
                             "with mode 0700 if missing (default: $XDG_STATE_HOME/webvirt, else "
                             "~/.local/state/webvirt; /var/lib/webvirt as root; here: "
                             "%(default)s)")
    parser.add_argument("--max-connections-per-client", metavar="N", type=count,
                        default=connection_limits.DEFAULT_PER_CLIENT,
                        help="close further connections from an IP address that has N open "
                             "(default: %(default)s; 0: no limit). Behind a reverse proxy, "
                             "every client has the proxy's address")
    parser.add_argument("--mqtt", metavar="URL", default=None,
                        help="publish the VMs to Home Assistant over MQTT, and take its "
                             "commands, via the broker at mqtt://[USER[:PASSWORD]@]HOST[:PORT] "
                             "(mqtts:// for TLS); the password may come from "
                             "$WEBVIRT_MQTT_PASSWORD instead. Whoever may publish to the "
                             "broker controls the VMs: secure it (default: no MQTT)")
    parser.add_argument("--mqtt-prefix", metavar="PREFIX", default="webvirt",
                        help="topic prefix for states and commands; one per webvirt on a broker "
                             "(default: %(default)s)")
    parser.add_argument("--mqtt-discovery-prefix", metavar="PREFIX", default="homeassistant",
                        help="Home Assistant's discovery prefix (default: %(default)s)")
    parser.add_argument("--mqtt-ca", metavar="FILE", type=Path, default=None,
                        help="CA bundle (PEM) to trust for an mqtts:// broker, e.g. one with a "
                             "self-signed certificate (default: the system's CAs)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="how much to log (default: %(default)s)")
    parser.add_argument("--version", action="version", version=f"webvirt {__version__}")
    return parser


async def serve(settings: Settings, address: str, port: int,
                per_client: int | None) -> None:
    app = create_app(settings)
    runner = web.AppRunner(app, access_log_class=AccessLogger, **connection_limits.HTTP_LIMITS)
    loop = asyncio.get_running_loop()
    listener = None
    try:
        # Inside: when a start-up step fails, cleanup() undoes the ones that had succeeded.
        await runner.setup()
        assert runner.server is not None
        # loop.create_server rather than web.TCPSite, to count connections per client.
        listener = await loop.create_server(
            connection_limits.ClientGate(runner.server, per_client), address, port)
        log.info("webvirt %s serving http://%s:%d (devices: %s, state: %s)", __version__,
                 address, port, settings.devices_dir.resolve(), settings.state_dir.resolve())
        if not settings.devices_dir.is_dir():
            log.warning("device template folder %s does not exist", settings.devices_dir)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")
    finally:
        if listener is not None:
            listener.close()  # no new connections; runner.cleanup() closes the open ones
        await runner.cleanup()


def split_tokens(value: str) -> list[str]:
    return [token.strip() for token in value.split(",") if token.strip()]


def token_problem(token: str) -> str | None:
    """Why webvirt refuses this token, or None."""
    if len(token.rstrip("=")) < MIN_TOKEN_LENGTH:  # padding is no secret
        return (f"use at least {MIN_TOKEN_LENGTH} characters (a short token is guessed; "
                "`openssl rand -hex 16` makes one)")
    if not TOKEN_SYNTAX.fullmatch(token):
        return ("use only letters, digits and - . _ ~ + / (and = at the end), a Bearer "
                "token's characters (RFC 6750); `openssl rand -hex 16` makes one")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The refused token is not repeated: the error may end up in a shared log or screenshot.
    named = [("--token", "WEBVIRT_TOKEN", args.token),
             *(("--read-token", "WEBVIRT_READ_TOKEN", t) for t in args.read_token)]
    for option, variable, token in named:
        if token is not None and (problem := token_problem(token)):
            parser.error(f"{option} (or ${variable}): {problem}")
    if args.read_token and not args.token:
        parser.error("--read-token needs --token (the full token, for actions)")
    mqtt = None
    if args.mqtt is not None:
        try:
            mqtt = mqtt_settings(args.mqtt, args.mqtt_prefix, args.mqtt_discovery_prefix,
                                 os.environ, args.mqtt_ca)
        except MqttUrlError as err:
            parser.error(str(err))
    stop_logging = log_output.start(args.log_level)
    try:
        error = run(args, mqtt)
    finally:
        stop_logging()  # every queued line is written before the error line and the exit
    if error:
        print(f"webvirt: error: {error}", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace, mqtt: MqttSettings | None = None) -> str | None:
    """Serve until SIGINT or SIGTERM; the reason when webvirt cannot start."""
    try:
        hosts = host_specs(args.connect)
    except HostError as err:
        return str(err)
    settings = Settings(
        uri=hosts[0].uri,
        hosts=hosts,
        devices_dir=args.devices or default_devices_dir(),
        call_timeout=args.call_timeout,
        replay_events=max(0, args.replay_buffer),
        stats_interval_s=args.stats_interval,
        token=args.token,
        allowed_hosts=split_hosts(args.allow_host),
        read_tokens=tuple(args.read_token),
        allowed_origins=tuple(origin.strip().rstrip("/") for origin in args.allow_origin),
        overlays_dir=args.overlays,
        state_dir=args.state_dir,
        mqtt=mqtt,
    )
    if args.overlays is not None and not args.overlays.is_dir():
        return f"overlay folder {args.overlays} does not exist"
    if not settings.token and not is_loopback(args.address):
        log.warning("listening on %s without --token: anyone on the network can control "
                    "your VMs", args.address)
    connection_limits.raise_open_file_limit()
    try:
        asyncio.run(serve(settings, args.address, args.port,
                          args.max_connections_per_client or None))
    except ApiError as err:
        return err.detail
    except OSError as err:
        return f"cannot listen on {args.address}:{args.port}: {err.strerror or err}"
    except KeyboardInterrupt:
        pass
    return None
