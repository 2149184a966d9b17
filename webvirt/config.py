"""Server settings, filled by the command line (or by tests directly)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from webvirt.hosts import HostSpec

PACKAGE_DIR = Path(__file__).resolve().parent


def default_static_dir() -> Path:
    """The dashboard's and ReDoc's files: webvirt/static when installed (pip, wheel, single-file
    build), else the repository's static/ (a checkout, an editable install)."""
    packaged = PACKAGE_DIR / "static"
    return packaged if packaged.is_dir() else PACKAGE_DIR.parent / "static"


DEFAULT_STATIC_DIR = default_static_dir()


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
    token: str | None = None
    # Tokens that may read (state, lists, events) but not act.
    read_tokens: tuple[str, ...] = ()
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
