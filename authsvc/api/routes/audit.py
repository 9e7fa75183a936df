"""`GET /v1/audit`: who touched a patient's record, and when (the HIPAA accounting question).

Admins only, their own organization only. The audit rows hold identifiers, never clinical
content; the patient is named by MRN in the query and answered by its opaque patient id.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from flask import Response, current_app, g, jsonify, request
from flask_smorest import Blueprint

from authsvc.adapters.db import audit
from authsvc.adapters.db import tables as t
from authsvc.api.auth import requires
from authsvc.api.errors import ApiProblem, bad_cursor
from authsvc.api.request_body import limit_arg
from authsvc.domain import clock

blp = Blueprint("audit", __name__, url_prefix="/v1/audit",
                description="The PHI-access audit trail (admins)")
ROLES = ("admin",)
FIELDS = ("id", "at", "token_id", "role", "action", "entity_type", "entity_id", "patient_id",
          "outcome", "request_id", "source_ip", "reason")


def _bad(field: str, message: str) -> ApiProblem:
    return ApiProblem(422, f"{field}: {message}", errors=[
        {"field": field, "code": "invalid_format", "message": message}])


def _time_arg(name: str, end: bool) -> dt.datetime | None:
    """A date (whole day, `to` inclusive) or an RFC 3339 time with an offset."""
    raw = request.args.get(name)
    if raw is None:
        return None
    if not raw.isascii() or len(raw) > 40:
        raise _bad(name, "a date YYYY-MM-DD or an RFC 3339 time")
    try:
        if len(raw) == 10:
            day = dt.date.fromisoformat(raw)
            start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
            return start + dt.timedelta(days=1) if end else start
        value = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise _bad(name, "a date YYYY-MM-DD or an RFC 3339 time") from None
    if value.tzinfo is None:
        raise _bad(name, "an RFC 3339 time needs an offset (Z or +hh:mm)")
    return value.astimezone(dt.UTC)


def _cursor() -> int:
    raw = request.args.get("cursor")
    if raw is None:
        return 0
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise bad_cursor()
    return int(raw)


def _item(row: dict) -> dict:
    out = {k: row[k] for k in FIELDS}
    out["at"] = row["at"].astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    return out


@blp.route("", methods=["GET"])
@blp.doc(**{"x-roles": list(ROLES)}, parameters=[
    {"name": "patient_mrn", "in": "query", "schema": {"type": "string", "maxLength": 64}},
    {"name": "from", "in": "query", "schema": {"type": "string"}},
    {"name": "to", "in": "query", "schema": {"type": "string"}},
    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
], responses={"200": {"description": "Audit events, oldest first, cursor-paginated"}})
@requires(*ROLES)
def list_audit() -> Response:
    """Audit events of the caller's organization, optionally for one patient and a period."""
    limit = limit_arg()
    start, end = _time_arg("from", end=False), _time_arg("to", end=True)
    if start is not None and end is not None and end < start:
        raise ApiProblem(422, "to is before from.", errors=[
            {"field": "to", "code": "invalid_date_range", "message": "before from"}])
    mrn = request.args.get("patient_mrn")
    if mrn is not None and (not mrn or len(mrn) > 64 or not mrn.isascii()):
        raise _bad("patient_mrn", "1-64 ASCII characters")
    after = _cursor()
    actor = g.actor
    with current_app.extensions["authsvc"].engine.begin() as conn:
        patient_id = None
        if mrn is not None:
            p = t.patients
            patient_id = conn.execute(sa.select(p.c.id).where(
                p.c.org_id == actor.org_id, p.c.mrn == mrn)).scalar()
        rows = [] if mrn is not None and patient_id is None else audit.search(
            conn, actor.org_id, patient_id=patient_id, start=start, end=end, after_id=after,
            limit=limit)
        audit.append(conn, at=clock.now(), org_id=actor.org_id, token_id=actor.token_id,
                     role=actor.role, action="search", entity_type="audit",
                     patient_id=patient_id, outcome="success", request_id=actor.request_id,
                     source_ip=actor.source_ip)
    items = [_item(r) for r in rows]
    next_cursor = str(rows[-1]["id"]) if len(rows) == limit else None
    return jsonify({"items": items, "next_cursor": next_cursor})
