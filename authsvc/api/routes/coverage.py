"""Coverage-requirements preview: the rules' answer for an order body, nothing stored or sent.

An EHR calls this while the clinician is still choosing (CDS Hooks ``order-select`` style), so
it takes exactly the order's body and validation but no Idempotency-Key (nothing is created)
and answers from the in-memory rules engine without touching the database.
"""

from __future__ import annotations

from flask import Response, current_app, jsonify
from flask_smorest import Blueprint

from authsvc.api.auth import requires
from authsvc.api.request_body import json_object, validated_order
from authsvc.service_layer import orders
from schemas.orders import OrderSchema

blp = Blueprint("coverage", __name__, url_prefix="/v1/coverage-requirements",
                description="Preview of the per-line determinations an order would get now")

PREVIEW_BODY = {"required": True, "content": {"application/json": {"schema": OrderSchema}}}
PREVIEW_ROLES = ("clinician", "coordinator", "admin")


@blp.route("", methods=["POST"])
@blp.doc(requestBody=PREVIEW_BODY, **{"x-roles": list(PREVIEW_ROLES)},
         responses={"200": {"description": "{ruleset_version, lines: [{sequence, code_system, "
                                           "code, determination}]}"}})
@requires(*PREVIEW_ROLES)
def preview() -> Response:
    """What the rules would answer for this order right now; nothing is stored or sent."""
    body = validated_order(json_object(), preview=True)
    version, determinations = orders.determine(current_app.extensions["authsvc"], body)
    return jsonify({
        "ruleset_version": version,
        "lines": [
            {"sequence": line["sequence"], "code_system": line["code_system"],
             "code": line["code"], "determination": det.to_dict()}
            for line, det in zip(body["lines"], determinations, strict=True)
        ],
    })
