"""Notification routes.

- `GET /v1/admin/notifications?order_id=` (admins): what was sent to whom (by role), on which
  channel, with which template and status; never the message text or the address.
- `POST /v1/notifications/sms-inbound` (public, signed by the SMS gateway): a Twilio-shaped
  inbound-message webhook (form fields `From`, `Body`) verified with `X-Twilio-Signature`;
  `STOP` and its synonyms opt the number out of texts, `START`/`UNSTOP` opt it back in.
- `GET|POST /v1/notifications/unsubscribe?token=` (public, signed token): the link in every
  patient and caregiver email. GET shows a confirmation page and changes nothing (mail
  scanners follow links); POST applies it, which is also the RFC 8058 one-click request a
  mail client sends for `List-Unsubscribe-Post: List-Unsubscribe=One-Click`.

The public routes take no API token (`x-roles` names how they are authenticated instead), keep
no address (opt-outs hold a keyed hash) and answer bad input with problem+json naming the field.
"""

from __future__ import annotations

import logging

from flask import Response, current_app, g, jsonify, request
from flask_smorest import Blueprint

from authsvc.adapters.db import repo
from authsvc.adapters.notify import optout, render
from authsvc.api import security
from authsvc.api.auth import requires
from authsvc.api.errors import ApiProblem, bad_cursor
from authsvc.api.request_body import limit_arg
from authsvc.domain import clock
from authsvc.service_layer import notifications

log = logging.getLogger(__name__)
blp = Blueprint("notifications_admin", __name__, url_prefix="/v1",
                description="Patient, caregiver and provider notifications: the admins' list, "
                            "opt-out by SMS reply and by email link")
ROLES = ("admin",)
FORM_LIMIT = 64 * 1024
TWIML_EMPTY = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'


def _id_arg(name: str, *, problem_status: int) -> str | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    if not raw or len(raw) > 40 or not raw.isascii() or not raw.replace("_", "").isalnum():
        if problem_status == 400:
            raise bad_cursor()
        raise ApiProblem(422, f"{name} is not an id.", errors=[
            {"field": name, "code": "invalid_format", "message": "an id such as ord_…"}])
    return raw


@blp.route("/admin/notifications", methods=["GET"])
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


# ------------------------------------------------------------------ public, signed


def _field_problem(field: str, code: str, message: str, status: int = 422) -> ApiProblem:
    return ApiProblem(status, f"{field}: {message}", errors=[
        {"field": field, "code": code, "message": message}])


def _small_body() -> None:
    if (request.content_length or 0) > FORM_LIMIT:
        raise ApiProblem(413, "The request body is larger than 64 KiB.")


def _signed_url() -> str:
    """The URL the gateway signed: our public base URL, this path and the query string."""
    settings = current_app.extensions["authsvc"].settings
    query = request.query_string.decode("latin-1")
    return settings.public_url + request.path + (f"?{query}" if query else "")


SMS_FORM = {"content": {"application/x-www-form-urlencoded": {"schema": {
    "type": "object", "required": ["From", "Body"],
    "properties": {"From": {"type": "string", "description": "the sender, E.164"},
                   "Body": {"type": "string", "maxLength": 1600}}}}}}


@blp.route("/notifications/sms-inbound", methods=["POST"])
@blp.doc(**{"x-roles": ["sms-signature"]}, security=[], requestBody=SMS_FORM, parameters=[
    {"name": "X-Twilio-Signature", "in": "header", "required": True,
     "schema": {"type": "string"}}],
    responses={"200": {"description": "Handled (TwiML, empty): STOP/START applied, anything "
                                      "else ignored", "content": {"application/xml": {}}}})
def sms_inbound() -> Response:
    """A text sent to our number: `STOP` opts the sender out of texts, `START` back in."""
    services = current_app.extensions["authsvc"]
    _limit_source()
    _small_body()
    if request.mimetype != "application/x-www-form-urlencoded":
        raise ApiProblem(415, "Send the inbound message as application/x-www-form-urlencoded.")
    params = list(request.form.items(multi=True))
    token = notifications.sms_auth_token(services.settings)
    if not optout.twilio_valid(token, _signed_url(), params,
                               request.headers.get("X-Twilio-Signature")):
        g.deny_reason = "bad_signature"
        raise ApiProblem(401, "The X-Twilio-Signature is missing or not valid.")
    sender = request.form.get("From")
    body = request.form.get("Body")
    if not sender:
        raise _field_problem("From", "required", "the sender's number is required")
    if not optout.valid_phone(sender):
        raise _field_problem("From", "invalid_format", "a phone number in E.164 (+15551234567)")
    if body is None:
        raise _field_problem("Body", "required", "the message text is required")
    if len(body) > 1600:
        raise _field_problem("Body", "too_long", "at most 1600 characters")
    result = notifications.sms_reply(services, sender, body, clock.now(),
                                     request_id=g.get("request_id"),
                                     source_ip=request.remote_addr)
    log.info("inbound text", extra={"result": result or "ignored"})  # never the number or text
    return Response(TWIML_EMPTY, status=200, mimetype="application/xml")


def _limit_source() -> None:
    """The public routes (no API token) are limited per source address with the API's own
    limits: an address over AUTHSVC_RATE_LIMIT_AUTH_FAILURES (bad signatures, forged links)
    waits, and its requests count against the per-token and per-organization limits under
    an identity made of a keyed hash of the address (Redis and `rate_limit_events` never hold
    the address itself). 429 problem + Retry-After; fails open when Redis is down."""
    ident = "ip_" + security.member_pseudonym(request.remote_addr or "unknown")[:32]
    security.enforce_rate_limits(ident, ident)


TOKEN_PARAM = {"name": "token", "in": "query", "required": True,
               "schema": {"type": "string", "maxLength": 1000}}


def _claims() -> dict:
    services = current_app.extensions["authsvc"]
    raw = request.args.get("token")
    if raw is None and request.method == "POST":
        raw = request.form.get("token")
    if not raw:
        raise _field_problem("token", "required", "the link's token is missing")
    claims = optout.read_token(services.settings.notify_secret, raw)
    if claims is None or claims["channel"] != "email":
        security.note_auth_failure()  # a forged or altered link: a guess, like a bad token
        raise _field_problem("token", "invalid", "the link is not valid; use the link in the "
                                                 "email as it is")
    return claims


def _page(name: str, claims: dict, **extra: object) -> Response:
    lang = claims["language"] if claims["language"] in ("en", "es") else "en"
    services = current_app.extensions["authsvc"]
    with services.engine.connect() as conn:
        org = notifications.org_name(conn, claims["org_id"])
    html = render.page(name, lang=lang, org_name=org, **extra)
    return Response(html, status=200, mimetype="text/html")


@blp.route("/notifications/unsubscribe", methods=["GET"])
@blp.doc(**{"x-roles": ["unsubscribe-token"]}, security=[], parameters=[TOKEN_PARAM],
         responses={"200": {"description": "A page asking to confirm (nothing changes yet)",
                            "content": {"text/html": {}}}})
def unsubscribe_page() -> Response:
    """The email's unsubscribe link: a confirmation page with a button (a POST)."""
    _limit_source()
    claims = _claims()
    return _page("unsubscribe.html.j2", claims, action=request.full_path.rstrip("?"))


@blp.route("/notifications/unsubscribe", methods=["POST"])
@blp.doc(**{"x-roles": ["unsubscribe-token"]}, security=[], parameters=[TOKEN_PARAM],
         requestBody={"required": False, "content": {
             "application/x-www-form-urlencoded": {"schema": {"type": "object", "properties": {
                 "List-Unsubscribe": {"type": "string", "enum": ["One-Click"]}}}},
             "multipart/form-data": {"schema": {"type": "object"}}}},
         responses={"200": {"description": "Unsubscribed (also when it already was)",
                            "content": {"text/html": {}}}})
def unsubscribe() -> Response:
    """Stop this organization's emails to the address the link was sent to (RFC 8058
    one-click, or the confirmation page's button); idempotent."""
    services = current_app.extensions["authsvc"]
    _limit_source()
    _small_body()
    claims = _claims()
    with services.engine.begin() as conn:
        notifications.opt_out(
            conn, org_id=claims["org_id"], channel="email", hashed=claims["address_hash"],
            reason="email_unsubscribe", at=clock.now(),
            notification_id=claims["notification_id"][:40] or None,
            request_id=g.get("request_id"), source_ip=request.remote_addr)
    return _page("unsubscribed.html.j2", claims)
