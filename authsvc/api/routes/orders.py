"""Orders: intake with a synchronous determination, reads, cancellation."""

from __future__ import annotations

from flask import Response, current_app, g, jsonify, request
from flask_smorest import Blueprint

from authsvc.adapters.db import repo
from authsvc.api import idempotency
from authsvc.api.auth import requires
from authsvc.api.errors import ApiProblem, bad_cursor
from authsvc.api.request_body import json_object, limit_arg, validated_order
from authsvc.domain import clock
from authsvc.domain.orders import ORDER_STATUSES
from authsvc.service_layer import orders, views
from schemas.order_actions import CoverageFixSchema, ExtensionSchema, ResolveSchema
from schemas.orders import OrderSchema

blp = Blueprint("orders", __name__, url_prefix="/v1/orders",
                description="Treatment orders and their per-line determinations")

IDEMPOTENCY_HEADER = {"name": "Idempotency-Key", "in": "header", "required": True,
                      "schema": {"type": "string", "minLength": 1, "maxLength": 255}}
ORDER_BODY = {"required": True, "content": {"application/json": {"schema": OrderSchema}}}
ORDER_ROLES = ("clinician", "coordinator", "admin")


def _services():  # type: ignore[no-untyped-def]
    return current_app.extensions["authsvc"]


def _audit_read(conn, order_id: str) -> None:  # type: ignore[no-untyped-def]
    from authsvc.adapters.db import repo
    from authsvc.domain import clock

    actor = g.actor
    row = repo.order_row(conn, order_id, actor.org_id)
    repo.add_audit(conn, at=clock.now(), org_id=actor.org_id, token_id=actor.token_id,
                   role=actor.role, action="read", entity_type="order", entity_id=order_id,
                   patient_id=row["patient_id"] if row else None, outcome="success",
                   request_id=actor.request_id, source_ip=actor.source_ip)


@blp.route("", methods=["POST"])
@blp.doc(parameters=[IDEMPOTENCY_HEADER], requestBody=ORDER_BODY, **{"x-roles": list(ORDER_ROLES)},
         responses={"201": {"description": "The stored order with its determinations"}})
@requires(*ORDER_ROLES)
def create_order() -> Response:
    """Submit a treatment order; answers with the rules' determination per line."""
    raw = json_object()
    body = validated_order(raw)
    services = _services()

    def work(conn, patient_id):  # type: ignore[no-untyped-def]
        order_id, view = orders.submit_order(services, g.actor, body, conn,
                                             subscriptions=g.get("org_subscriptions"),
                                             patient_id=patient_id)
        return 201, view or views.order_view(conn, g.actor.org_id, order_id)

    # the patient upsert rides with the Idempotency-Key claim (PostgreSQL)
    patient = (repo.patient_upsert_when,
               repo.patient_values(g.actor.org_id, body["patient"], clock.now()))
    return idempotency.run(work, required=True, raw_body=raw, location="/v1/orders/{id}",
                           first_write=patient)


@blp.route("", methods=["GET"])
@blp.doc(**{"x-roles": list(ORDER_ROLES)}, parameters=[
    {"name": "status", "in": "query", "schema": {"type": "string", "enum": list(ORDER_STATUSES)}},
    {"name": "mrn", "in": "query", "schema": {"type": "string", "minLength": 1, "maxLength": 64}},
    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
], responses={"200": {"description": "A page of orders, newest first"}})
@requires(*ORDER_ROLES)
def list_orders() -> Response:
    """Orders of the caller's organization, newest first, cursor-paginated."""
    status = request.args.get("status")
    if status is not None and status not in ORDER_STATUSES:
        raise ApiProblem(422, "Unknown status.", errors=[{
            "field": "status", "code": "invalid_choice", "message": "not an order status"}])
    mrn = request.args.get("mrn")
    if mrn is not None and not (1 <= len(mrn) <= 64):
        raise ApiProblem(422, "mrn must be 1-64 characters.", errors=[{
            "field": "mrn", "code": "out_of_range", "message": "1 to 64 characters"}])
    limit = limit_arg()
    try:
        with _services().engine.connect() as conn:
            page = views.order_list(conn, g.actor.org_id, status=status,
                                    mrn=mrn,
                                    cursor=request.args.get("cursor"), limit=limit)
    except views.BadCursor:
        raise bad_cursor() from None
    return jsonify(page)


@blp.route("/<order_id>", methods=["GET"])
@blp.doc(**{"x-roles": list(ORDER_ROLES)},
         responses={"200": {"description": "The order with cases and timeline"}})
@requires(*ORDER_ROLES)
def get_order(order_id: str) -> Response:
    """One order with its determinations, eligibility, cases and timeline."""
    with _services().engine.begin() as conn:
        view = views.order_view(conn, g.actor.org_id, order_id)
        _audit_read(conn, order_id)
    return jsonify(view)


@blp.route("/<order_id>/cancel", methods=["POST"])
@blp.doc(**{"x-roles": list(ORDER_ROLES)},
         responses={"200": {"description": "The cancelled order"}})
@requires(*ORDER_ROLES)
def cancel_order(order_id: str) -> Response:
    """Cancel an undecided order (the payer is told when its case was sent)."""
    if request.content_length:
        json_object()
    services = _services()

    def work(conn):  # type: ignore[no-untyped-def]
        orders.cancel_order(services, g.actor, order_id, conn)
        return 200, views.order_view(conn, g.actor.org_id, order_id)

    return idempotency.run(work, required=False, raw_body={})


COORDINATOR_ROLES = ("coordinator", "admin")


def _body(schema):  # type: ignore[no-untyped-def]
    from schemas.common import ValidationProblem
    from schemas.order_actions import load

    raw = json_object()
    try:
        return raw, load(schema, raw)
    except ValidationProblem as exc:
        raise ApiProblem(422, "The body breaks the payload rules; see errors.",
                         errors=exc.errors) from None


@blp.route("/<order_id>/extensions", methods=["POST"])
@blp.doc(**{"x-roles": list(COORDINATOR_ROLES)}, requestBody={
    "required": True, "content": {"application/json": {"schema": ExtensionSchema}}},
    responses={"201": {"description": "The new extension case"}})
@requires(*COORDINATOR_ROLES)
def request_extension(order_id: str) -> Response:
    """Ask the payer for more on approved lines (a new case of kind `extension`)."""
    from authsvc.service_layer import order_actions

    raw, body = _body(ExtensionSchema())
    services = _services()

    def work(conn):  # type: ignore[no-untyped-def]
        case_id = order_actions.request_extension(services, g.actor, order_id, body, conn)
        return 201, views.case_view(conn, g.actor.org_id, case_id)

    return idempotency.run(work, required=False, raw_body=raw)


@blp.route("/<order_id>/coverage", methods=["POST"])
@blp.doc(**{"x-roles": list(COORDINATOR_ROLES)}, requestBody={
    "required": True, "content": {"application/json": {"schema": CoverageFixSchema}}},
    responses={"200": {"description": "The order, checking eligibility again"}})
@requires(*COORDINATOR_ROLES)
def fix_coverage(order_id: str) -> Response:
    """Correct the member id after a coverage problem; eligibility runs again."""
    from authsvc.service_layer import order_actions

    raw, body = _body(CoverageFixSchema())
    services = _services()

    def work(conn):  # type: ignore[no-untyped-def]
        order_actions.fix_coverage(services, g.actor, order_id, body, conn)
        return 200, views.order_view(conn, g.actor.org_id, order_id)

    return idempotency.run(work, required=False, raw_body=raw)


@blp.route("/<order_id>/resolve", methods=["POST"])
@blp.doc(**{"x-roles": list(COORDINATOR_ROLES)}, requestBody={
    "required": True, "content": {"application/json": {"schema": ResolveSchema}}},
    responses={"200": {"description": "The order without its own needs_attention"}})
@requires(*COORDINATOR_ROLES)
def resolve_order(order_id: str) -> Response:
    """Clear the order's own needs_attention (the note goes to the timeline)."""
    from authsvc.service_layer import order_actions

    raw, body = _body(ResolveSchema())
    services = _services()

    def work(conn):  # type: ignore[no-untyped-def]
        order_actions.resolve_order(services, g.actor, order_id, body, conn)
        return 200, views.order_view(conn, g.actor.org_id, order_id)

    return idempotency.run(work, required=False, raw_body=raw)
