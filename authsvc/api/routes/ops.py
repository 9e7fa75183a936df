"""Operations endpoints: no auth, no PHI."""

from __future__ import annotations

import sqlalchemy as sa
from flask import Blueprint, Response, current_app, jsonify

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    services = current_app.extensions["authsvc"]
    checks: dict[str, str] = {}
    try:
        with services.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
        checks["database"] = f"unavailable: {type(exc).__name__}"
    try:
        current_app.extensions["authsvc_redis"].ping()
        checks["broker"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["broker"] = f"unavailable: {type(exc).__name__}"
    checks["rules"] = services.rules.last_error or "ok"
    ok = checks["database"] == "ok" and checks["broker"] == "ok"
    return jsonify({"status": "ok" if ok else "unavailable", "checks": checks}), 200 if ok else 503


@bp.get("/metrics")
def metrics() -> Response:
    from authsvc.api import metrics as m

    body, content_type = m.render()
    return Response(body, content_type=content_type)
