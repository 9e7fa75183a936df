"""Reports: CMS-0057-F prior-authorization metrics, as JSON or CSV."""

from __future__ import annotations

import datetime as dt

from flask import Response, current_app, g, jsonify, request
from flask_smorest import Blueprint

from authsvc.adapters.db import repo
from authsvc.api.auth import requires
from authsvc.api.errors import ApiProblem
from authsvc.domain import clock
from authsvc.service_layer import reports

blp = Blueprint("reports", __name__, url_prefix="/v1/reports",
                description="Prior-authorization metrics")
ROLES = ("coordinator", "admin")
MAX_DAYS = 3 * 366


def _date_arg(name: str, default: dt.date, errors: list[dict]) -> dt.date:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        if len(raw) != 10:
            raise ValueError
        day = dt.date.fromisoformat(raw)
    except ValueError:
        errors.append({"field": name, "code": "invalid_format", "message": "YYYY-MM-DD"})
        return default
    if not reports.in_range(day):
        errors.append({"field": name, "code": "out_of_range",
                       "message": f"a date from {reports.EARLIEST} to {reports.LATEST}"})
        return default
    return day


@blp.route("/prior-auth-metrics", methods=["GET"])
@blp.doc(**{"x-roles": list(ROLES)}, parameters=[
    {"name": "from", "in": "query", "schema": {"type": "string", "format": "date"},
     "description": "first decision date (UTC, inclusive); default 30 days before `to`"},
    {"name": "to", "in": "query", "schema": {"type": "string", "format": "date"},
     "description": "last decision date (UTC, inclusive); default today"},
    {"name": "payer_id", "in": "query", "schema": {"type": "string"}},
], responses={"200": {"description": "Figures per payer and urgency; CSV with Accept: text/csv",
                      "content": {"application/json": {}, "text/csv": {}}}})
@requires(*ROLES)
def prior_auth_metrics() -> Response:
    """Approved, denied, approved after appeal, extended and decision times per group."""
    errors: list[dict] = []
    today = clock.now().date()
    end = _date_arg("to", today, errors)
    start = _date_arg("from", reports.default_start(end), errors)
    if not errors and start > end:
        errors.append({"field": "from", "code": "invalid_date_range", "message": "after `to`"})
    if not errors and (end - start).days > MAX_DAYS:
        errors.append({"field": "from", "code": "out_of_range",
                       "message": "at most three years per report"})
    payer_id = request.args.get("payer_id") or None
    if payer_id is not None and len(payer_id) > 64:
        errors.append({"field": "payer_id", "code": "out_of_range", "message": "too long"})
    if errors:
        raise ApiProblem(422, "Unusable query parameters; see errors.", errors=errors)
    actor = g.actor
    with current_app.extensions["authsvc"].engine.begin() as conn:
        report = reports.prior_auth_metrics(conn, actor.org_id, start, end, payer_id)
        repo.add_audit(conn, at=clock.now(), org_id=actor.org_id, token_id=actor.token_id,
                       role=actor.role, action="export", entity_type="report",
                       entity_id="prior-auth-metrics", outcome="success",
                       request_id=actor.request_id, source_ip=actor.source_ip)
    best = request.accept_mimetypes.best_match(["application/json", "text/csv"])
    if best == "text/csv" and request.accept_mimetypes["text/csv"] > \
            request.accept_mimetypes["application/json"]:
        resp = Response(reports.to_csv(report), status=200, mimetype="text/csv")
        resp.headers["Content-Disposition"] = (
            f'attachment; filename="prior-auth-metrics-{start}-{end}.csv"')
        return resp
    return jsonify(report)
