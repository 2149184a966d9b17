"""Every error leaves as JSON: {"detail": ..., "code": ..., "status": ...}."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from webvirt.errors import ApiError

log = logging.getLogger(__name__)


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
        response = error_body(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
        for name in ("Allow", "WWW-Authenticate"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except Exception:
        # A bug, not bad input: say so in the log with the traceback, and in JSON to the client.
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_body(500, "internal_error", "internal server error; see the server log")
