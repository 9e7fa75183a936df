"""Reading request bodies: content type, size limit, strict JSON, then schema validation."""

from __future__ import annotations

from typing import Any

from flask import current_app, request

from authsvc.api.errors import ApiProblem
from authsvc.api.jsonbody import MalformedJSON, parse_json_object
from schemas.common import ValidationProblem

JSON_LIMIT = 256 * 1024


def json_object() -> dict[str, Any]:
    """The body as a JSON object, or a 400/413/415 problem."""
    mimetype = request.mimetype
    if mimetype != "application/json":
        raise ApiProblem(415, "Send the body as application/json.")
    length = request.content_length
    if length is not None and length > JSON_LIMIT:
        raise ApiProblem(413, "The request body is larger than 256 KiB.")
    raw = request.get_data(cache=True)
    if len(raw) > JSON_LIMIT:
        raise ApiProblem(413, "The request body is larger than 256 KiB.")
    try:
        return parse_json_object(raw)
    except MalformedJSON as exc:
        raise ApiProblem(400, f"The body is not usable JSON: {exc}") from None


def validated_order(data: dict[str, Any], *, preview: bool = False) -> dict[str, Any]:
    """An order body checked against the payload rules.

    An order must name a payer we have policies for *and* can talk to (payers file); a
    preview only needs the policies (e.g. Medicare's lists, with no payer endpoint here).
    """
    from schemas.orders import load_order

    services = current_app.extensions["authsvc"]
    known = services.rules.current().payer_ids()
    if not preview:
        known = known & set(services.payers)
    try:
        return load_order(data, known)
    except ValidationProblem as exc:
        raise ApiProblem(422, "The order breaks the payload rules; see errors.",
                         errors=exc.errors) from None


def limit_arg(default: int = 50, maximum: int = 200) -> int:
    raw = request.args.get("limit")
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or not (1 <= int(raw) <= maximum):
        raise ApiProblem(422, f"limit must be an integer from 1 to {maximum}.",
                         errors=[{"field": "limit", "code": "out_of_range",
                                  "message": f"1 to {maximum}"}])
    return int(raw)
