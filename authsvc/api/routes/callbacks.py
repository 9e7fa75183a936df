"""Payer status notifications (PAS Subscription rest-hook), signed with the payer's secret."""

from __future__ import annotations

import logging

from flask import Response, current_app, jsonify, request
from flask_smorest import Blueprint

from authsvc.adapters import webhooks
from authsvc.api.errors import ApiProblem
from authsvc.domain.payer import PayerFailure
from authsvc.service_layer import payer_work

log = logging.getLogger(__name__)
blp = Blueprint("payer_callbacks", __name__, url_prefix="/v1/payer-callbacks",
                description="Notifications pushed by payers")
LIMIT = 1024 * 1024


@blp.route("/<payer_id>", methods=["POST"])
@blp.doc(**{"x-roles": ["payer-signature"]}, security=[],
         responses={"200": {"description": "Accepted (also for a duplicate)"}})
def payer_callback(payer_id: str) -> Response:
    """A PAS notification Bundle; verified, deduplicated on webhook-id, applied once."""
    services = current_app.extensions["authsvc"]
    config = services.payers.get(payer_id)
    if config is None:
        raise ApiProblem(404, "No such payer.")
    if request.mimetype not in ("application/fhir+json", "application/json"):
        raise ApiProblem(415, "Send the notification as application/fhir+json.")
    if (request.content_length or 0) > LIMIT:
        raise ApiProblem(413, "The notification is larger than 1 MiB.")
    body = request.get_data(cache=True)
    if len(body) > LIMIT:
        raise ApiProblem(413, "The notification is larger than 1 MiB.")
    try:
        webhook_id = webhooks.verify(config.secret(), request.headers, body)
    except webhooks.WebhookVerificationError:
        raise ApiProblem(401, "The notification signature is not valid.") from None
    try:
        answer = services.adapter(payer_id, lambda _r: None).parse_notification(body)
    except (PayerFailure, ValueError, KeyError, TypeError):
        raise ApiProblem(400, "The notification is not a PAS notification Bundle.") from None
    result = payer_work.handle_notification(services, payer_id, webhook_id, answer)
    log.info("payer notification %s", result, extra={"payer_id": payer_id})
    return jsonify({"status": "ok", "result": result})
