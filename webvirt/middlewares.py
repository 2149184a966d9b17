"""Every error leaves as JSON ({"detail": ..., "code": ..., "status": ...}), and every request
but an event stream answers within its time."""

from __future__ import annotations

import asyncio
import logging
from typing import TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from webvirt import deadline
from webvirt.errors import ApiError

log = logging.getLogger(__name__)
H = TypeVar("H")
# Set by streams() on the handlers of event streams, which have no time budget.
STREAMS_ATTR = "webvirt_streams"
# After a request's time, what its named waits need to answer (504 naming what they waited
# for); a request still going then waits for something that has no bound (a bug).
MARGIN_S = 2.0
CLIENT_CLOSED = 499


def error_body(status: int, code: str, detail: str) -> web.Response:
    return web.json_response({"detail": detail, "code": code, "status": status}, status=status,
                             headers={"X-Content-Type-Options": "nosniff"})


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as err:
        log.info("%s %s -> %d %s", request.method, request.path, err.status, err.detail)
        return error_body(err.status, err.code, err.detail)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp says how large a body may be (and was) in the text of its 413.
        detail = exc.text if isinstance(exc, web.HTTPRequestEntityTooLarge) else exc.reason
        response = error_body(exc.status, exc.reason.lower().replace(" ", "_"), detail or "")
        for name in ("Allow", "WWW-Authenticate"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except ConnectionResetError:
        # The client hung up before its request was read whole (or answered): nobody to answer,
        # nothing wrong here. 499, as nginx logs it ("client closed request").
        log.debug("%s %s: the client hung up before its request was read whole",
                  request.method, request.path)
        return error_body(CLIENT_CLOSED, "client_closed_request", "the client hung up")
    except Exception:
        # A bug, not bad input: say so in the log with the traceback, and in JSON to the client.
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_body(500, "internal_error", "internal server error; see the server log")


def streams(handler: H) -> H:
    """Marks a route's handler as an event stream: it answers for as long as it is wanted."""
    setattr(handler, STREAMS_ATTR, True)
    return handler


def request_budget(seconds: float) -> Middleware:
    """Each request gets `seconds` (--call-timeout) for all its waits together
    (webvirt/deadline.py): each names what it waited for when that runs out. An explicit wait
    (?wait) adds its own time."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if getattr(request.match_info.handler, STREAMS_ATTR, False):
            return await handler(request)
        began = asyncio.get_running_loop().time()
        with deadline.budget(seconds) as budget:
            budget.margin = MARGIN_S
            budget.timeout = timeout = asyncio.timeout(seconds + MARGIN_S)
            try:
                async with timeout:
                    return await handler(request)
            except TimeoutError:
                if not timeout.expired():
                    raise  # the handler's own
        waited = round(asyncio.get_running_loop().time() - began)
        log.error("%s %s was still waiting after %g s, for something that has no bound "
                  "(a bug)", request.method, request.path, waited)
        raise ApiError(f"webvirt did not answer within {waited:g} s; see its log",
                       status=504, code="request_timeout")

    return middleware
