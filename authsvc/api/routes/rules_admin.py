"""Admin: payer rules versions and reload (api.md › Policy files)."""

from __future__ import annotations

from flask import Response, current_app, jsonify, request
from flask_smorest import Blueprint

from authsvc.api.auth import requires
from authsvc.api.errors import ApiProblem
from authsvc.api.request_body import json_object
from authsvc.service_layer import rules_admin

blp = Blueprint("rules_admin", __name__, url_prefix="/v1/admin/rules",
                description="Payer policy versions: list and hot reload")
ADMIN = ("admin",)


def _services():  # type: ignore[no-untyped-def]
    return current_app.extensions["authsvc"]


@blp.route("", methods=["GET"])
@blp.doc(**{"x-roles": list(ADMIN)},
         responses={"200": {"description": "Recorded versions with digests and file hashes"}})
@requires(*ADMIN)
def list_rules() -> Response:
    """Every recorded ruleset version, which is active, and the file hashes behind it."""
    services = _services()
    return jsonify(rules_admin.loaded_versions(services.engine, services.rules))


@blp.route("/reload", methods=["POST"])
@blp.doc(**{"x-roles": list(ADMIN)}, responses={
    "200": {"description": "The files are active (status loaded or unchanged)"},
    "422": {"description": "Refused: the last good version stays active; errors say why"}})
@requires(*ADMIN)
def reload_rules() -> Response:
    """Validate the rule files and make their versions active in every process (≤ 2 s)."""
    if request.content_length:
        json_object()  # no options yet; a body must still be JSON
    services = _services()
    try:
        result = rules_admin.reload(services.engine, services.settings.rules_dir,
                                    services.rules, source="api")
    except rules_admin.ReloadRefused as exc:
        raise ApiProblem(422, "The rule files were refused; the last good version stays "
                         "active.", errors=[{"field": "rules", "code": "refused",
                                             "message": m} for m in exc.errors]) from None
    return jsonify(result.to_dict())
