"""GET /metrics: Prometheus metrics, read from libvirt at each scrape (webvirt/domain_stats.py)."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp_apigami import docs
from prometheus_client.aiohttp import make_aiohttp_handler

from webvirt import domain_stats
from webvirt.appkeys import HOST, METRICS
from webvirt.errors import ApiError
from webvirt.metrics import Scrape

log = logging.getLogger(__name__)


@docs(
    tags=["server"],
    summary="Prometheus metrics",
    description=(
        "Prometheus text format (OpenMetrics when asked for), written by prometheus-client: "
        "`libvirt_up`, `libvirt_domain_info_*`, `libvirt_domain_block_stats_*` and "
        "`libvirt_domain_interface_stats_*` as the libvirt exporters name them (labelled "
        "`domain`, and `target_device` for disks and interfaces), and webvirt's own "
        "`webvirt_*`. Read from libvirt at each scrape. While libvirt is unreachable, "
        "`libvirt_up` is 0 and the domain metrics are left out. Same token rule as /api/ "
        "(a read token may read it)."
    ),
    responses={200: {"description": "Metrics",
                     "content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(request: web.Request) -> web.Response:
    try:
        host = request.app[HOST]
        sample = await domain_stats.read_spread(host.call, host.connection_count)
    except ApiError as err:
        log.debug("scrape: libvirt could not be read: %s", err.detail)
        sample = None
    # prometheus-client's own handler: content negotiation (text or OpenMetrics), gzip.
    handler = make_aiohttp_handler(Scrape(sample, request.app[METRICS]))
    response = await handler(request)
    assert isinstance(response, web.Response)
    return response
