"""The gateway's Prometheus metrics: HTTP requests by route and status, their latency, requests in flight.

A plain ASGI middleware around the whole app (so 401s, 404s and 413s are counted too) and the
``GET /metrics`` route. Requests are labelled by route template (``cli/gateway_trace.route_of``:
``/v1/actors/{actor}/{method}``, never the actor or the path a client made up), so the label values
stay few. The latency histogram is ``actors/histogram.py``'s (no lock: uvicorn runs the app on one
loop, and ``/metrics`` renders on that loop too); a streamed response's latency runs to its last event.

``/metrics`` does not ask for the gateway's API key: scrapers rarely carry one, and the series say
only how many requests each route had and how long they took (no session, actor, model or body).
A gateway open to the internet can turn it off with ``--no-metrics``, or be scraped on a port of its
own that stays private.
"""
from __future__ import annotations

import time
from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from ..actors.histogram import Histogram
from ..actors.prometheus import CONTENT_TYPE, histogram_family, new_registry, render
from .gateway_trace import ASGI, route_of


_METHODS = frozenset({"GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"})  # others: "OTHER"


class GatewayMetrics(Collector):
    """Counts per (method, route, status), a latency histogram per route, and requests in flight."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.in_flight = 0
        self.registry = new_registry()
        self.registry.register(self)

    def wrap(self, app: ASGI) -> ASGI:
        async def counted(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            t0 = time.monotonic()
            status = [500]  # an app that raised before it answered: uvicorn answers 500

            async def send_counted(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    status[0] = int(message["status"])
                await send(message)

            self.in_flight += 1
            try:
                await app(scope, receive, send_counted)
            finally:
                self.in_flight -= 1
                self.note(scope.get("method", "GET"), route_of(scope.get("path", "")) or "other", status[0], t0)
        return counted

    def note(self, method: str, route: str, status: int, t0: float) -> None:
        now = time.monotonic()
        key = (method if method in _METHODS else "OTHER", route, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        h = self.latency.get(route)
        if h is None:
            h = self.latency[route] = Histogram(now=now)
        h.observe((now - t0) * 1000, now)

    async def endpoint(self, request: Request) -> Response:
        return Response(render(self.registry), media_type=CONTENT_TYPE)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        req = CounterMetricFamily("nalar_gateway_http_requests", "HTTP requests answered, by method, route and "
                                  "status", labels=["method", "route", "status"])
        for (m, r, s), n in sorted(self.requests.items()):
            req.add_metric([m, r, s], n)
        yield req
        yield histogram_family("nalar_gateway_http_request_duration_seconds", "time from a request's arrival to "
                               "its response's end (a stream's last event)", ["route"],
                               (([r], h) for r, h in sorted(self.latency.items())))
        g = GaugeMetricFamily("nalar_gateway_http_requests_in_flight", "HTTP requests being answered now")
        g.add_metric([], self.in_flight)
        yield g
