"""The dashboard's pages and forms: parse the form, call the service layer, render.

No query and no state rule lives here: reads are `worklist.case_list`/`case_detail`,
`views.order_view` and `reports.prior_auth_metrics`; actions are `case_actions.*`, which
check states, lock the case and audit with the patient exactly as for the JSON API.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import secrets
from typing import Any
from urllib.parse import urlencode

from flask import (
    Blueprint,
    Response,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)

from authsvc.adapters.db import repo
from authsvc.adapters.db import repo_cases as rc
from authsvc.api import auth, security
from authsvc.api.dashboard import i18n
from authsvc.domain import cases as cs
from authsvc.domain import clock
from authsvc.domain.errors import IllegalTransition, NotFound, StateConflict
from authsvc.service_layer import case_actions, reports, views, worklist
from authsvc.service_layer.context import Actor
from authsvc.service_layer.views import BadCursor

log = logging.getLogger(__name__)
bp = Blueprint("dashboard", __name__)
ROLES = ("coordinator", "admin")
OPEN_STATES = tuple(s for s in cs.STATES if cs.is_open(s))
URGENCIES = ("standard", "expedited")
PAGE_SIZE = 25
MAX_REPORT_DAYS = 3 * 366
MARKER = "authsvc_dash_was"  # "signed in before" (no secret), so an ended session says so
LOGIN_NOTICES = ("session_expired", "session_revoked", "signed_out", "sign_in_required",
                 "session_ended", "session_too_long")


def _t(key: str, **values: object) -> str:
    return i18n.translate(g.get("lang", "en"), key, **values)


def _engine():  # type: ignore[no-untyped-def]
    return current_app.extensions["authsvc"].engine


def _actor() -> Actor:
    return g.actor


def _me(actor: Actor) -> str:
    """The assignee value meaning "me": what `assignee=me` means in the JSON API."""
    return actor.name or actor.label


# ------------------------------------------------------------------ session


# The server's record of each signed-in session (Redis, `authsvc-dash:<sha256 of the sid>`,
# value: token id, organization and start time; it expires after the idle window and is
# deleted at sign-out). The signed cookie alone cannot be revoked: a copy of it would keep
# working after sign-out. No record (signed out, idle, or Redis restarted): sign in again.
SESSION_PREFIX = "authsvc-dash:"


def _store():  # type: ignore[no-untyped-def]
    return current_app.extensions["authsvc_redis"]


def _record_key(sid: str) -> str:
    return SESSION_PREFIX + hashlib.sha256(sid.encode()).hexdigest()


def _record_ttl(created: float, now: float) -> int:
    """Seconds the record may live from now: the idle window, never past the maximum."""
    conf = current_app.config["DASHBOARD"]
    return max(1, int(min(conf.idle_seconds, created + conf.max_seconds - now)))


def _start_record(sid: str, token_id: str, org_id: str, now: float) -> None:
    record = json.dumps({"tid": token_id, "org": org_id, "created": int(now)})
    _store().set(_record_key(sid), record, ex=_record_ttl(now, now))


def _load_record(sid: object) -> dict | None:
    """The session's record; None when there is none (RedisError: the caller answers 503)."""
    if not isinstance(sid, str) or not 20 <= len(sid) <= 100:
        return None
    raw = _store().get(_record_key(sid))
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _end_record(sid: object, *, quiet: bool = False) -> None:
    if not isinstance(sid, str):
        return
    try:
        _store().delete(_record_key(sid))
    except Exception:  # noqa: BLE001 - only when `quiet`: the record expires by itself
        if not quiet:
            raise
        log.warning("dashboard: a session record could not be deleted (it expires)")


def _csrf_check() -> None:
    """Flask-WTF's check, run by hand (WTF_CSRF_CHECK_DEFAULT=False) once the session is
    known good, so a POST without a session is refused before its body is parsed."""
    if request.method == "POST":
        current_app.extensions["csrf"].protect()


@bp.before_request
def _require_session() -> Any:
    if request.endpoint in ("dashboard.login",):
        _csrf_check()
        return _refuse_nul()
    conf = current_app.config["DASHBOARD"]
    now = clock.now().timestamp()
    token_id = session.get("tid")
    if not token_id:
        cookie = request.cookies.get(current_app.config["SESSION_COOKIE_NAME"])
        # a cookie that no longer opens (signature older than the idle window), or none at
        # all after a sign-in (the browser dropped it when it expired), is an expiry
        expired = (cookie is not None and not any(k for k in session if k != "lang")) or (
            request.cookies.get(MARKER) == "1")
        return _to_login("session_expired" if expired else "sign_in_required")
    seen = session.get("seen")
    if not isinstance(seen, int | float) or now - seen > conf.idle_seconds or now < seen - 60:
        return _to_login("session_expired", token_id)
    sid = session.get("sid")
    record = _load_record(sid)  # Redis down: RedisError → a 503 page, never let in
    if record is None or record.get("tid") != token_id or record.get("org") != session.get(
            "org"):
        return _to_login("session_ended", token_id, "session_ended")
    created = record.get("created")
    if not isinstance(created, int) or now - created > conf.max_seconds:
        return _to_login("session_too_long", token_id, "session_max_length")
    actor, reason = auth.token_actor(token_id=token_id, request_id=g.request_id,
                                     source_ip=request.remote_addr)
    if (actor is None or actor.org_id != session.get("org")
            or actor.role != session.get("role") or actor.role not in ROLES):
        return _to_login("session_revoked", token_id, reason or "token_changed")
    g.actor = actor
    security.enforce_rate_limits(actor.org_id, actor.token_id or "")
    if not g.get("dashboard_poll"):  # a person's request: the idle window starts again
        session["seen"] = int(now)
        _store().expire(_record_key(sid), _record_ttl(created, now))
    _csrf_check()
    return _refuse_nul()


FIELD_LABELS = {
    "token": "token_label", "text": "note_label", "note": "resolve_note",
    "reason": "appeal_reason", "level_of_care": "level_of_care", "kind": "appeal_kind",
    "reference": "reference", "received_via": "received_via", "loinc": "loinc_label",
    "file": "file_label", "outcome": "outcome", "auth_number": "auth_number",
    "quantity": "authorized_quantity", "valid_from": "valid_from", "valid_to": "valid_to",
    "denial_code": "denial_code", "denial_text": "denial_text",
}


def _field_label(name: str) -> str:
    """A form field's label as the page shows it ("Line 2 · Denial reason text")."""
    if name in FIELD_LABELS:
        return _t(FIELD_LABELS[name])
    match = re.fullmatch(r"([a-z_]+)_([0-9]{1,4})", name)
    if match and match.group(1) in FIELD_LABELS:
        line = _t("line_n", n=int(match.group(2)), code="").replace(" ()", "")
        return f"{line} · {_t(FIELD_LABELS[match.group(1)])}"
    shown = name.replace("\x00", "\\x00")
    return shown if len(shown) <= 40 else shown[:40] + "…"


def _refuse_nul() -> Any:
    """A NUL character in any form field, field name or file name: a 400 page naming the
    field (PostgreSQL refuses NUL in text, which was a 500), before anything is done."""
    if request.method != "POST":
        return None
    found = next((key for key, value in request.form.items(multi=True)
                  if "\x00" in key or "\x00" in value), None)
    if found is None:
        found = next((key for key, upload in request.files.items(multi=True)
                      if "\x00" in key or "\x00" in (upload.filename or "")), None)
    if found is None:
        return None
    g.deny_reason = "nul_character"
    return render_template("error.html", status=400,
                           message=_t("nul_field", field=_field_label(found))), 400




def _to_login(notice: str, token_id: str | None = None,
              reason: str | None = None) -> Response:
    lang = session.get("lang")
    _end_record(session.get("sid"), quiet=True)
    session.clear()
    if lang:
        session["lang"] = lang
    if notice != "sign_in_required" or request.cookies:
        g.deny_reason = reason or notice
        g.deny_token_id = token_id
    else:
        g.deny_reason = "no_session"
    target = url_for("dashboard.login", notice=notice)
    if g.get("dashboard_poll"):
        resp = Response(_notice(notice), status=401, mimetype="text/plain")
        resp.headers["X-Dashboard-Login"] = target
    else:
        resp = redirect(target, 303)
    resp.delete_cookie(MARKER, path="/app/", httponly=True, samesite="Strict",
                       secure=current_app.config["SESSION_COOKIE_SECURE"])
    return resp


def _notice(notice: str) -> str:
    conf = current_app.config["DASHBOARD"]
    return _t(notice, minutes=f"{conf.idle_seconds / 60:g}",
              hours=f"{conf.max_seconds / 3600:g}")


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    notice = request.args.get("notice")
    message = _notice(notice) if notice in LOGIN_NOTICES else None
    if request.method == "GET":
        return render_template("login.html", notice=message, error=None)
    security.check_auth_failures()  # an address guessing tokens waits (429), as for the API
    token = (request.form.get("token") or "").strip()
    if not token:
        return render_template("login.html", notice=None, error=_t("signin_empty")), 400
    actor, reason = auth.token_actor(token=token, request_id=g.request_id,
                                     source_ip=request.remote_addr)
    if actor is None:
        security.note_auth_failure()
        g.deny_reason = reason
        key = {"revoked_token": "signin_revoked_token",
               "expired_token": "signin_expired_token"}.get(reason or "", "signin_bad_token")
        return render_template("login.html", notice=None, error=_t(key)), 401
    if actor.role not in ROLES:
        g.deny_reason = "wrong_role"
        g.deny_token_id = actor.token_id
        return render_template("login.html", notice=None,
                               error=_t("signin_wrong_role", role=actor.role)), 403
    lang = session.get("lang")
    now = clock.now().timestamp()
    sid = secrets.token_urlsafe(32)
    _start_record(sid, actor.token_id or "", actor.org_id, now)  # Redis down: 503 page
    _end_record(session.get("sid"), quiet=True)  # signing in again ends the earlier one
    session.clear()  # a fresh session (and CSRF token) for the signed-in person
    session.update(tid=actor.token_id, org=actor.org_id, role=actor.role, sid=sid,
                   seen=int(now))
    if lang:
        session["lang"] = lang
    session.permanent = True
    g.actor = actor
    resp = redirect(url_for("dashboard.worklist_page"), 303)
    resp.set_cookie(MARKER, "1", httponly=True, samesite="Strict", path="/app/",
                    secure=current_app.config["SESSION_COOKIE_SECURE"])
    return resp


@bp.route("/logout", methods=["POST"])
def logout() -> Response:
    lang = session.get("lang")
    _end_record(session.get("sid"))  # a copy of the cookie opens nothing from now on
    session.clear()
    if lang:
        session["lang"] = lang
    resp = redirect(url_for("dashboard.login", notice="signed_out"), 303)
    resp.delete_cookie(MARKER, path="/app/", httponly=True, samesite="Strict",
                       secure=current_app.config["SESSION_COOKIE_SECURE"])
    return resp


# ------------------------------------------------------------------ formatting


def _parse_time(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


def _span(delta: dt.timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    days, rest = divmod(minutes, 24 * 60)
    hours, mins = divmod(rest, 60)
    if days:
        return _t("span_days_hours", d=days, h=hours)
    if hours >= 3 or (hours and not mins):
        return _t("span_hours", h=hours)
    if hours:
        return _t("span_hours_minutes", h=hours, m=mins)
    return _t("span_minutes", m=max(mins, 1))


def time_left(due: str | None, now: dt.datetime) -> str:
    """"2 d 4 h left" / "overdue by 3 h" (in the UI language)."""
    at = _parse_time(due)
    if at is None:
        return _t("no_deadline")
    if at < now:
        return _t("overdue_by", span=_span(now - at))
    return _t("left", span=_span(at - now))


def _when(value: str | None) -> str:
    at = _parse_time(value)
    return at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC") if at else ""


@bp.app_template_filter("when")
def _when_filter(value: str | None) -> str:
    return _when(value)


# ------------------------------------------------------------------ worklist


def _filters(actor: Actor) -> tuple[worklist.WorklistFilter, dict[str, str], list[str]]:
    args = request.args
    chosen: dict[str, str] = {}
    bad: list[str] = []
    state = args.get("state") or ""
    if state and state not in OPEN_STATES:
        bad.append(_t("filter_state"))
        state = ""
    urgency = args.get("urgency") or ""
    if urgency and urgency not in URGENCIES:
        bad.append(_t("filter_urgency"))
        urgency = ""
    payer = (args.get("payer_id") or "").strip()
    if len(payer) > 64:
        bad.append(_t("filter_payer"))
        payer = ""
    assignee = (args.get("assignee") or "").strip()
    if len(assignee) > 200:
        bad.append(_t("filter_assignee"))
        assignee = ""
    attention = args.get("needs_attention") == "1"
    mine = args.get("mine") == "1"
    for key, value in (("state", state), ("urgency", urgency), ("payer_id", payer),
                       ("assignee", assignee), ("needs_attention", "1" if attention else ""),
                       ("mine", "1" if mine else "")):
        if value:
            chosen[key] = value
    f = worklist.WorklistFilter(
        states=(state,) if state else OPEN_STATES, payer_id=payer or None,
        urgency=urgency or None, needs_attention=True if attention else None,
        assignee=_me(actor) if mine else (assignee or None))
    return f, chosen, bad


def _counts(conn, org_id: str) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Open cases per state, for the counts at the top of the worklist."""
    return worklist.state_counts(conn, org_id, OPEN_STATES)


@bp.route("/", methods=["GET"])
def worklist_page() -> Any:
    actor = _actor()
    f, chosen, bad = _filters(actor)
    cursor = request.args.get("cursor") or None
    messages: list[str] = []
    if bad:
        messages.append(_t("bad_filter", fields=", ".join(bad)))
    with _engine().connect() as conn:
        try:
            page = worklist.case_list(conn, actor.org_id, f, cursor=cursor, limit=PAGE_SIZE)
        except BadCursor:
            messages.append(_t("bad_cursor"))
            cursor = None
            page = worklist.case_list(conn, actor.org_id, f, cursor=None, limit=PAGE_SIZE)
        counts = _counts(conn, actor.org_id)
    now = clock.now()
    items = [{**item, "time_left": time_left(item["decision_due_at"], now)}
             for item in page["items"]]
    query = urlencode(chosen)
    next_url = (url_for("dashboard.worklist_page") + "?" + urlencode(
        {**chosen, "cursor": page["next_cursor"]})) if page["next_cursor"] else None
    context = {
        "items": items, "chosen": chosen, "messages": messages, "counts": counts,
        "total": sum(counts.values()), "next_url": next_url, "paged": cursor is not None,
        "first_url": url_for("dashboard.worklist_page") + ("?" + query if query else ""),
        "refresh_url": url_for("dashboard.worklist_page") + (
            "?" + request.query_string.decode("ascii", "replace") if request.query_string
            else ""), "open_states": OPEN_STATES,
        "urgencies": URGENCIES, "updated": now.strftime("%H:%M:%S UTC"),
    }
    template = "_worklist.html" if g.get("dashboard_poll") else "worklist.html"
    return render_template(template, **context), 400 if bad else 200


# ------------------------------------------------------------------ case page


def _audit_read(conn, actor: Actor, entity_type: str, entity_id: str,  # type: ignore[no-untyped-def]
                patient_id: str | None) -> None:
    repo.add_audit(conn, at=clock.now(), org_id=actor.org_id, token_id=actor.token_id,
                   role=actor.role, action="read", entity_type=entity_type,
                   entity_id=entity_id, patient_id=patient_id, outcome="success",
                   request_id=actor.request_id, source_ip=actor.source_ip)


def _patient_of_case(conn, org_id: str, case_id: str) -> str | None:  # type: ignore[no-untyped-def]
    """The patient a case's order is about (for the audit row), within the organization."""
    case = repo.case_row(conn, case_id, org_id)
    order = repo.order_row(conn, case["order_id"], org_id) if case else None
    return order["patient_id"] if order else None


def _render_case(case_id: str, status: int = 200, error: str | None = None) -> Any:
    actor = _actor()
    with _engine().begin() as conn:
        case = worklist.case_detail(conn, actor.org_id, case_id, with_bodies=False)
        order = views.order_view(conn, actor.org_id, case["order_id"], with_timeline=False)
        row = repo.order_row(conn, case["order_id"], actor.org_id)
        patient_id = row["patient_id"] if row else None
        # the same rows GET /v1/cases/{id} and GET /v1/orders/{id} write
        _audit_read(conn, actor, "case", case_id, patient_id)
        _audit_read(conn, actor, "order", case["order_id"], patient_id)
    now = clock.now()
    return render_template(
        "case.html", case=case, order=order, error=error,
        time_left=(_t("decided", time=_when(case["decided_at"])) if cs.is_final(case["state"])
                   else time_left(case["decision_due_at"], now)),
        can_decide=case["state"] in case_actions.DECISION_STATES,
        can_appeal=case["state"] in case_actions.APPEALABLE,
        can_cancel=cs.is_open(case["state"]) or case["state"] in cs.AUTHORIZED,
        can_upload=not cs.is_final(case["state"]),
        can_resubmit=case["state"] in case_actions.RESUBMITTABLE,
        outcomes=tuple(case_actions.ACTION_BY_OUTCOME), form=request.form), status


@bp.route("/cases/<case_id>", methods=["GET"])
def case_page(case_id: str) -> Any:
    return _render_case(case_id)


@bp.route("/cases/<case_id>/attachments/<attachment_id>", methods=["GET"])
def attachment(case_id: str, attachment_id: str) -> Any:
    from authsvc.adapters.attachment_files import Unreadable

    actor = _actor()
    with _engine().begin() as conn:
        row = rc.attachment(conn, actor.org_id, case_id, attachment_id)
        if row is None:
            raise NotFound("attachment")
        _audit_read(conn, actor, "attachment", attachment_id, _patient_of_case(
            conn, actor.org_id, case_id))
    try:  # as GET /v1/cases/{id}/attachments/{id}: the file's SHA-256 must match the row
        data = case_actions.attachment_bytes(row, current_app.extensions[
            "authsvc"].settings.attachments_dir)
    except Unreadable as exc:  # the folder is gone or the file altered: ids only in the log
        current_app.logger.error("attachment %s unreadable: %s", attachment_id, exc)
        body, status = render_template("error.html", status=503,
                                       message=_t("attachment_unreadable")), 503
        return Response(body, status, headers={"Retry-After": "60"}, mimetype="text/html")
    resp = Response(data, status=200, mimetype=row["content_type"])
    resp.headers["Content-Disposition"] = "attachment"
    resp.headers["X-Attachment-Sha256"] = row["sha256"]
    return resp


def _field_list(errors: list[tuple[str, str]]) -> str:
    return "; ".join(f"{name}: {problem}" for name, problem in errors)


def _conflict(detail: str, state: str | None) -> str:
    """The service layer's reason (English) in English; a translated sentence otherwise."""
    word = i18n.word(g.lang, "state", state)
    if g.lang == "en":
        return _t("conflict", detail=detail, state=word)
    return _t("conflict_generic", state=word)


def _act(case_id: str, done: str, work, *, new_case: bool = False) -> Any:  # type: ignore[no-untyped-def]
    """Run one case action in one transaction; success → back to the case page with a
    message (303), refusal → the case page with the reason and the matching status."""
    try:
        with _engine().begin() as conn:
            result = work(conn)
    except StateConflict as exc:
        return _render_case(case_id, 409, _conflict(str(exc), exc.current_state))
    except IllegalTransition as exc:
        return _render_case(case_id, 409, _conflict(str(exc), exc.current))
    except case_actions.Invalid as exc:
        return _render_case(case_id, 422, _t("invalid", fields=_field_list(
            [(e["field"], e["message"]) for e in exc.errors])))
    except case_actions.UnsupportedMedia:
        return _render_case(case_id, 415, _t("unsupported_file"))
    flash(_t(done), "success")
    target = result if new_case and isinstance(result, str) else case_id
    return redirect(url_for("dashboard.case_page", case_id=target), 303)


def _text(name: str, label: str, errors: list[tuple[str, str]], *, max_len: int,
          required: bool = False) -> str | None:
    value = (request.form.get(name) or "").strip()
    if not value:
        if required:
            errors.append((label, _t("required")))
        return None
    if len(value) > max_len:
        errors.append((label, _t("too_long")))
        return None
    return value


def _invalid(case_id: str, errors: list[tuple[str, str]]) -> Any:
    return _render_case(case_id, 422, _t("invalid", fields=_field_list(errors)))


@bp.route("/cases/<case_id>/assign", methods=["POST"])
def assign(case_id: str) -> Any:
    actor = _actor()
    return _act(case_id, "done_assign",
                lambda conn: case_actions.assign(actor, conn, case_id, _me(actor)))


@bp.route("/cases/<case_id>/notes", methods=["POST"])
def note(case_id: str) -> Any:
    errors: list[tuple[str, str]] = []
    text = _text("text", _t("note_label"), errors, max_len=10_000, required=True)
    if errors or text is None:
        return _invalid(case_id, errors)
    actor = _actor()
    return _act(case_id, "done_note",
                lambda conn: case_actions.add_note(actor, conn, case_id, text))


@bp.route("/cases/<case_id>/attachments", methods=["POST"])
def upload(case_id: str) -> Any:
    upload = request.files.get("file")
    data = b""
    filename = "document"
    if upload is not None:
        try:
            data = upload.read(case_actions.MAX_ATTACHMENT_BYTES + 1)
            filename = case_actions.clean_filename(upload.filename)
        finally:
            upload.close()
    if len(data) > case_actions.MAX_ATTACHMENT_BYTES:
        return _render_case(case_id, 413, _t("too_large"))
    if not data:
        return _render_case(case_id, 422, _t("empty_file"))
    errors: list[tuple[str, str]] = []
    loinc = _text("loinc", _t("loinc_label"), errors, max_len=20)
    if loinc is not None and not re.fullmatch(r"[0-9A-Za-z-]{1,20}", loinc):
        errors.append((_t("loinc_label"), _t("bad_choice")))
    if errors:
        return _invalid(case_id, errors)
    actor = _actor()
    services = current_app.extensions["authsvc"]
    folder = services.settings.attachments_dir  # as POST /v1/cases/{id}/attachments
    try:
        with case_actions.upload_guard(services.engine, folder, actor.org_id, data):
            answer = _act(case_id, "done_attachment", lambda conn: case_actions.add_attachment(
                actor, conn, case_id, filename=filename, data=data, loinc=loinc,
                folder=folder))
            if not (isinstance(answer, Response) and answer.status_code == 303):
                raise _NotStored(answer)  # a refusal page: its transaction rolled back
            return answer
    except _NotStored as refused:
        return refused.answer
    except case_actions.StorageFull:
        body = render_template("error.html", status=503, message=_t("storage_full"))
        return Response(body, 503, headers={"Retry-After": "300"}, mimetype="text/html")


class _NotStored(Exception):
    """Carries a refusal page out of the upload guard, so the guard cleans up after it."""

    def __init__(self, answer: Any):
        super().__init__("not stored")
        self.answer = answer


def _date(name: str, label: str, errors: list[tuple[str, str]]) -> dt.date | None:
    raw = (request.form.get(name) or "").strip()
    if not raw:
        return None
    try:
        if len(raw) != 10:
            raise ValueError
        return dt.date.fromisoformat(raw)
    except ValueError:
        errors.append((label, _t("bad_date")))
        return None


@bp.route("/cases/<case_id>/decision", methods=["POST"])
def decision(case_id: str) -> Any:
    errors: list[tuple[str, str]] = []
    via = request.form.get("received_via")
    if via not in ("phone", "fax", "portal"):
        errors.append((_t("received_via"), _t("bad_choice")))
    reference = _text("reference", _t("reference"), errors, max_len=100)
    lines = []
    sequences = sorted({int(m.group(1)) for key in request.form
                        if (m := re.fullmatch(r"outcome_([0-9]{1,4})", key))})
    for seq in sequences[:50]:
        outcome = request.form.get(f"outcome_{seq}") or ""
        if not outcome:
            continue  # a line left undecided
        label = _t("line_n", n=seq, code="").replace(" ()", "")
        if outcome not in case_actions.ACTION_BY_OUTCOME:
            errors.append((f"{label} · {_t('outcome')}", _t("bad_choice")))
            continue
        auth_number = _text(f"auth_number_{seq}", f"{label} · {_t('auth_number')}", errors,
                            max_len=80)
        qty = None
        raw_qty = (request.form.get(f"quantity_{seq}") or "").strip()
        if raw_qty:
            # ASCII digits only: isdigit() takes "²" (int() then fails) and "١" (Arabic-Indic)
            if not re.fullmatch(r"[0-9]{1,3}", raw_qty) or not 1 <= int(raw_qty) <= 999:
                errors.append((f"{label} · {_t('authorized_quantity')}", _t("bad_number")))
            else:
                qty = int(raw_qty)
        elif outcome == "modified":
            errors.append((f"{label} · {_t('authorized_quantity')}", _t("required")))
        valid_from = _date(f"valid_from_{seq}", f"{label} · {_t('valid_from')}", errors)
        valid_to = _date(f"valid_to_{seq}", f"{label} · {_t('valid_to')}", errors)
        if valid_from and valid_to and valid_to < valid_from:
            errors.append((f"{label} · {_t('valid_to')}", _t("bad_date")))
        code = _text(f"denial_code_{seq}", f"{label} · {_t('denial_code')}", errors,
                     max_len=10)
        text = _text(f"denial_text_{seq}", f"{label} · {_t('denial_text')}", errors,
                     max_len=500)
        lines.append({"sequence": seq, "outcome": outcome, "auth_number": auth_number,
                      "authorized_quantity": qty, "valid_from": valid_from,
                      "valid_to": valid_to,
                      "denial_reason": {"code": code, "text": text} if code or text else None})
    if not lines and not errors:
        errors.append((_t("outcome"), _t("required")))
    if errors:
        return _invalid(case_id, errors)
    body = {"reference": reference, "received_via": via, "lines": lines}
    actor = _actor()
    services = current_app.extensions["authsvc"]
    return _act(case_id, "done_decision", lambda conn: case_actions.record_decision(
        services, actor, conn, case_id, body))


@bp.route("/cases/<case_id>/appeal", methods=["POST"])
def appeal(case_id: str) -> Any:
    errors: list[tuple[str, str]] = []
    kind = request.form.get("kind")
    if kind not in case_actions.APPEAL_KINDS:
        errors.append((_t("appeal_kind"), _t("bad_choice")))
    level = _text("level_of_care", _t("level_of_care"), errors, max_len=100,
                  required=kind == "immediate")
    reason = _text("reason", _t("appeal_reason"), errors, max_len=2000)
    if errors:
        return _invalid(case_id, errors)
    actor = _actor()
    body = {"kind": kind, "level_of_care": level, "reason": reason}
    return _act(case_id, "done_appeal",
                lambda conn: case_actions.appeal(actor, conn, case_id, body), new_case=True)


@bp.route("/cases/<case_id>/resolve", methods=["POST"])
def resolve(case_id: str) -> Any:
    errors: list[tuple[str, str]] = []
    note = _text("note", _t("resolve_note"), errors, max_len=2000)
    if errors:
        return _invalid(case_id, errors)
    actor = _actor()
    return _act(case_id, "done_resolve",
                lambda conn: case_actions.resolve(actor, conn, case_id, note))


@bp.route("/cases/<case_id>/resubmit", methods=["POST"])
def resubmit(case_id: str) -> Any:
    actor = _actor()
    return _act(case_id, "done_resubmit",
                lambda conn: case_actions.resubmit(actor, conn, case_id), new_case=True)


@bp.route("/cases/<case_id>/cancel", methods=["POST"])
def cancel(case_id: str) -> Any:
    actor = _actor()
    return _act(case_id, "done_cancel", lambda conn: case_actions.cancel(actor, conn, case_id))


# ------------------------------------------------------------------ metrics


def _period() -> tuple[dt.date, dt.date, str | None, list[str]]:
    bad: list[str] = []
    today = clock.now().date()

    def parse(name: str, default: dt.date) -> dt.date:
        raw = (request.args.get(name) or "").strip()
        if not raw:
            return default
        try:
            if len(raw) != 10:
                raise ValueError
            day = dt.date.fromisoformat(raw)
        except ValueError:
            bad.append(f"{_t(name)}: {_t('bad_date')}")
            return default
        if not reports.in_range(day):  # 0001-01-01 or 9999-12-31: the arithmetic overflows
            bad.append(f"{_t(name)}: " + _t("date_out_of_range", earliest=reports.EARLIEST,
                                               latest=reports.LATEST))
            return default
        return day

    end = parse("to", today)
    start = parse("from", reports.default_start(end))
    if start > end:
        bad.append(f"{_t('from')}: > {_t('to')}")
        start = reports.default_start(end)
    if (end - start).days > MAX_REPORT_DAYS:
        bad.append(f"{_t('from')}: {_t('too_long')}")
        start = reports.default_start(end)
    payer = (request.args.get("payer_id") or "").strip() or None
    if payer is not None and len(payer) > 64:
        bad.append(f"{_t('filter_payer')}: {_t('too_long')}")
        payer = None
    return start, end, payer, bad


def _report(start: dt.date, end: dt.date, payer: str | None, action: str) -> dict:
    actor = _actor()
    with _engine().begin() as conn:
        report = reports.prior_auth_metrics(conn, actor.org_id, start, end, payer)
        repo.add_audit(conn, at=clock.now(), org_id=actor.org_id, token_id=actor.token_id,
                       role=actor.role, action=action, entity_type="report",
                       entity_id="prior-auth-metrics", outcome="success",
                       request_id=actor.request_id, source_ip=actor.source_ip)
    return report


@bp.route("/metrics", methods=["GET"])
def metrics() -> Any:
    start, end, payer, bad = _period()
    report = _report(start, end, payer, "read")
    groups = report["groups"]
    longest = max((gr["median_decision_hours"] or 0 for gr in groups), default=0) or 1
    chart = [{
        "label": f"{gr['payer_id']} · {i18n.word(g.lang, 'urgency', gr['urgency'])}",
        "approved_pct": gr["approved_pct"], "median": gr["median_decision_hours"],
        "approved_width": round(3 * (gr["approved_pct"] or 0)),
        "median_width": round(300 * (gr["median_decision_hours"] or 0) / longest),
    } for gr in groups]
    params = {"from": start.isoformat(), "to": end.isoformat(), **(
        {"payer_id": payer} if payer else {})}
    return render_template(
        "metrics.html", report=report, chart=chart, params=params,
        messages=[_t("bad_period", fields="; ".join(bad))] if bad else [],
        csv_url=url_for("dashboard.metrics_csv") + "?" + urlencode(params)), (
        400 if bad else 200)


@bp.route("/metrics.csv", methods=["GET"])
def metrics_csv() -> Any:
    start, end, payer, bad = _period()
    if bad:
        return render_template("error.html", status=400, message=_t(
            "bad_period", fields="; ".join(bad))), 400
    report = _report(start, end, payer, "export")
    resp = Response(reports.to_csv(report), status=200, mimetype="text/csv")
    resp.headers["Content-Disposition"] = (
        f'attachment; filename="prior-auth-metrics-{start}-{end}.csv"')
    return resp
