"""Safe on a LAN: allowed Host names (DNS rebinding), no cross-site requests, optional token,
pages that no other site can frame (clickjacking).

A state-changing GET is reachable from any web page a user visits (<img src=".../shutdown/
win11">), so /api/ refuses requests a browser marks as coming from another site. A page on an
attacker's domain that resolves to this machine (DNS rebinding) is refused by its Host name.
A page that frames the dashboard under a decoy could trick a click on Start or Force off.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import hashlib
import hmac
import ipaddress
import logging
import re
import socket
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import TypeVar
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Handler

from webvirt.config import Settings
from webvirt.middlewares import error_body
from webvirt.schemas import check_path

log = logging.getLogger(__name__)

PROTECTED_PREFIX = "/api/"
# Outside /api/ but guarded the same way: Prometheus looks for /metrics by default.
PROTECTED_PATHS = frozenset({"/metrics"})
# Set by reads() on the handlers of routes that change nothing: what a read token may use,
# and what an allowed other origin may fetch. Everything else is an action.
READS_ATTR = "webvirt_reads"
# Where the spec lives: readable without a token so /docs can load it.
PUBLIC_PATHS = frozenset({"/api/0/openapi.json"})


# Content-Security-Policy of each page: only its own files, never inside another site's frame.
_NOTHING_ELSE = "default-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
DASHBOARD_POLICY = (f"{_NOTHING_ELSE}; script-src 'self'; style-src 'self'; img-src 'self'; "
                    "connect-src 'self'")
# Swagger UI: an inline start-up script (allowed by its hash, see inline_script_hashes), and
# <style> elements added at run time.
SWAGGER_POLICY = (f"{_NOTHING_ELSE}; script-src 'self'{{inline_scripts}}; "
                  "style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'")
# ReDoc adds <style> elements at run time and searches in a worker made from a blob.
REDOC_POLICY = (f"{_NOTHING_ELSE}; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                "img-src 'self' data:; connect-src 'self'; worker-src blob:")
# The OBS overlay: its own script and style, and the API (devices, the event stream).
OVERLAY_POLICY = f"{_NOTHING_ELSE}; script-src 'self'; style-src 'self'; connect-src 'self'"
# The user's own overlays (--overlays DIR): their inline scripts and styles may run.
USER_OVERLAY_POLICY = (f"{_NOTHING_ELSE}; script-src 'self' 'unsafe-inline'; "
                       "style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                       "font-src 'self'; connect-src 'self'")
PAGE_POLICIES = {"/": DASHBOARD_POLICY, "/docs": SWAGGER_POLICY, "/redoc": REDOC_POLICY,
                 "/overlay": OVERLAY_POLICY}
INLINE_SCRIPT = re.compile(rb"<script(?![^>]*\ssrc=)[^>]*>(.*?)</script>", re.DOTALL)

# Host headers already found allowed, remembered up to this many.
HOSTS_SEEN_LIMIT = 256
# How long requests wait, all together, for this machine's DNS name (see FqdnLookup).
FQDN_TIMEOUT_S = 2.0


def default_allowed_hosts() -> set[str]:
    """The names known without asking DNS; this machine's fully qualified name comes later."""
    names = {"localhost", "localhost.localdomain"}
    hostname = socket.gethostname().lower()
    names |= {hostname, f"{hostname}.local"}
    return names


class FqdnLookup:
    """This machine's fully qualified name: socket.getfqdn(), asked once, on first need.

    getfqdn() asks DNS, which can hang for many seconds when DNS is broken; so start-up never
    calls it, it runs on a daemon thread (nothing waits for it at exit), and requests wait
    for it at most `timeout` seconds in all, counted from the first one that needed it.
    """

    def __init__(self, timeout: float = FQDN_TIMEOUT_S):
        self.timeout = timeout
        self._answer: asyncio.Future[str] | None = None
        self._deadline = 0.0

    async def name(self) -> str | None:
        """The name in lower case, or None while DNS has not answered in time."""
        loop = asyncio.get_running_loop()
        if self._answer is None:
            self._answer = asyncio.wrap_future(in_daemon_thread(socket.getfqdn), loop=loop)
            self._deadline = loop.time() + self.timeout
        try:
            # Shielded: a request that gives up does not cancel the lookup for later ones.
            answer = await asyncio.wait_for(asyncio.shield(self._answer),
                                            max(0.0, self._deadline - loop.time()))
        except (TimeoutError, OSError, ValueError):
            return None
        return answer.lower()


def in_daemon_thread(fn: Callable[[], str]) -> Future[str]:
    future: Future[str] = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except Exception as err:  # the awaiting request gets it
            future.set_exception(err)

    threading.Thread(target=run, daemon=True, name="webvirt-fqdn").start()
    return future


def host_name(host_header: str) -> str:
    """The name in a Host header, without port or IPv6 brackets."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0].lower()
    return host_header.rsplit(":", 1)[0].lower() if host_header.count(":") == 1 \
        else host_header.lower()


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


H = TypeVar("H")


def reads(handler: H) -> H:
    """Marks a route's handler as one that only reads."""
    setattr(handler, READS_ATTR, True)
    return handler


def is_api(path: str) -> bool:
    return path.startswith(PROTECTED_PREFIX) or path in PROTECTED_PATHS


def only_reads(request: web.Request) -> bool:
    return request.method == "GET" and getattr(request.match_info.handler, READS_ATTR, False)


class Access(enum.Enum):
    NONE = "none"
    READ = "read"
    FULL = "full"


class Guard:
    def __init__(self, settings: Settings):
        self.token = as_bytes(settings.token) if settings.token else None
        self.read_tokens = [as_bytes(t) for t in settings.read_tokens]
        self.allowed_origins = frozenset(settings.allowed_origins)
        self._hosts_seen: set[str] = set()
        self.allowed_hosts = default_allowed_hosts() | {h.lower() for h in settings.allowed_hosts}
        self.allow_any_host = "*" in settings.allowed_hosts
        self.fqdn = FqdnLookup()

    async def host_allowed(self, host_header: str | None) -> bool:
        if self.allow_any_host or host_header in self._hosts_seen:
            return True
        if not host_header:
            return False
        name = host_name(host_header)
        # Rebinding needs a name the attacker controls; an IP literal cannot be rebound.
        allowed = (is_ip_literal(name) or name in self.allowed_hosts
                   or name == await self.fqdn.name())
        if allowed and len(self._hosts_seen) < HOSTS_SEEN_LIMIT:
            self._hosts_seen.add(host_header)  # parsing an address on every request is costly
        return allowed

    async def cors_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """on_response_prepare: lets an allowed origin's page read what it may read (an event
        stream too, whose headers leave before its handler ends)."""
        origin = self.allowed_origin(request)
        if origin and is_api(request.path) and (
                only_reads(request) or request.method == "OPTIONS"):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers.add("Vary", "Origin")

    def allowed_origin(self, request: web.Request) -> str | None:
        """The request's Origin when it is one the user allowed to read, else None."""
        origin = request.headers.get("Origin")
        return origin if origin in self.allowed_origins else None

    def cross_site(self, request: web.Request) -> str | None:
        """Why a browser request comes from another site, or None."""
        if self.allowed_origin(request) and only_reads(request):
            return None  # an origin the user named, reading: what --allow-origin is for
        fetch_site = request.headers.get("Sec-Fetch-Site")
        if fetch_site in ("cross-site", "same-site"):
            return f"Sec-Fetch-Site: {fetch_site}"
        origin = request.headers.get("Origin")
        if origin and origin != "null":
            try:
                origin_host = urlsplit(origin).netloc.lower()
            except ValueError:  # e.g. "http://[::1": not an origin this server could have
                return f"Origin {origin} is not a valid origin"
            if origin_host != (request.host or "").lower():
                return f"Origin {origin} is not this server"
        elif origin == "null":
            return "Origin: null (sandboxed or file page)"
        return None

    def access(self, request: web.Request) -> Access:
        """What the request's token allows; every token is compared, in constant time."""
        assert self.token is not None
        given = request.query.get("token", "")
        authorization = request.headers.get("Authorization", "")
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer":
            given = credentials.strip()
        candidate = as_bytes(given)
        full = hmac.compare_digest(candidate, self.token)
        read = False
        for token in self.read_tokens:
            read |= hmac.compare_digest(candidate, token)
        return Access.FULL if full else Access.READ if read else Access.NONE

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not await self.host_allowed(request.headers.get("Host")):
            return refuse(request, 403, "host_not_allowed",
                          f"Host {request.headers.get('Host')!r} is not an allowed name for "
                          "this server (start webvirt with --allow-host NAME to add it)")
        if is_api(request.path) and request.path not in PUBLIC_PATHS:
            if request.method == "OPTIONS" and self.allowed_origin(request):
                return preflight()
            reason = self.cross_site(request)
            if reason is not None:
                return refuse(request, 403, "cross_site_request",
                              f"cross-site requests are refused ({reason})")
            access = Access.FULL if self.token is None else self.access(request)
            if access is Access.NONE:
                response = refuse(request, 401, "unauthorized",
                                  "a valid token is required: Authorization: Bearer TOKEN "
                                  "or ?token=TOKEN")
                response.headers["WWW-Authenticate"] = 'Bearer realm="webvirt"'
                return response
            if access is Access.READ and not only_reads(request):
                return refuse(request, 403, "read_only_token",
                              "this token may only read; actions need the full token")
        # Handlers (and libvirt) only see path parameters that their documented schema allows.
        check_path(request)
        answer = await handler(request)
        add_security_headers(request.path, answer)
        return answer


def add_security_headers(path: str, response: web.StreamResponse) -> None:
    if response.prepared:  # an event stream: its headers are sent, and it is no page
        return
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    policy = PAGE_POLICIES.get(path)
    if policy is None and path.startswith("/static/"):
        policy = DASHBOARD_POLICY  # were a file there opened as a page, it gets the strictest
    if policy is None and path.startswith("/overlays/"):
        policy = USER_OVERLAY_POLICY
    if policy is None:
        return
    if "{inline_scripts}" in policy:
        body = response.body if isinstance(response, web.Response) else None
        policy = policy.format(
            inline_scripts=inline_script_hashes(body if isinstance(body, bytes) else b""))
    response.headers["Content-Security-Policy"] = policy
    response.headers["X-Frame-Options"] = "DENY"  # for browsers without frame-ancestors


def preflight() -> web.Response:
    """A browser asks before a read that sends Authorization; only reads (GET) are allowed."""
    return web.Response(status=204, headers={
        "Access-Control-Allow-Methods": "GET",
        "Access-Control-Allow-Headers": "Authorization, Last-Event-ID",
        "Access-Control-Max-Age": "600",
    })


def inline_script_hashes(html: bytes) -> str:
    """CSP sources (each after a space) that allow exactly the page's own inline scripts."""
    return "".join(
        f" 'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
        for script in INLINE_SCRIPT.findall(html))


def as_bytes(text: str) -> bytes:
    # aiohttp decodes non-UTF-8 header bytes to lone surrogates, which plain encode() refuses.
    return text.encode("utf-8", "surrogatepass")


def refuse(request: web.Request, status: int, code: str, detail: str) -> web.Response:
    # A warning: on a LAN, someone (or some web page) tried to reach the API.
    log.warning("refused %s %s from %s: %s", request.method, request.path, request.remote,
                detail)
    return error_body(status, code, detail)


def split_hosts(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(h.strip() for value in values for h in value.split(",") if h.strip())
