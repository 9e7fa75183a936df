"""Webhook subscriptions: signed `outcome.created` and order/case event deliveries."""

from __future__ import annotations

from flask import Response, current_app, g, jsonify, request
from flask_smorest import Blueprint

from authsvc.adapters import ssrf
from authsvc.api import idempotency
from authsvc.api.auth import requires
from authsvc.api.errors import ApiProblem, bad_cursor
from authsvc.api.request_body import json_object, limit_arg
from authsvc.service_layer import webhooks_out

blp = Blueprint("subscriptions", __name__, url_prefix="/v1/subscriptions",
                description="Webhooks signed per Standard Webhooks")
ROLES = ("billing", "admin")
IDEMPOTENCY_HEADER = {"name": "Idempotency-Key", "in": "header", "required": True,
                      "schema": {"type": "string", "minLength": 1, "maxLength": 255}}
EVENTS_DOC = ("Event types to deliver. Order and case events carry ids, states and codes "
              "only (no patient data): " + "; ".join(
                  f"`{name}`: {text}" for name, text in webhooks_out.EVENT_DOCS.items()))
PAGE = [
    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
]


def _services():  # type: ignore[no-untyped-def]
    return current_app.extensions["authsvc"]


def _err(field: str, code: str, message: str) -> dict:
    return {"field": field, "code": code, "message": message}


def _cursor() -> str | None:
    raw = request.args.get("cursor")
    if raw is not None and (len(raw) > 40 or not raw.isascii() or not raw.isprintable()):
        raise bad_cursor()
    return raw or None


@blp.route("", methods=["POST"])
@blp.doc(parameters=[IDEMPOTENCY_HEADER], **{"x-roles": list(ROLES)},
         requestBody={"required": True, "content": {"application/json": {"schema": {
             "type": "object", "required": ["url", "events"], "properties": {
                 "url": {"type": "string", "format": "uri"},
                 "events": {"type": "array", "minItems": 1, "description": EVENTS_DOC,
                            "items": {"type": "string", "enum": list(webhooks_out.EVENTS)}}}}}}},
         responses={"201": {"description": "The subscription with its secret (shown once)"}})
@requires(*ROLES)
def create_subscription() -> Response:
    """Register a webhook URL (checked against SSRF); the signing secret is returned once."""
    body = json_object()
    errors = [_err(k, "unknown_field", "not a field of this request")
              for k in body if k not in ("url", "events")]
    url, events = body.get("url"), body.get("events")
    if url is None:
        errors.append(_err("url", "required", "required"))
    elif not isinstance(url, str):
        errors.append(_err("url", "invalid_type", "a string"))
    if events is None:
        errors.append(_err("events", "required", "required"))
    elif not isinstance(events, list) or not all(isinstance(e, str) for e in events):
        errors.append(_err("events", "invalid_type", "a list of event types"))
    elif not events:
        errors.append(_err("events", "too_few", "at least one event type"))
    else:
        errors += [_err(f"events[{i}]", "invalid_choice", "one of " + ", ".join(
            webhooks_out.EVENTS)) for i, e in enumerate(events) if e not in webhooks_out.EVENTS]
    if errors:
        raise ApiProblem(422, "The subscription breaks the payload rules; see errors.",
                         errors=errors)
    services = _services()

    def work(conn):  # type: ignore[no-untyped-def]
        try:
            view = webhooks_out.create_subscription(services, g.actor, conn, url, events)
        except ssrf.Refused as exc:
            raise ApiProblem(422, "This URL may not receive webhooks.", errors=[
                _err("url", "invalid_choice", str(exc))]) from None
        return 201, view

    return idempotency.run(work, required=True, raw_body=body, location="/v1/subscriptions/{id}")


@blp.route("", methods=["GET"])
@blp.doc(**{"x-roles": list(ROLES)}, parameters=PAGE,
         responses={"200": {"description": "The organization's subscriptions (no secrets)"}})
@requires(*ROLES)
def list_subscriptions() -> Response:
    """Subscriptions of the caller's organization; secrets are never shown again."""
    limit = limit_arg()
    with _services().engine.connect() as conn:
        return jsonify(webhooks_out.list_subscriptions(conn, g.actor, _cursor(), limit))


@blp.route("/<sub_id>", methods=["GET"])
@blp.doc(**{"x-roles": list(ROLES)},
         responses={"200": {"description": "The subscription: status and disable reason"}})
@requires(*ROLES)
def get_subscription(sub_id: str) -> Response:
    """One subscription, with `status` and `disabled_reason` when it was disabled."""
    with _services().engine.connect() as conn:
        return jsonify(webhooks_out.get_subscription(conn, g.actor, sub_id))


@blp.route("/<sub_id>", methods=["DELETE"])
@blp.doc(**{"x-roles": list(ROLES)}, responses={"204": {"description": "Deleted"}})
@requires(*ROLES)
def delete_subscription(sub_id: str) -> Response:
    """Stop sending to this URL; its pending deliveries are dropped (kept in the log)."""
    with _services().engine.begin() as conn:
        webhooks_out.delete_subscription(conn, g.actor, sub_id)
    return Response(status=204)


@blp.route("/<sub_id>/deliveries", methods=["GET"])
@blp.doc(**{"x-roles": list(ROLES)}, parameters=PAGE,
         responses={"200": {"description": "The delivery log, newest first"}})
@requires(*ROLES)
def list_deliveries(sub_id: str) -> Response:
    """Every delivery of this subscription: status, attempts, last HTTP status or error."""
    limit = limit_arg()
    with _services().engine.connect() as conn:
        return jsonify(webhooks_out.delivery_log(conn, g.actor, sub_id, _cursor(), limit))


@blp.route("/<sub_id>/redeliver", methods=["POST"])
@blp.doc(**{"x-roles": list(ROLES)},
         requestBody={"required": False, "content": {"application/json": {"schema": {
             "type": "object", "properties": {
                 "delivery_ids": {"type": "array", "items": {"type": "string"}}}}}}},
         responses={"202": {"description": "Re-enabled; the listed deliveries are queued"}})
@requires(*ROLES)
def redeliver(sub_id: str) -> Response:
    """Re-enable the subscription and send its failed (or the named) deliveries again."""
    body = json_object() if request.content_length else {}
    errors = [_err(k, "unknown_field", "not a field of this request")
              for k in body if k != "delivery_ids"]
    ids = body.get("delivery_ids")
    if ids is not None and (not isinstance(ids, list) or len(ids) > 1000
                            or not all(isinstance(i, str) for i in ids)):
        errors.append(_err("delivery_ids", "invalid_type", "a list of delivery ids"))
    if errors:
        raise ApiProblem(422, "The request breaks the payload rules; see errors.",
                         errors=errors)

    def work(conn):  # type: ignore[no-untyped-def]
        return 202, webhooks_out.redeliver(conn, g.actor, sub_id, ids)

    return idempotency.run(work, required=False, raw_body=body)
