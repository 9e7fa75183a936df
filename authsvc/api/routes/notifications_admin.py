"""`GET /v1/admin/notifications?order_id=`: what was sent to whom (by role), on which channel,
with which template and status. Admins only; never the message text or the address."""

from __future__ import annotations

from flask import Response, current_app, g, jsonify, request
from flask_smorest import Blueprint

from authsvc.adapters.db import repo
from authsvc.api.auth import requires
from authsvc.api.errors import ApiProblem
from authsvc.api.request_body import limit_arg
from authsvc.domain import clock
from authsvc.service_layer import notifications

blp = Blueprint("notifications_admin", __name__, url_prefix="/v1/admin/notifications",
                description="Patient, caregiver and provider notifications (admins)")
ROLES = ("admin",)


def _id_arg(name: str, *, problem_status: int) -> str | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    if not raw or len(raw) > 40 or not raw.isascii() or not raw.replace("_", "").isalnum():
        if problem_status == 400:
            raise ApiProblem(400, "The cursor is not readable.")
        raise ApiProblem(422, f"{name} is not an id.", errors=[
            {"field": name, "code": "invalid_format", "message": "an id such as ord_…"}])
    return raw


@blp.route("", methods=["GET"])
@blp.doc(**{"x-roles": list(ROLES)}, parameters=[
    {"name": "order_id", "in": "query", "schema": {"type": "string", "maxLength": 40}},
    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
], responses={"200": {"description": "Notifications, oldest first, cursor-paginated"}})
@requires(*ROLES)
def list_notifications() -> Response:
    """The organization's notifications (optionally of one order): status, never content."""
    limit = limit_arg()
    order_id = _id_arg("order_id", problem_status=422)
    after = _id_arg("cursor", problem_status=400)
    actor = g.actor
    with current_app.extensions["authsvc"].engine.begin() as conn:
        page = notifications.admin_list(conn, actor.org_id, order_id, after, limit)
        repo.add_audit(conn, at=clock.now(), org_id=actor.org_id, token_id=actor.token_id,
                       role=actor.role, action="read", entity_type="notification",
                       entity_id=order_id, outcome="success", request_id=actor.request_id,
                       source_ip=actor.source_ip)
    return jsonify(page)
