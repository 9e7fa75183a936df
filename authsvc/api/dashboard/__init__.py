"""The coordinators' dashboard: server-rendered pages under `/app/` (docs/dashboard.md).

A thin adapter over the same service-layer functions the JSON API calls (worklist,
case_actions, reports, views). It is its own small Flask app sharing the API's services,
mounted at `/app` in front of the API app by `mount(app, settings)`: the API's URL map (and
the inventory tests that pin it to `/openapi.json`) stays the API's, and the dashboard's
cookie session, CSRF checks and HTML error pages never touch the bearer-token API.

Security, in one place:
- Sign-in takes a coordinator or admin API token once; the session (a signed cookie) holds
  only a random session id, the token id, organization, role, the last activity time and
  the UI language. The server's record of the session (Redis, views.SESSION_PREFIX) is
  checked on every request and deleted at sign-out, so a copied cookie dies with it; no
  Redis, no entry (503). Every request re-checks the token (revocation and expiry take
  effect on the next request).
- Maximum session length (`AUTHSVC_DASHBOARD_MAX_SECONDS`, 12 h) from the record's start.
- Idle timeout (`AUTHSVC_DASHBOARD_IDLE_SECONDS`): enforced by our own check of the last
  activity and by the cookie signature's age; the cookie's own lifetime is the same window.
  The worklist's 30-second auto-refresh does not count as activity.
- Cookie: HttpOnly, SameSite=Strict, Secure with the `__Host-` prefix (plain http only on
  loopback, for `make run` and tests); Strict-Transport-Security with a Secure cookie.
  CSRF: Flask-WTF on every POST (400 page on refusal), checked after the session so a POST
  from no one is not parsed.
- A strict Content-Security-Policy (no inline script); JS and CSS are static files.
- Every request is audited like the API's (`/v1/` hook in authsvc/api/security.py): PHI
  reads per entity with the patient, everything else per request, denials included.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode

from flask import Flask, Response, g, render_template, request, session
from flask.sessions import SecureCookieSessionInterface
from flask_wtf.csrf import CSRFError, CSRFProtect
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from authsvc.api.dashboard import i18n
from authsvc.api.dashboard.config import DashboardConfig
from authsvc.api.errors import ApiProblem
from authsvc.config import Settings
from authsvc.domain.errors import NotFound

log = logging.getLogger(__name__)
PREFIX = "/app"
HERE = Path(__file__).resolve().parent
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # same-origin (not no-referrer): Flask-WTF checks the Referer of HTTPS form posts.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "geolocation=(), camera=(), microphone=()",
    "Server": "authsvc",
}
HSTS = "max-age=31536000"


class DashboardSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie session, except that a background refresh (the worklist's
    auto-refresh) never re-issues the cookie: only a person's request extends the session."""

    def should_set_cookie(self, app: Flask, sess) -> bool:  # type: ignore[no-untyped-def]
        if g.get("dashboard_poll") and not sess.modified:
            return False
        return super().should_set_cookie(app, sess)


def create_dashboard(parent: Flask, settings: Settings) -> Flask:
    """The dashboard app, sharing the API app's services, Redis and rate limiter."""
    from authsvc.api.dashboard import views

    conf = DashboardConfig.from_env(settings)
    if conf.unusable:
        return _unavailable(conf.unusable)
    dash = Flask("authsvc.api.dashboard", root_path=str(HERE), static_folder="static",
                 static_url_path="/static", template_folder="templates")
    dash.config.update(
        SECRET_KEY=conf.secret_key,
        SESSION_COOKIE_NAME=conf.cookie_name,
        SESSION_COOKIE_SECURE=conf.secure_cookie,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_PATH="/",
        SESSION_COOKIE_DOMAIN=None,
        PERMANENT_SESSION_LIFETIME=dt.timedelta(seconds=conf.idle_seconds),
        SESSION_REFRESH_EACH_REQUEST=True,
        WTF_CSRF_TIME_LIMIT=None,  # bound to the session, which the idle timeout ends
        # checked by views._require_session once the session is known good: a POST from
        # no one is refused before its (up to 11 MiB) body is parsed
        WTF_CSRF_CHECK_DEFAULT=False,
        MAX_CONTENT_LENGTH=11 * 1024 * 1024,
        SEND_FILE_MAX_AGE_DEFAULT=0,
        DASHBOARD=conf,
    )
    for key, value in parent.config.items():  # the rate limits security.init_app settled
        if key.startswith("AUTHSVC_"):
            dash.config.setdefault(key, value)
    for name in ("authsvc", "authsvc_redis", "authsvc_limiter"):
        if name in parent.extensions:
            dash.extensions[name] = parent.extensions[name]
    dash.session_interface = DashboardSessions()
    _hooks(dash)  # before CSRFProtect: the request id and language exist for its refusals
    CSRFProtect(dash)
    dash.jinja_env.autoescape = True
    dash.register_blueprint(views.bp)
    _errors(dash)
    return dash


def _unavailable(reason: str) -> Flask:
    """A stand-in that answers 503 under /app/ when the dashboard may not run safely."""
    log.error("dashboard disabled: %s", reason)
    dash = Flask("authsvc.api.dashboard.disabled", static_folder=None)

    @dash.route("/", defaults={"path": ""}, methods=["GET", "POST"])
    @dash.route("/<path:path>", methods=["GET", "POST"])
    def _off(path: str) -> Response:
        resp = Response("The dashboard is not configured on this server.", status=503,
                        mimetype="text/plain")
        resp.headers.update({k: v for k, v in HEADERS.items()})
        return resp

    return dash


def mount(app: Flask, settings: Settings) -> Flask:
    """Serve the dashboard under `/app/` from the API's WSGI entry point."""
    dash = create_dashboard(app, settings)
    app.extensions["authsvc_dashboard"] = dash
    app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {PREFIX: dash})  # type: ignore[method-assign]
    return dash


def _hooks(dash: Flask) -> None:
    from authsvc.adapters.db import audit
    from authsvc.api import metrics

    @dash.before_request
    def _begin() -> None:
        g.started = time.perf_counter()
        audit.forget_request()
        rid = request.headers.get("X-Request-Id")
        g.request_id = rid if rid and REQUEST_ID_RE.fullmatch(rid) else uuid.uuid4().hex
        g.dashboard_poll = request.headers.get("X-Dashboard-Poll") == "1"
        g.lang = i18n.choose_language()
        if "\x00" in request.path or any(
                "\x00" in k or "\x00" in v for k, v in request.args.items(multi=True)):
            raise ApiProblem(400, "NUL characters are not allowed in the URL.")

    @dash.context_processor
    def _helpers() -> dict:
        lang = g.get("lang", "en")
        return {"_": lambda key, **kw: i18n.translate(lang, key, **kw),
                "word": lambda prefix, value: i18n.word(lang, prefix, value),
                "lang": lang, "actor": g.get("actor"),
                "lang_url": _lang_url}

    @dash.after_request
    def _finish(resp: Response) -> Response:
        for key, value in HEADERS.items():
            resp.headers[key] = value
        resp.headers["X-Request-Id"] = g.get("request_id", "")
        if dash.config["SESSION_COOKIE_SECURE"]:  # served over HTTPS: browsers keep to it
            resp.headers["Strict-Transport-Security"] = HSTS
        resp.vary.add("Cookie")
        if session and not session.permanent:
            session.permanent = True  # every dashboard cookie expires with the idle window
        if request.endpoint != "static":
            _audit(resp)
        started = g.get("started")
        if started is not None:
            rule = request.url_rule.rule if request.url_rule else "unmatched"
            metrics.observe(request.method, PREFIX + rule, resp.status_code,
                            time.perf_counter() - started)
        return resp


def _lang_url(lang: str, error_page: bool = False) -> str:
    """This page in another language: the current GET address with `lang` replaced. After a
    form POST (its address accepts no GET) the case page it came from; from an error page
    (which must not echo the address it refuses) the worklist."""
    from flask import url_for

    if error_page:
        base, args = url_for("dashboard.worklist_page"), []
    elif request.method == "GET":
        base = request.script_root + request.path
        args = [(k, v) for k, v in request.args.items(multi=True) if k != "lang"]
    else:
        case_id = (request.view_args or {}).get("case_id")
        base = (url_for("dashboard.case_page", case_id=case_id) if case_id
                else url_for("dashboard.worklist_page"))
        args = []
    return base + "?" + urlencode([*args, ("lang", lang)])


def _audit(resp: Response) -> None:
    """One audit row per request unless the handler wrote a more detailed one (PHI reads
    and case actions do, with the patient); denials are recorded with their reason."""
    from flask import current_app

    from authsvc.adapters.db import audit

    request_id = g.get("request_id")
    deny = g.get("deny_reason")
    status = resp.status_code
    if deny is None and status < 400 and audit.last_request_id() == request_id:
        return
    if deny is not None:
        outcome = "denied"
    elif status >= 400:
        outcome = "denied" if status in (400, 401, 403, 404, 429) else "error"
    else:
        outcome = "success"
    entity_type, action = AUDIT_KIND.get(request.endpoint or "", ("dashboard", "read"))
    if request.method == "GET" and action not in ("search", "export", "read"):
        action = "read"
    entity_id = None
    for value in (request.view_args or {}).values():
        if isinstance(value, str) and re.fullmatch(r"[a-z]{2,8}_[0-9a-z]{4,40}", value):
            entity_id = value
            break
    actor = g.get("actor")
    try:
        with current_app.extensions["authsvc"].engine.begin() as conn:
            audit.append(
                conn, at=_now(), org_id=getattr(actor, "org_id", None),
                token_id=getattr(actor, "token_id", None) or g.get("deny_token_id"),
                role=getattr(actor, "role", None), action=action, entity_type=entity_type,
                entity_id=entity_id, patient_id=None, outcome=outcome, request_id=request_id,
                source_ip=request.remote_addr,
                reason=deny or (None if status < 400 else f"dashboard_{status}"))
    except Exception as exc:  # noqa: BLE001 - an audit failure never turns into a 500 page
        log.error("dashboard audit write failed: %s", type(exc).__name__)


def _now() -> dt.datetime:
    from authsvc.domain import clock

    return clock.now()


AUDIT_KIND = {
    "dashboard.login": ("dashboard_session", "login"),
    "dashboard.logout": ("dashboard_session", "logout"),
    "dashboard.worklist_page": ("case", "search"),
    "dashboard.case_page": ("case", "read"),
    "dashboard.attachment": ("attachment", "read"),
    "dashboard.metrics": ("report", "read"),
    "dashboard.metrics_csv": ("report", "export"),
    "dashboard.assign": ("case", "assign"),
    "dashboard.note": ("case", "notes"),
    "dashboard.upload": ("case", "attachments"),
    "dashboard.decision": ("case", "decision"),
    "dashboard.appeal": ("case", "appeal"),
    "dashboard.cancel": ("case", "cancel"),
    "dashboard.resolve": ("case", "resolve"),
    "dashboard.resubmit": ("case", "resubmit"),
}


def _page(status: int, message: str) -> tuple[str, int]:
    return render_template("error.html", status=status, message=message), status


def _errors(dash: Flask) -> None:
    def t(key: str, **kw: object) -> str:
        return i18n.translate(g.get("lang", "en"), key, **kw)

    @dash.errorhandler(CSRFError)
    def _csrf(exc: CSRFError):  # type: ignore[no-untyped-def]
        from authsvc.api.dashboard.views import MARKER, _to_login

        if request.endpoint != "dashboard.login" and not session.get("tid"):
            # the session ended (its CSRF token with it): say so, not "forged form"
            ended = request.cookies.get(MARKER) == "1"
            return _to_login("session_expired" if ended else "sign_in_required")
        g.deny_reason = "csrf_refused"
        return _page(400, t("error_csrf"))

    @dash.errorhandler(NotFound)
    def _not_found(exc: NotFound):  # type: ignore[no-untyped-def]
        g.deny_reason = "not_found"
        return _page(404, t("error_404"))

    @dash.errorhandler(ApiProblem)
    def _problem(exc: ApiProblem):  # type: ignore[no-untyped-def]
        if exc.status == 429:
            g.deny_reason = g.get("deny_reason") or "rate_limited"
            body, status = _page(429, t("error_429", seconds=exc.headers.get("Retry-After",
                                                                              "60")))
            return Response(body, status, headers={"Retry-After": exc.headers.get(
                "Retry-After", "60")}, mimetype="text/html")
        return _page(exc.status if 400 <= exc.status < 500 else 400, t("error_400"))

    @dash.errorhandler(HTTPException)
    def _http(exc: HTTPException):  # type: ignore[no-untyped-def]
        status = exc.code or 500
        key = {404: "error_404", 405: "error_405", 413: "error_413"}.get(status, "error_400")
        return _page(status if status < 500 else 500, t(key if status < 500 else "error_500"))

    @dash.errorhandler(RedisError)
    def _session_store_down(exc: RedisError):  # type: ignore[no-untyped-def]
        # sessions are checked against Redis on every request: without it nobody is let in
        log.warning("dashboard: session store unavailable: %s", type(exc).__name__)
        g.deny_reason = "session_store_unavailable"
        body, status = _page(503, t("error_session_store"))
        return Response(body, status, headers={"Retry-After": "30"}, mimetype="text/html")

    @dash.errorhandler(Exception)
    def _last_resort(exc: Exception):  # type: ignore[no-untyped-def]
        from sqlalchemy.exc import OperationalError

        if isinstance(exc, OperationalError):
            log.warning("dashboard: database unavailable: %s", type(exc).__name__)
            return _page(503, t("error_503"))
        log.error("dashboard: unhandled error %s in %s", type(exc).__name__, request.endpoint)
        return _page(500, t("error_500"))
