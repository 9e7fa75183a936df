"""Dramatiq workers. `setup(settings)` sets the broker *before* the actors are imported."""

from __future__ import annotations

from authsvc.bootstrap import Services
from authsvc.config import Settings

_services: Services | None = None


def services() -> Services:
    if _services is None:
        raise RuntimeError("workers.setup() was not called")
    return _services


def setup(settings: Settings, broker=None, svc: Services | None = None):  # type: ignore[no-untyped-def]
    """Create the broker (unless given) and services, then register the actors on it."""
    import dramatiq

    from authsvc.adapters.broker import make_broker
    from authsvc.bootstrap import bootstrap

    global _services
    broker = broker or make_broker(settings)
    dramatiq.set_broker(broker)
    _services = svc or bootstrap(settings, pool_size=settings.worker_threads + 1)
    import importlib
    import sys

    if "workers.actors" in sys.modules:
        importlib.reload(sys.modules["workers.actors"])  # bind the actors to this broker
    else:
        importlib.import_module("workers.actors")
    if "workers.delivery" in sys.modules:
        importlib.reload(sys.modules["workers.delivery"])  # webhook deliveries (issue 7)
    else:
        importlib.import_module("workers.delivery")
    if "workers.notify" in sys.modules:
        importlib.reload(sys.modules["workers.notify"])  # notifications (issue 6)
    else:
        importlib.import_module("workers.notify")
    return broker
