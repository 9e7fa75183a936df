"""Cases: the coordinator's worklist, case detail and case actions (api.md › Cases)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from flask import Response, current_app, g, jsonify, request
from flask_smorest import Blueprint

from authsvc.adapters.db import repo
from authsvc.adapters.db import repo_cases as rc
from authsvc.api import idempotency
from authsvc.api.auth import requires
from authsvc.api.errors import ApiProblem, bad_cursor
from authsvc.api.request_body import json_object, limit_arg
from authsvc.domain import cases as cs
from authsvc.domain import clock
from authsvc.service_layer import case_actions, worklist
from authsvc.service_layer.views import BadCursor

blp = Blueprint("cases", __name__, url_prefix="/v1/cases",
                description="Prior-authorization cases: worklist, detail and actions")
READ_ROLES = ("clinician", "coordinator", "admin")
ACTION_ROLES = ("coordinator", "admin")
URGENCIES = ("standard", "expedited")


def _services():  # type: ignore[no-untyped-def]
    return current_app.extensions["authsvc"]


def _err(field: str, code: str, message: str) -> dict:
    return {"field": field, "code": code, "message": message}


def _invalid(errors: list[dict], detail: str = "The request breaks the payload rules; "
             "see errors.") -> ApiProblem:
    return ApiProblem(422, detail, errors=errors)


# ------------------------------------------------------------------ small validators


def _check_fields(body: dict, allowed: set[str], required: set[str], prefix: str = "",
                  errors: list[dict] | None = None) -> list[dict]:
    errors = [] if errors is None else errors
    for key in body:
        if key not in allowed:
            errors.append(_err(prefix + key, "unknown_field", "not a field of this request"))
    for key in sorted(required):
        if body.get(key) is None:
            errors.append(_err(prefix + key, "required", "required"))
    return errors


def _string(body: dict, key: str, errors: list[dict], *, max_len: int, prefix: str = "",
            required: bool = False) -> str | None:
    value = body.get(key)
    if value is None:
        if required and key in body:
            errors.append(_err(prefix + key, "required", "required"))
        return None
    if not isinstance(value, str):
        errors.append(_err(prefix + key, "invalid_type", "must be a string"))
        return None
    if not value.strip() or len(value) > max_len:
        errors.append(_err(prefix + key, "out_of_range", f"1 to {max_len} characters"))
        return None
    return value


def _date(body: dict, key: str, errors: list[dict], prefix: str) -> dt.date | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        errors.append(_err(prefix + key, "invalid_type", "must be a YYYY-MM-DD string"))
        return None
    try:
        if len(value) != 10:
            raise ValueError
        return dt.date.fromisoformat(value)
    except ValueError:
        errors.append(_err(prefix + key, "invalid_format", "YYYY-MM-DD"))
        return None


def _bool_arg(name: str) -> bool | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    if raw not in ("true", "false"):  # an empty value too: the documented type is boolean
        raise _invalid([_err(name, "invalid_choice", "true or false")])
    return raw == "true"


def parse_time(raw: str) -> dt.datetime:
    """RFC 3339 time with an offset, or a date meaning midnight UTC."""
    if len(raw) == 10:
        return dt.datetime.combine(dt.date.fromisoformat(raw), dt.time(), dt.UTC)
    value = dt.datetime.fromisoformat(raw)
    if value.tzinfo is None or "T" not in raw.upper():
        raise ValueError("offset required")
    return value.astimezone(dt.UTC)


# ------------------------------------------------------------------ reads


def _filters() -> worklist.WorklistFilter:
    errors: list[dict] = []
    states: tuple[str, ...] = ()
    raw_state = request.args.get("state")
    if raw_state:
        states = tuple(s for s in raw_state.split(",") if s)
        if any(s not in cs.STATES for s in states):
            errors.append(_err("state", "invalid_choice", "not a case state"))
    urgency = request.args.get("urgency")
    if urgency is not None and urgency not in URGENCIES:
        errors.append(_err("urgency", "invalid_choice", "standard or expedited"))
    due_before = None
    if raw := request.args.get("due_before"):
        try:
            due_before = parse_time(raw)
        except ValueError:
            errors.append(_err("due_before", "invalid_format", "RFC 3339 time or YYYY-MM-DD"))
    assignee = request.args.get("assignee")
    if assignee == "me":
        assignee = g.actor.name or g.actor.label
    q = request.args.get("q") or None
    for name, value in (("q", q), ("assignee", assignee),
                        ("payer_id", request.args.get("payer_id"))):
        if value is not None and len(value) > 200:
            errors.append(_err(name, "out_of_range", "at most 200 characters"))
    overdue = needs_attention = None
    try:
        overdue = _bool_arg("overdue")
        needs_attention = _bool_arg("needs_attention")
    except ApiProblem as exc:
        errors += exc.errors or []
    if errors:
        raise _invalid(errors, "Unusable query parameters; see errors.")
    return worklist.WorklistFilter(
        states=states, payer_id=request.args.get("payer_id") or None, urgency=urgency,
        overdue=overdue, needs_attention=needs_attention, due_before=due_before,
        assignee=assignee or None, q=q)


@blp.route("", methods=["GET"])
@blp.doc(**{"x-roles": list(READ_ROLES)}, parameters=[
    {"name": "state", "in": "query", "schema": {"type": "string"},
     "description": "one case state, or several separated by commas"},
    {"name": "payer_id", "in": "query", "schema": {"type": "string"}},
    {"name": "urgency", "in": "query", "schema": {"type": "string", "enum": list(URGENCIES)}},
    {"name": "overdue", "in": "query", "schema": {"type": "boolean"}},
    {"name": "needs_attention", "in": "query", "schema": {"type": "boolean"}},
    {"name": "due_before", "in": "query", "schema": {"type": "string"},
     "description": "RFC 3339 time or a date (midnight UTC)"},
    {"name": "assignee", "in": "query", "schema": {"type": "string"},
     "description": "a name; `me` is the calling token's name"},
    {"name": "q", "in": "query", "schema": {"type": "string"},
     "description": "text in the order's external id"},
    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
], responses={"200": {"description": "The worklist, by decision_due_at (nulls last)"}})
@requires(*READ_ROLES)
def list_cases() -> Response:
    """The worklist: cases by decision deadline, with deadline flags and attention reasons."""
    filters = _filters()
    limit = limit_arg()
    try:
        with _services().engine.connect() as conn:
            page = worklist.case_list(conn, g.actor.org_id, filters,
                                      cursor=request.args.get("cursor"), limit=limit)
    except BadCursor:
        raise bad_cursor() from None
    return jsonify(page)


def _detail(conn, case_id: str) -> dict:  # type: ignore[no-untyped-def]
    return worklist.case_detail(conn, g.actor.org_id, case_id,
                                with_bodies=g.actor.role == "admin")


@blp.route("/<case_id>", methods=["GET"])
@blp.doc(**{"x-roles": list(READ_ROLES)},
         responses={"200": {"description": "The case: lines and decisions, exchanges, notes, "
                                           "attachments, timeline"}})
@requires(*READ_ROLES)
def get_case(case_id: str) -> Response:
    """One case; payer exchange bodies (PHI) only for admins."""
    actor = g.actor
    with _services().engine.begin() as conn:
        view = _detail(conn, case_id)
        order = repo.order_row(conn, view["order_id"], actor.org_id)
        repo.add_audit(conn, at=clock.now(), org_id=actor.org_id, token_id=actor.token_id,
                       role=actor.role, action="read", entity_type="case", entity_id=case_id,
                       patient_id=order["patient_id"] if order else None, outcome="success",
                       request_id=actor.request_id, source_ip=actor.source_ip)
    return jsonify(view)


@blp.route("/<case_id>/attachments/<attachment_id>", methods=["GET"])
@blp.doc(**{"x-roles": list(READ_ROLES)},
         responses={"200": {"description": "The document's bytes with its sniffed type"}})
@requires(*READ_ROLES)
def get_attachment(case_id: str, attachment_id: str) -> Response:
    """A stored document, only to a token of the case's organization."""
    from authsvc.adapters.attachment_files import Unreadable

    actor = g.actor
    services = _services()
    with services.engine.connect() as conn:
        row = rc.attachment(conn, actor.org_id, case_id, attachment_id)
        if row is None:
            raise ApiProblem(404, "No such attachment.")
        case = repo.case_row(conn, case_id)
        order = repo.order_row(conn, case["order_id"], actor.org_id) if case else None
    outcome, data = "success", b""
    try:
        data = case_actions.attachment_bytes(row, services.settings.attachments_dir)
    except Unreadable as exc:  # the folder is gone or the file altered: ids only in the log
        current_app.logger.error("attachment %s unreadable: %s", attachment_id, exc)
        outcome = "error"
    # Audited after the read, with the patient and what really happened (a read that ended
    # in 503 disclosed nothing and is not recorded as one that did).
    with services.engine.begin() as conn:
        repo.add_audit(conn, at=clock.now(), org_id=actor.org_id, token_id=actor.token_id,
                       role=actor.role, action="read", entity_type="attachment",
                       entity_id=attachment_id,
                       patient_id=order["patient_id"] if order else None, outcome=outcome,
                       request_id=actor.request_id, source_ip=actor.source_ip)
    if outcome != "success":
        raise ApiProblem(503, "The document's stored bytes are not available.",
                         headers={"Retry-After": "60"})
    resp = Response(data, status=200, mimetype=row["content_type"])
    resp.headers["Content-Disposition"] = "attachment"
    resp.headers["X-Attachment-Sha256"] = row["sha256"]
    return resp


# ------------------------------------------------------------------ actions


def _act(case_id: str, body: dict, action, status: int = 200,  # type: ignore[no-untyped-def]
         new_case: bool = False):
    """Run an action and answer with the case (or the new case), honouring Idempotency-Key."""

    def work(conn):  # type: ignore[no-untyped-def]
        result = action(conn)
        return status, _detail(conn, result if new_case else case_id)

    try:
        return idempotency.run(work, required=False, raw_body=body)
    except case_actions.Invalid as exc:
        raise _invalid(exc.errors) from None


def _body(allowed: set[str], required: set[str]) -> dict:
    body = json_object()
    errors = _check_fields(body, allowed, required)
    if errors:
        raise _invalid(errors)
    return body


def _optional_body(allowed: set[str]) -> dict:
    if not request.content_length:
        return {}
    return _body(allowed, set())


ACTION_DOC: dict[str, Any] = {"x-roles": list(ACTION_ROLES)}


@blp.route("/<case_id>/assign", methods=["POST"])
@blp.doc(**ACTION_DOC, requestBody={"required": True, "content": {"application/json": {
    "schema": {"type": "object", "properties": {"assignee": {"type": ["string", "null"]}}}}}},
    responses={"200": {"description": "The case"}})
@requires(*ACTION_ROLES)
def assign_case(case_id: str) -> Response:
    """Assign the case to a person (free text), or unassign it with null."""
    body = json_object()
    errors = _check_fields(body, {"assignee"}, set())
    if "assignee" not in body:
        errors.append(_err("assignee", "required", "a name or null"))
    assignee = _string(body, "assignee", errors, max_len=200)
    if errors:
        raise _invalid(errors)
    return _act(case_id, body, lambda conn: case_actions.assign(g.actor, conn, case_id,
                                                                assignee))


@blp.route("/<case_id>/notes", methods=["POST"])
@blp.doc(**ACTION_DOC, requestBody={"required": True, "content": {"application/json": {
    "schema": {"type": "object", "properties": {"text": {"type": "string"}}}}}},
    responses={"201": {"description": "The case with the note"}})
@requires(*ACTION_ROLES)
def add_note(case_id: str) -> Response:
    """Add a note to the case."""
    body = _body({"text"}, {"text"})
    errors: list[dict] = []
    text = _string(body, "text", errors, max_len=10_000, required=True)
    if errors or text is None:
        raise _invalid(errors)
    return _act(case_id, body, lambda conn: case_actions.add_note(g.actor, conn, case_id, text),
                status=201)


@blp.route("/<case_id>/resolve", methods=["POST"])
@blp.doc(**ACTION_DOC, requestBody={"required": False, "content": {"application/json": {
    "schema": {"type": "object", "properties": {"note": {"type": "string"}}}}}},
    responses={"200": {"description": "The case with needs_attention cleared"}})
@requires(*ACTION_ROLES)
def resolve_case(case_id: str) -> Response:
    """Clear the case's needs_attention; the note goes to the timeline."""
    body = _optional_body({"note"})
    errors: list[dict] = []
    note = _string(body, "note", errors, max_len=2000)
    if errors:
        raise _invalid(errors)
    return _act(case_id, body, lambda conn: case_actions.resolve(g.actor, conn, case_id, note))


@blp.route("/<case_id>/attachments", methods=["POST"])
@blp.doc(**ACTION_DOC, requestBody={"required": True, "content": {"multipart/form-data": {
    "schema": {"type": "object", "properties": {
        "file": {"type": "string", "format": "binary"}, "loinc": {"type": "string"}}}}}},
    responses={"201": {"description": "The case with the new attachment"}})
@requires(*ACTION_ROLES)
def add_attachment(case_id: str) -> Response:
    """Upload one document (PDF, PNG, JPEG or TIFF, at most 10 MiB) for the payer."""
    import hashlib

    if request.mimetype != "multipart/form-data":
        raise ApiProblem(415, "Send the document as multipart/form-data.")
    if (request.content_length or 0) > case_actions.MAX_ATTACHMENT_BYTES + 64 * 1024:
        raise ApiProblem(413, "A document may be at most 10 MiB.")
    files = request.files
    try:
        if len(files) != 1 or len(files.getlist(next(iter(files)))) != 1:
            raise _invalid([_err("file", "required" if not files else "too_many",
                                 "send exactly one file")])
        upload = files[next(iter(files))]
        data = upload.read(case_actions.MAX_ATTACHMENT_BYTES + 1)
    finally:
        for stored in files.values():  # spooled temp files: close now, not at GC
            stored.close()
    if len(data) > case_actions.MAX_ATTACHMENT_BYTES:
        raise ApiProblem(413, "A document may be at most 10 MiB.")
    if not data:
        raise _invalid([_err("file", "required", "the file is empty")])
    try:
        case_actions.sniff(data)
    except case_actions.UnsupportedMedia as exc:
        raise ApiProblem(415, str(exc)) from None
    loinc = request.form.get("loinc") or None
    if loinc is not None and (len(loinc) > 20 or not loinc.isascii()):
        raise _invalid([_err("loinc", "invalid_format", "a LOINC code")])
    filename = case_actions.clean_filename(upload.filename)
    sha256 = hashlib.sha256(data).hexdigest()
    fingerprint = {"sha256": sha256, "filename": filename, "loinc": loinc}
    services = _services()
    folder = services.settings.attachments_dir
    try:
        with case_actions.upload_guard(services.engine, folder, g.actor.org_id, data):
            return _act(case_id, fingerprint, lambda conn: case_actions.add_attachment(
                g.actor, conn, case_id, filename=filename, data=data, loinc=loinc,
                folder=folder), status=201)
    except case_actions.StorageFull:
        raise ApiProblem(503, "The document store is full; nothing was saved. Try again "
                         "later.", headers={"Retry-After": "300"}) from None


DECISION_OUTCOMES = tuple(case_actions.ACTION_BY_OUTCOME)


def _decision_body() -> dict:
    body = _body({"reference", "received_via", "lines"}, {"received_via", "lines"})
    errors: list[dict] = []
    _string(body, "reference", errors, max_len=100)
    if body["received_via"] not in ("phone", "fax", "portal"):
        errors.append(_err("received_via", "invalid_choice", "phone, fax or portal"))
    lines = body["lines"]
    if not isinstance(lines, list):
        raise _invalid([_err("lines", "invalid_type", "a list")])
    if not 1 <= len(lines) <= 50:
        errors.append(_err("lines", "too_few" if not lines else "too_many", "1 to 50 lines"))
    seen: set[int] = set()
    out = []
    for i, line in enumerate(lines):
        p = f"lines[{i}]."
        if not isinstance(line, dict):
            errors.append(_err(f"lines[{i}]", "invalid_type", "an object"))
            continue
        _check_fields(line, {"sequence", "outcome", "auth_number", "authorized_quantity",
                             "valid_from", "valid_to", "denial_reason"},
                      {"sequence", "outcome"}, p, errors)
        seq = line.get("sequence")
        if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool)):
            errors.append(_err(p + "sequence", "invalid_type", "an integer"))
        elif seq is not None:
            if seq in seen:
                errors.append(_err(p + "sequence", "invalid_choice", "repeated sequence"))
            seen.add(seq)
        outcome = line.get("outcome")
        if outcome is not None and outcome not in DECISION_OUTCOMES:
            errors.append(_err(p + "outcome", "invalid_choice", "approved, denied or modified"))
        auth_number = _string(line, "auth_number", errors, max_len=80, prefix=p)
        qty = line.get("authorized_quantity")
        if qty is not None and (not isinstance(qty, int) or isinstance(qty, bool)):
            errors.append(_err(p + "authorized_quantity", "invalid_type", "an integer"))
            qty = None
        elif qty is not None and not 1 <= qty <= 999:
            errors.append(_err(p + "authorized_quantity", "out_of_range", "1 to 999"))
        if outcome == "modified" and line.get("authorized_quantity") is None:
            errors.append(_err(p + "authorized_quantity", "required",
                               "a modification states the granted quantity"))
        valid_from = _date(line, "valid_from", errors, p)
        valid_to = _date(line, "valid_to", errors, p)
        if valid_from and valid_to and valid_to < valid_from:
            errors.append(_err(p + "valid_to", "invalid_date_range", "before valid_from"))
        reason = line.get("denial_reason")
        if reason is not None:
            if not isinstance(reason, dict):
                errors.append(_err(p + "denial_reason", "invalid_type", "an object"))
                reason = None
            else:
                _check_fields(reason, {"code", "text"}, set(), p + "denial_reason.", errors)
                _string(reason, "code", errors, max_len=10, prefix=p + "denial_reason.")
                _string(reason, "text", errors, max_len=500, prefix=p + "denial_reason.")
        out.append({"sequence": seq, "outcome": outcome, "auth_number": auth_number,
                    "authorized_quantity": qty, "valid_from": valid_from,
                    "valid_to": valid_to, "denial_reason": reason})
    if errors:
        raise _invalid(errors)
    return {"reference": body.get("reference"), "received_via": body["received_via"],
            "lines": out, "_raw": body}


@blp.route("/<case_id>/decision", methods=["POST"])
@blp.doc(**ACTION_DOC, requestBody={"required": True, "content": {"application/json": {
    "schema": {"type": "object"}}}},
    responses={"200": {"description": "The case after the recorded decision"}})
@requires(*ACTION_ROLES)
def record_decision(case_id: str) -> Response:
    """Record a decision received by phone, fax or portal; outcomes follow as for the payer."""
    parsed = _decision_body()
    raw = parsed.pop("_raw")
    services = _services()
    return _act(case_id, raw, lambda conn: case_actions.record_decision(
        services, g.actor, conn, case_id, parsed))


@blp.route("/<case_id>/appeal", methods=["POST"])
@blp.doc(**ACTION_DOC, requestBody={"required": True, "content": {"application/json": {
    "schema": {"type": "object", "properties": {
        "kind": {"type": "string", "enum": ["standard", "immediate"]},
        "level_of_care": {"type": "string"}, "reason": {"type": "string"}}}}}},
    responses={"201": {"description": "The new appeal case"}})
@requires(*ACTION_ROLES)
def appeal_case(case_id: str) -> Response:
    """Appeal the denied or modified lines (standard or immediate)."""
    body = _body({"kind", "level_of_care", "reason"}, {"kind"})
    errors: list[dict] = []
    if not isinstance(body["kind"], str) or body["kind"] not in case_actions.APPEAL_KINDS:
        errors.append(_err("kind", "invalid_choice", "standard or immediate"))
    level = _string(body, "level_of_care", errors, max_len=100)
    reason = _string(body, "reason", errors, max_len=2000)
    if body.get("kind") == "immediate" and body.get("level_of_care") is None:
        errors.append(_err("level_of_care", "required", "required for an immediate appeal"))
    if errors:
        raise _invalid(errors)
    parsed = {"kind": body["kind"], "level_of_care": level, "reason": reason}
    return _act(case_id, body, lambda conn: case_actions.appeal(g.actor, conn, case_id, parsed),
                status=201, new_case=True)


@blp.route("/<case_id>/resubmit", methods=["POST"])
@blp.doc(**ACTION_DOC, responses={"201": {"description": "The new resubmission case"}})
@requires(*ACTION_ROLES)
def resubmit_case(case_id: str) -> Response:
    """Resubmit a rejected or failed case from the order's current data."""
    body = _optional_body(set())
    return _act(case_id, body, lambda conn: case_actions.resubmit(g.actor, conn, case_id),
                status=201, new_case=True)


@blp.route("/<case_id>/cancel", methods=["POST"])
@blp.doc(**ACTION_DOC, responses={"200": {"description": "The cancelled case"}})
@requires(*ACTION_ROLES)
def cancel_case(case_id: str) -> Response:
    """Cancel an open case or withdraw an authorization (the payer is told)."""
    body = _optional_body({"note"})
    return _act(case_id, body, lambda conn: case_actions.cancel(g.actor, conn, case_id))
