"""The access log, one line per request, with ?token= values left out."""

from __future__ import annotations

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

TOKEN_PARAMETER = "token"


class AccessLogger(AbstractAccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        target = request.rel_url
        if TOKEN_PARAMETER in target.query:
            # Plugins that can only set a URL pass the token there; logs must not keep it.
            target = target.update_query({TOKEN_PARAMETER: "***"})
        self.logger.info('%s "%s %s HTTP/%d.%d" %d %d %.6fs', request.remote, request.method,
                         target, *request.version, response.status, response.body_length,
                         time)
