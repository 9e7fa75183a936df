"""The billing feed: every payer decision per line, in commit order, exactly once."""

from __future__ import annotations

from flask import Response, current_app, g, request
from flask_smorest import Blueprint

from authsvc.adapters.db import repo
from authsvc.api.auth import requires
from authsvc.api.errors import bad_cursor
from authsvc.api.request_body import limit_arg
from authsvc.domain import clock
from authsvc.service_layer import outcomes, views

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
    actor = g.actor
    try:
        # One transaction for the page and its audit row (the generic per-request audit
        # would open a second one): billing pages through the feed in bulk.
        with current_app.extensions["authsvc"].engine.begin() as conn:
            body = outcomes.feed_page_json(conn, actor.org_id, request.args.get("after"),
                                           limit)
            repo.add_audit(conn, at=clock.now(), org_id=actor.org_id, token_id=actor.token_id,
                           role=actor.role, action="search", entity_type="outcome",
                           outcome="success", request_id=actor.request_id,
                           source_ip=actor.source_ip)
    except views.BadCursor:
        raise bad_cursor("after") from None
    return Response(body, status=200, mimetype="application/json")
