"""Prometheus metrics (`authsvc_` prefix). Labels carry route templates, never ids.

With `PROMETHEUS_MULTIPROC_DIR` set (always under `authsvc serve`), `/metrics` sums every
process writing to that directory: the gunicorn workers, and also `authsvc worker` and
`authsvc scheduler` when they are given the same directory (`make run` does; see
docs/operations.md › Worker metrics), which is how the notification send counters counted in
the worker show up here.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

REQUESTS = Counter("authsvc_http_requests", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram("authsvc_http_request_seconds", "HTTP request latency", ["method", "route"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))


def observe(method: str, route: str, status: int, seconds: float) -> None:
    REQUESTS.labels(method, route, str(status)).inc()
    LATENCY.labels(method, route).observe(seconds)


def render() -> tuple[bytes, str]:
    """All processes' metrics under gunicorn (multiprocess dir), else this process's."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
