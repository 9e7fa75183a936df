"""The HTTP API: `create_app(settings)` builds everything; nothing happens at import."""

from __future__ import annotations

import logging
import re
import time
import uuid

from flask import Flask, Response, g, request
from flask_smorest import Api

from authsvc.config import Settings

log = logging.getLogger(__name__)
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def create_app(settings: Settings | None = None, services=None) -> Flask:  # type: ignore[no-untyped-def]
    """The Flask app: blueprints, error handlers, OpenAPI document and `/docs`."""
    from authsvc.adapters.broker import make_redis
    from authsvc.api import errors, metrics
    from authsvc.api.errors import ApiProblem
    from authsvc.api.routes import audit, callbacks, ops, orders, outcomes
    from authsvc.bootstrap import bootstrap

    settings = settings or Settings.from_env()
    services = services or bootstrap(settings)
    app = Flask("authsvc", static_folder=None)  # no /static route (S12 inventory)
    app.config.update(
        MAX_CONTENT_LENGTH=11 * 1024 * 1024,  # the attachment limit; JSON routes check 256 KiB
        API_TITLE="authsvc", API_VERSION="1", OPENAPI_VERSION="3.1.0",
        OPENAPI_URL_PREFIX="/", OPENAPI_JSON_PATH="openapi.json",
        # /docs loads Swagger UI from a CDN on the dashboard's origin: a pinned version, and
        # none at all in production (the machine-readable /openapi.json stays)
        OPENAPI_SWAGGER_UI_PATH=None if settings.production else "docs",
        OPENAPI_SWAGGER_UI_URL="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.17.14/",
        JSON_SORT_KEYS=False,
    )
    app.extensions["authsvc"] = services
    app.extensions["authsvc_redis"] = make_redis(settings)
    api = Api(app, spec_kwargs={"info": {"description": "Prior authorization and eligibility"}})
    api.spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    api.spec.options["security"] = [{"bearer": []}]
    from authsvc.api.routes import (
        cases,
        cds,
        coverage,
        notifications_admin,
        reports,
        rules_admin,
        subscriptions,
    )

    for blp in (orders.blp, outcomes.blp, callbacks.blp, audit.blp, coverage.blp,
                rules_admin.blp, cases.blp, subscriptions.blp, reports.blp, cds.blp,
                notifications_admin.blp):
        api.register_blueprint(blp)
    app.register_blueprint(ops.bp)
    errors.register(app)
    from authsvc.api import security

    security.init_app(app, settings, services)
    from authsvc.api import dashboard  # coordinators' pages under /app/ (docs/dashboard.md)

    dashboard.mount(app, settings)

    @app.before_request
    def _begin() -> None:
        g.started = time.perf_counter()
        rid = request.headers.get("X-Request-Id")
        if rid is not None and not REQUEST_ID_RE.fullmatch(rid):
            raise ApiProblem(400, "X-Request-Id must be 1-64 characters of [A-Za-z0-9._:-].")
        g.request_id = rid or uuid.uuid4().hex
        for value in request.headers.values():
            if "\r" in value or "\n" in value:
                raise ApiProblem(400, "Header values must not contain line breaks.")

    @app.after_request
    def _finish(resp: Response) -> Response:
        resp.headers["X-Request-Id"] = g.get("request_id", "")
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Cache-Control"] = "no-store"
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["Referrer-Policy"] = "no-referrer"
        route = request.url_rule.rule if request.url_rule else "unmatched"
        started = g.get("started")
        if started is not None:
            metrics.observe(request.method, route, resp.status_code,
                            time.perf_counter() - started)
        return resp

    return app
