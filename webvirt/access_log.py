"""The access log, one line per request, with ?token= values left out."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from yarl import URL

from webvirt import log_output

TOKEN_PARAMETER = "token"
FORMAT = '%s "%s %s HTTP/%d.%d" %d %d %.6fs'


def without_token(url: URL) -> str:
    """The URL with every token= value hidden, whatever the case of the key (the Guard only
    accepts `token`, but a wrong or mistyped one is still somebody's secret)."""
    hidden = {key: "***" for key in url.query if key.lower() == TOKEN_PARAMETER}
    return str(url.update_query(hidden) if hidden else url)


class AccessLogger(AbstractAccessLogger):
    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        self._fast_log = log_output.fast_lane(logger)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        target = request.raw_path
        if "?" in target:
            target = without_token(request.rel_url)
        # Plain str and numbers only, so that the line can be formatted later, on the log thread.
        args = (request.remote, request.method, target, *request.version, response.status,
                response.body_length, time)
        if self._fast_log is not None:
            self._fast_log(FORMAT, args)
        else:
            self.logger.info(FORMAT, *args)
