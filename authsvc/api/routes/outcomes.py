"""The billing feed: every payer decision per line, in commit order, exactly once."""

from __future__ import annotations

from flask import Response, current_app, g, jsonify, request
from flask_smorest import Blueprint

from authsvc.api.auth import requires
from authsvc.api.errors import ApiProblem
from authsvc.api.request_body import limit_arg
from authsvc.service_layer import views

blp = Blueprint("outcomes", __name__, url_prefix="/v1/outcomes",
                description="Approval outcomes for billing systems")
ROLES = ("billing", "admin")


@blp.route("", methods=["GET"])
@blp.doc(**{"x-roles": list(ROLES)}, parameters=[
    {"name": "after", "in": "query", "schema": {"type": "string"}},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
], responses={"200": {"description": "Outcomes after the cursor; next_cursor is never null"}})
@requires(*ROLES)
def list_outcomes() -> Response:
    """Outcomes after a cursor; store `next_cursor` and never miss or double-count one."""
    limit = limit_arg()
    try:
        with current_app.extensions["authsvc"].engine.connect() as conn:
            page = views.outcome_feed(conn, g.actor.org_id, request.args.get("after"), limit)
    except views.BadCursor:
        raise ApiProblem(400, "The cursor is not readable.") from None
    return jsonify(page)
