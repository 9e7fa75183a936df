"""CDS Hooks (Da Vinci CRD): discovery and the coverage-requirements hooks EHRs call.

Callers authenticate with the CDS Hooks JWT of a registered client (no API token); discovery
is public, as the CDS Hooks spec wants. The work is in authsvc/service_layer/crd.py.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Response, current_app, g, jsonify, request
from flask_smorest import Blueprint

from authsvc.adapters import cds_jwt
from authsvc.api.errors import ApiProblem
from authsvc.api.request_body import json_object
from authsvc.service_layer import crd
from authsvc.service_layer.context import Actor

log = logging.getLogger(__name__)

blp = Blueprint("cds", __name__, url_prefix="/cds-services",
                description="CDS Hooks coverage requirements (Da Vinci CRD) for EHRs")

HOOK_BODY = {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["hook", "hookInstance", "context"],
    "properties": {"hook": {"type": "string"}, "hookInstance": {"type": "string"},
                   "fhirServer": {"type": "string"}, "fhirAuthorization": {"type": "object"},
                   "context": {"type": "object"}, "prefetch": {"type": "object"}}}}}}


@blp.route("", methods=["GET"])
@blp.doc(**{"x-roles": ["public"]}, security=[],
         responses={"200": {"description": "The CDS Hooks discovery document"}})
def discovery() -> Response:
    """The services offered and the data each wants prefetched (no authentication)."""
    return jsonify(crd.discovery())


@blp.route("/<service_id>", methods=["POST"])
@blp.doc(**{"x-roles": ["cds-jwt"]}, security=[], requestBody=HOOK_BODY, responses={
    "200": {"description": "CDS Hooks cards and systemActions (CRD coverage-information)"},
    "400": {"description": "Not a CDS Hooks request"},
    "401": {"description": "Missing or invalid CDS Hooks JWT"},
    "412": {"description": "Data missing: no prefetch and no usable FHIR server"}})
def hook(service_id: str) -> Response:
    """Answer a hook call with the coverage requirements of its orders."""
    from authsvc.api import security

    if service_id not in crd.HOOKS:
        raise ApiProblem(404, "No such CDS service.")
    services = current_app.extensions["authsvc"]
    security.check_auth_failures()
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    audience = f"{services.settings.public_url}/cds-services/{service_id}"
    try:
        if scheme.lower() != "bearer":
            raise cds_jwt.JwtRejected("missing_token")
        client = cds_jwt.authenticate(services.engine, token.strip(), audience)
    except cds_jwt.JwtRejected as exc:
        raise _refused(exc) from None
    g.actor = Actor(org_id=client.org_id, role="cds-client", token_id=client.id,
                    request_id=g.get("request_id"), source_ip=request.remote_addr)
    try:
        security.enforce_rate_limits(client.org_id, client.id)
        body = json_object()
    except ApiProblem:
        _spend_quietly(services, client)  # a refused call's jti is never accepted later
        raise
    caller = crd.Caller(client_id=client.id, org_id=client.org_id,
                        fhir_servers=client.fhir_servers, request_id=g.get("request_id"),
                        source_ip=request.remote_addr)
    try:
        answer = crd.handle_hook(services, caller, service_id, body,
                                 spend=lambda conn: cds_jwt.spend_jti(conn, client))
    except cds_jwt.JwtRejected as exc:  # the jti was used before
        raise _refused(exc) from None
    except crd.HookProblem as exc:
        raise ApiProblem(exc.status, exc.detail) from None
    return jsonify(answer)


def _refused(exc: Exception) -> ApiProblem:
    reason = getattr(exc, "reason", "invalid")
    g.deny_reason = f"cds_jwt:{reason}"[:100]
    log.info("cds hook refused", extra={"event": "cds_jwt_rejected", "status": 401})
    return ApiProblem(401, "The CDS Hooks JWT is missing or not valid for this service.",
                      extra={"reason": reason})


def _spend_quietly(services: Any, client: cds_jwt.CdsClient) -> None:
    try:
        with services.engine.begin() as conn:
            cds_jwt.spend_jti(conn, client)
    except cds_jwt.JwtRejected:
        pass  # already spent
