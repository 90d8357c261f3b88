"""Prometheus metrics of the template service (``GET /metrics``).

Aggregate only: no tenant, subject or template id reaches a label. The route label is the
matched route's template (``/v1/subjects/{subject_id}/verify``) or ``other``, so no client can
grow the set of series. With several worker processes (``--workers N``) every worker writes its
samples to files under ``PROMETHEUS_MULTIPROC_DIR`` (``advface serve`` sets it) and a scrape
answered by any worker sums them all.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: from a cached health probe to an AdvFace enrolment on a loaded CPU.
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Any other method a client sends is labelled "other" (clients choose the method string).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_COMPUTE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _StateCollector(Collector):
    """What the answering worker knows at scrape time: the build and whether it is ready."""

    def __init__(self, info: dict[str, str], ready: Callable[[], bool]) -> None:
        self.info, self.ready = info, ready

    def collect(self) -> Iterable[Any]:
        build = InfoMetricFamily("advface_build", "Service build and configuration")
        build.add_metric([], self.info)
        yield build
        ready = GaugeMetricFamily(
            "advface_ready", "1 when the answering worker is ready (see /ready), else 0"
        )
        ready.add_metric([], 1.0 if self.ready() else 0.0)
        yield ready


class ServiceMetrics:
    """The service's counters and histograms, and their exposition.

    ``info``: label values of ``advface_build_info`` (version, protection, backend, Psi
    version); ``ready``: whether this worker is ready, read at each scrape.
    """

    def __init__(self, info: dict[str, str], ready: Callable[[], bool]) -> None:
        # prometheus_client chose its storage when first imported (from the environment
        # then); the exposition must follow that choice, not the environment now.
        self.multiprocess = values.ValueClass is not values.MutexValue
        if self.multiprocess and not os.path.isdir(os.environ.get(MULTIPROC_ENV, "")):
            raise ValueError(
                f"{MULTIPROC_ENV} must name an existing folder for multiprocess metrics, got "
                f"{os.environ.get(MULTIPROC_ENV)!r}"
            )
        # Multiprocess samples live in files and are collected at scrape time; otherwise each
        # app has its own registry (several apps in one process, as in the tests, stay apart).
        reg = None if self.multiprocess else CollectorRegistry()
        self._registry = reg
        self.requests = Counter(
            "advface_http_requests",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=reg,
        )
        self.request_seconds = Histogram(
            "advface_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response",
            ["route", "method"],
            buckets=_REQUEST_BUCKETS,
            registry=reg,
        )
        self.protection_seconds = Histogram(
            "advface_protection_seconds",
            "Time the protection takes per enrolled feature map (compute only)",
            buckets=_COMPUTE_BUCKETS,
            registry=reg,
        )
        self.psi_seconds = Histogram(
            "advface_psi_seconds",
            "Time Psi takes per embedding, enrolments and probes (compute only)",
            buckets=_COMPUTE_BUCKETS,
            registry=reg,
        )
        self.decisions = Counter(
            "advface_decisions",
            "Verify and identify answers at the operating threshold (identify: its best "
            "candidate), by kind and whether it was a match",
            ["kind", "match"],
            registry=reg,
        )
        self._state = CollectorRegistry()
        self._state.register(_StateCollector(info, ready))

    def decision(self, kind: str, match: bool) -> None:
        """Count a verify (``kind="verify"``) or identify answer."""
        self.decisions.labels(kind, "true" if match else "false").inc()

    def exposition(self) -> bytes:
        """Every sample in Prometheus' text format (all workers' in multiprocess mode)."""
        if self.multiprocess:
            from prometheus_client import multiprocess

            reg = CollectorRegistry()
            multiprocess.MultiProcessCollector(reg)
        else:
            assert self._registry is not None
            reg = self._registry
        return generate_latest(reg) + generate_latest(self._state)


def route_template(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The path template of the route ``scope`` goes to (``other`` when none matches)."""
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return str(getattr(route, "path", "other"))
        if match is Match.PARTIAL and partial is None:  # the path fits, the method does not
            partial = str(getattr(route, "path", "other"))
    return partial or "other"


class MetricsMiddleware:
    """ASGI middleware counting every HTTP response and timing it; outermost, so refusals by
    the request guard (401, 413, 429, 503) are counted too. ``routes``: the service's routes
    (their path templates label the samples)."""

    def __init__(
        self, app: ASGIApp, *, metrics: ServiceMetrics, routes: Sequence[BaseRoute]
    ) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500  # an exception that escapes the app is answered with a 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = route_template(self.routes, scope)
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.request_seconds.labels(route, method).observe(time.perf_counter() - t0)
