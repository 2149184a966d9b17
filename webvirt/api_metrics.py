"""GET /metrics: Prometheus metrics, read from libvirt at each scrape (webvirt/domain_stats.py)."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp_apigami import docs
from prometheus_client.aiohttp import make_aiohttp_handler

from webvirt import domain_stats
from webvirt.appkeys import HOSTS, METRICS
from webvirt.domain_stats import Sample
from webvirt.errors import ApiError
from webvirt.host import Host
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
    hosts = request.app[HOSTS]
    if hosts.several:  # side by side; one that is late is down for this scrape
        samples: list[tuple[str | None, Sample | None]] = [
            (host.name, sample) for host, sample in await hosts.each(read, "scrape")]
    else:
        samples = [(None, await read(hosts.default))]
    # prometheus-client's own handler: content negotiation (text or OpenMetrics), gzip.
    handler = make_aiohttp_handler(Scrape(samples, request.app[METRICS]))
    response = await handler(request)
    assert isinstance(response, web.Response)
    return response


async def read(host: Host) -> Sample | None:
    try:
        return await domain_stats.read_spread(host.call_each, host.connection_count)
    except ApiError as err:
        log.debug("scrape: libvirt at %s could not be read: %s", host.name, err.detail)
        return None
