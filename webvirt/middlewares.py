"""Every request answers: within its time (webvirt/deadline.py), except an event stream, and
as JSON when it fails ({"detail": ..., "code": ..., "status": ...}). One middleware for both:
each layer costs every request."""

from __future__ import annotations

import asyncio
import logging
from typing import TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from webvirt.deadline import MARGIN_S, Budgets
from webvirt.errors import ApiError

log = logging.getLogger(__name__)
H = TypeVar("H")
# Set by streams() on the handlers of event streams, which have no time budget.
STREAMS_ATTR = "webvirt_streams"
CLIENT_CLOSED = 499


def error_body(status: int, code: str, detail: str) -> web.Response:
    return web.json_response({"detail": detail, "code": code, "status": status}, status=status,
                             headers={"X-Content-Type-Options": "nosniff"})


def streams(handler: H) -> H:
    """Marks a route's handler as an event stream: it answers for as long as it is wanted."""
    setattr(handler, STREAMS_ATTR, True)
    return handler


def answers(budgets: Budgets) -> Middleware:
    """Each request gets --call-timeout for all its waits together: each names what it waited
    for when that runs out (504). An explicit wait (?wait) adds its own time; a request still
    waiting past its time and MARGIN_S is ended by the sweep (a 504, and an error line: a wait
    nothing bounds is a bug)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        budget = None if getattr(request.match_info.handler, STREAMS_ATTR, False) \
            else budgets.begin()
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
            response = error_body(exc.status, exc.reason.lower().replace(" ", "_"),
                                  detail or "")
            for name in ("Allow", "WWW-Authenticate"):
                if name in exc.headers:
                    response.headers[name] = exc.headers[name]
            return response
        except ConnectionResetError:
            # The client hung up before its request was read whole (or answered): nobody to
            # answer, nothing wrong here. 499, as nginx logs it ("client closed request").
            log.debug("%s %s: the client hung up before its request was read whole",
                      request.method, request.path)
            return error_body(CLIENT_CLOSED, "client_closed_request", "the client hung up")
        except asyncio.CancelledError:
            # The sweep's cancel, and no other (webvirt stopping cancels too).
            if budget is None or not budget.overdue or (budget.owner and budget.owner.uncancel()):
                raise
            waited = round(asyncio.get_running_loop().time() - budget.began, 1)
            log.error("%s %s was still waiting %g s after its time, for something that has no "
                      "bound (a bug)", request.method, request.path, MARGIN_S)
            return error_body(504, "request_timeout",
                              f"webvirt did not answer within {waited:g} s; see its log")
        except Exception:
            # A bug, not bad input: say so in the log with the traceback, and in JSON.
            log.exception("unhandled error in %s %s", request.method, request.path)
            return error_body(500, "internal_error", "internal server error; see the server log")
        finally:
            if budget is not None:
                budgets.end(budget)

    return middleware
