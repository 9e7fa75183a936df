"""Cross-cutting protections of the API: audit of every PHI-route request (denials included),
rate limits per token and per organization, security headers and the production self-check.

Why here and not in each route: routes are added by many hands; hooks registered once cover
every route, including the ones written later (the security tests are generated from the
OpenAPI document for the same reason).

Rate limits are moving windows on the service's Redis (`app.extensions["authsvc_redis"]`),
every limit of a request checked and recorded by one Lua script (`_LIMITS_LUA`), one round
trip per request. They run after authentication (in
`auth.requires`), so the keys are the token id and the organization, never a client-chosen
value. When Redis is down the limits fail open: intake must keep answering (the outbox holds
the work), and the database, not Redis, is the record.

Member-id enumeration (S10, OWASP API6): one token may name at most
`AUTHSVC_RATE_LIMIT_MEMBER_IDS` *distinct* member ids per window across `POST /v1/orders`
and `POST /v1/orders/{id}/coverage` (each answer tells whether a member id is covered).
Repeating a member id already seen is free. Redis holds keyed pseudonyms (HMAC) of the ids,
never the ids. Going over it is an alert: a PHI-free WARNING log line naming the token id,
`authsvc_security_alerts_total{kind="member_id_enumeration"}`, a `rate_limit_events` row
and an audited 429.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
import re
import uuid
from collections.abc import Iterable, Mapping

from flask import Flask, Response, current_app, g, request
from prometheus_client import Counter

from authsvc.api.errors import ApiProblem
from authsvc.config import Settings

log = logging.getLogger(__name__)
# Alerting hook (S10): labels name the limit, never a token or an organization.
RATE_LIMITED = Counter("authsvc_rate_limited", "Requests refused by a rate limit", ["scope"])
SECURITY_ALERTS = Counter("authsvc_security_alerts", "Security alerts raised by the API",
                          ["kind"])

ID_RE = re.compile(r"[a-z]{2,8}_[0-9a-z]{4,40}")
AUDITED_PREFIXES = ("/v1/", "/cds-services/")
DENIED = {401: "denied", 403: "denied", 404: "denied", 429: "denied"}
DEFAULT_REASONS = {401: "unauthenticated", 403: "wrong_role", 404: "not_found",
                   429: "rate_limited"}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "geolocation=(), camera=(), microphone=()",
}
# /docs loads Swagger UI from a CDN: its page gets a policy that allows exactly that.
DOCS_CSP = ("default-src 'none'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; img-src 'self' data: "
            "https://cdn.jsdelivr.net; connect-src 'self'; frame-ancestors 'none'")

# Limits (the `limits` notation, e.g. "600/minute"); tune per deployment.
LIMIT_ENV = {
    "token": ("AUTHSVC_RATE_LIMIT_TOKEN", "1200/minute"),
    "org": ("AUTHSVC_RATE_LIMIT_ORG", "6000/minute"),
    "token_write": ("AUTHSVC_RATE_LIMIT_TOKEN_WRITE", "600/minute"),
    "auth_failures": ("AUTHSVC_RATE_LIMIT_AUTH_FAILURES", "120/minute"),
    # distinct member ids per token; unset, it follows an explicit AUTHSVC_RATE_LIMIT_TOKEN_WRITE
    # (benchmarks raise that one for bulk intake from one token)
    "member_ids": ("AUTHSVC_RATE_LIMIT_MEMBER_IDS", "120/minute"),
}
# Where a request names a member id in its JSON body: route template → path in the body.
MEMBER_ID_FIELDS = {"/v1/orders": ("coverage", "member_id"),
                    "/v1/orders/<order_id>/coverage": ("member_id",)}
# Every limit of one request in one round trip, on Redis' clock: a moving window per key (a
# sorted set of request stamps). KEYS[i] pairs with the i-th triple of ARGV[1] ("window limit
# mode …", space-separated: one argument to pack instead of three per key): `hit` counts the
# request, `test` only looks (failed authentications of the address), `distinct` counts a new
# member pseudonym (ARGV[3]) and lets a repeat through free. ARGV[2] is the request's stamp.
# Nothing is recorded unless every key allows the request; else {index, seconds to wait}.
_LIMITS_LUA = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local spec = {}
for word in string.gmatch(ARGV[1], '%S+') do spec[#spec + 1] = word end
local stamp, member = ARGV[2], ARGV[3]
for i, key in ipairs(KEYS) do
  local window, limit, mode = tonumber(spec[3*i-2]), tonumber(spec[3*i-1]), spec[3*i]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local free = mode == 'distinct' and redis.call('ZSCORE', key, member)
  if not free and redis.call('ZCARD', key) >= limit then
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    local wait = 1
    if oldest[2] then wait = math.max(1, math.ceil(tonumber(oldest[2]) + window - now)) end
    return {i, wait}
  end
end
for i, key in ipairs(KEYS) do
  local window, mode = tonumber(spec[3*i-2]), spec[3*i]
  if mode ~= 'test' then
    redis.call('ZADD', key, now, mode == 'distinct' and member or stamp)
    redis.call('PEXPIRE', key, math.ceil(window * 1000))
  end
end
return {0, 0}
"""


class UnsafeConfiguration(RuntimeError):
    """Production mode was asked for with a setting that would put PHI at risk."""

    def __init__(self, problems: list[str]):
        super().__init__("refusing to start in production: " + "; ".join(problems))
        self.problems = problems


# ------------------------------------------------------------------ production self-check


def production_problems(app: Flask, settings: Settings, services: object,
                        env: Mapping[str, str] | None = None) -> list[str]:
    """Every reason production mode must not start with this configuration (S11, S13)."""
    env = os.environ if env is None else env
    problems: list[str] = []
    if app.debug or env.get("FLASK_DEBUG", "").lower() in ("1", "true", "yes"):
        problems.append("DEBUG is on")
    if app.testing or settings.testing:
        problems.append("AUTHSVC_TESTING is on (failpoints)")
    cors = [x.strip() for x in env.get("AUTHSVC_CORS_ORIGINS", "").split(",") if x.strip()]
    if "*" in cors:
        problems.append("CORS allows every origin (*)")
    if env.get("AUTHSVC_TLS_VERIFY", "1").lower() in ("0", "false", "no"):
        problems.append("TLS verification is off (AUTHSVC_TLS_VERIFY)")
    if "CURL_CA_BUNDLE" in env and not env["CURL_CA_BUNDLE"]:
        problems.append("TLS verification is off (CURL_CA_BUNDLE is empty)")
    if env.get("PYTHONHTTPSVERIFY") == "0":
        problems.append("TLS verification is off (PYTHONHTTPSVERIFY=0)")
    from authsvc.adapters.payers.registry import DEMO_DEV_SECRET

    for payer_id, config in getattr(services, "payers", {}).items():
        try:
            secret = config.secret()
        except Exception:  # noqa: BLE001 - any failure means "missing"
            problems.append(f"payer {payer_id}: callback secret missing")
            continue
        if not secret or secret == DEMO_DEV_SECRET:
            problems.append(f"payer {payer_id}: callback secret missing (development default)")
    problems.extend(settings.secret_problems())
    if not settings.public_url.startswith("https://"):
        problems.append("AUTHSVC_PUBLIC_URL is not https")
    if env.get("AUTHSVC_RATE_LIMITS", "on") == "off":
        problems.append("rate limits are off (AUTHSVC_RATE_LIMITS=off)")
    if settings.redis_url is None:
        problems.append("AUTHSVC_REDIS_URL is unset (embedded Redis is for development)")
    elif not _loopback_or_tls(settings.redis_url, ("rediss://",)):
        problems.append("Redis is neither on loopback nor reached over TLS (rediss://)")
    if settings.database_url.startswith("sqlite"):
        problems.append("AUTHSVC_DATABASE_URL is SQLite (development only)")
    elif not _loopback_or_tls(settings.database_url, ()) and "sslmode=verify-full" not in \
            settings.database_url and "sslmode=verify-ca" not in settings.database_url:
        problems.append("PostgreSQL is neither on loopback nor reached with sslmode=verify-*")
    return problems


def _loopback_or_tls(url: str, tls_schemes: tuple[str, ...]) -> bool:
    if url.startswith(tls_schemes) or url.startswith("unix:"):
        return True
    import urllib.parse

    try:
        host = urllib.parse.urlsplit(url).hostname or ""
    except ValueError:
        return False
    if not host:  # e.g. postgresql+psycopg:///db over the local socket
        return True
    return host in ("localhost", "::1") or host.startswith("127.")


# ------------------------------------------------------------------ rate limits


def _limit(scope: str) -> tuple[int, int]:
    """(window in seconds, requests allowed in it) for `scope`, as configured."""
    name, default = LIMIT_ENV[scope]
    return _parse_limit(current_app.config.get(name) or default)


@functools.lru_cache(maxsize=64)
def _parse_limit(text: str) -> tuple[int, int]:
    """Parsed once per notation: `limits.parse` is a regex walk on every request otherwise."""
    from limits import parse

    item = parse(text)
    return item.get_expiry(), item.amount  # type: ignore[attr-defined]


def _strategy() -> bool | None:
    """True when rate limits are on for this app (None: off)."""
    return current_app.extensions.get("authsvc_limiter")


def _limits(checks: list[tuple[str, str, str]], member: str = "") -> tuple[str, int] | None:
    """Apply `checks` ((scope, ident, mode) as in _LIMITS_LUA) in one Redis round trip: the
    scope refused and the seconds to wait, or None. Fails open when Redis is unavailable."""
    if _strategy() is None or not checks:
        return None
    script = current_app.extensions.get("authsvc_limits_script")
    if script is None:
        script = current_app.extensions["authsvc_limits_script"] = \
            current_app.extensions["authsvc_redis"].register_script(_LIMITS_LUA)
    spec: list[str] = []
    keys: list[str] = []
    for scope, ident, mode in checks:
        window, amount = _limit(scope)
        spec.append(f"{window} {amount} {mode}")
        # the limit is part of the key (as the `limits` library does): a window counts only
        # requests judged by the same limit, so changing a limit starts a fresh window
        keys.append(f"authsvc-rl:{scope}:{amount}/{window}:{ident}")
    try:
        index, wait = script(keys=keys, args=[" ".join(spec), uuid.uuid4().hex, member])
    except Exception as exc:  # noqa: BLE001 - Redis down: fail open, the DB is the record
        log.warning("rate limit storage unavailable: %s", type(exc).__name__)
        return None
    return (checks[int(index) - 1][0], int(wait)) if int(index) else None


def _refuse(scope: str, wait: int, org_id: str | None, token_id: str | None) -> ApiProblem:
    RATE_LIMITED.labels(scope).inc()
    g.deny_reason = f"rate_limited:{scope}"
    log.warning("rate limit exceeded", extra={"event": f"rate_limited:{scope}",
                                              "status": 429})
    _record_rate_limit(org_id, token_id)
    return ApiProblem(429, "Too many requests; retry after the time in Retry-After.",
                      headers={"Retry-After": str(wait)})


def _record_rate_limit(org_id: str | None, token_id: str | None) -> None:
    """Bookkeeping for alerts (`rate_limit_events`); never fails the request."""
    try:
        from authsvc.adapters.db import tables as t
        from authsvc.domain import clock

        route = request.url_rule.rule if request.url_rule else "unmatched"
        with current_app.extensions["authsvc"].engine.begin() as conn:
            conn.execute(t.rate_limit_events.insert().values(
                org_id=org_id, token_id=token_id, at=clock.now(), route=route[:200]))
    except Exception as exc:  # noqa: BLE001
        log.warning("could not record a rate-limit event: %s", type(exc).__name__)


def enforce_rate_limits(org_id: str, token_id: str) -> None:
    """One round trip for every limit of an authenticated request: failed authentications of
    its address (an address guessing tokens waits even with a valid one), per token, per
    token for writes, per organization, and on routes that name a member id, the token's
    distinct member ids (enumeration: also an alert). 429 + Retry-After on the first over."""
    if _strategy() is None:
        return
    checks = [("auth_failures", request.remote_addr or "unknown", "test"),
              ("token", token_id, "hit"), ("org", org_id, "hit")]
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        checks.append(("token_write", token_id, "hit"))
    member = ""
    if request.method == "POST" and request.url_rule is not None and \
            request.url_rule.rule in MEMBER_ID_FIELDS:
        member_id = _member_id_in_body(MEMBER_ID_FIELDS[request.url_rule.rule])
        if member_id is not None:
            member = member_pseudonym(member_id)
            checks.append(("member_ids", token_id, "distinct"))
    refused = _limits(checks, member)
    if refused is None:
        return
    scope, wait = refused
    if scope == "auth_failures":
        raise _refuse(scope, wait, None, None)
    if scope == "member_ids":
        _enumeration_alert(org_id, token_id)
    raise _refuse(scope, wait, org_id, token_id)


def _enumeration_alert(org_id: str, caller_id: str) -> None:
    window, amount = _limit("member_ids")
    SECURITY_ALERTS.labels("member_id_enumeration").inc()
    log.warning("ALERT possible member-id enumeration: caller %s of organization %s named "
                "more than %s distinct member ids in %s s", caller_id, org_id, amount, window,
                extra={"event": "alert:member_id_enumeration", "status": 429})


def _member_id_in_body(path: tuple[str, ...]) -> str | None:
    """The member id the body names, read as the route will read it; None when the body is
    not usable (the route answers 400/413/415/422 itself)."""
    from authsvc.api.jsonbody import parse_json_object
    from authsvc.api.request_body import JSON_LIMIT

    if request.mimetype != "application/json" or (request.content_length or 0) > JSON_LIMIT:
        return None
    try:
        value: object = parse_json_object(request.get_data(cache=True))
    except Exception:  # noqa: BLE001 - malformed input is the route's answer, not ours
        return None
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, str) and value else None


def member_pseudonym(member_id: str) -> str:
    """A keyed hash of a member id: what Redis holds instead of the id (no PHI in Redis)."""
    services = current_app.extensions["authsvc"]
    key = hmac.new(services.settings.provider_webhook_secret.encode(),
                   b"authsvc/rate-limit/member-id/v1", hashlib.sha256).digest()
    return hmac.new(key, member_id.strip().upper().encode(), hashlib.sha256).hexdigest()[:32]


def limit_member_ids(org_id: str, caller_id: str, member_ids: Iterable[str]) -> None:
    """Count the member ids one caller names (a token id, or e.g. a CDS Hooks client id for
    a route that authenticates its own way); 429 + Retry-After and the alert when the caller
    goes over AUTHSVC_RATE_LIMIT_MEMBER_IDS distinct ids per window. Fails open."""
    for member_id in member_ids:
        refused = _limits([("member_ids", caller_id, "distinct")], member_pseudonym(member_id))
        if refused is not None:
            _enumeration_alert(org_id, caller_id)
            raise _refuse("member_ids", refused[1], org_id, caller_id)


def check_auth_failures() -> None:
    """An address with too many failed authentications waits (S10): 429 instead of the 401
    (or the sign-in) it was about to get. Authenticated requests check this inside
    `enforce_rate_limits`, in the same round trip as their other limits."""
    refused = _limits([("auth_failures", request.remote_addr or "unknown", "test")])
    if refused is not None:
        raise _refuse("auth_failures", refused[1], None, None)


def note_auth_failure() -> None:
    """Count one failed authentication of this address (the after-request hook on a 401)."""
    _limits([("auth_failures", request.remote_addr or "unknown", "hit")])


# ------------------------------------------------------------------ audit of every request


def _entity(rule: str) -> tuple[str, str | None]:
    """(entity_type, action hint) from a route template like /v1/orders/<order_id>/cancel."""
    parts = [p for p in rule.split("/") if p]
    if parts and parts[0] == "v1":
        parts = parts[1:]
    kind = parts[0] if parts else "unknown"
    kind = {"orders": "order", "cases": "case", "outcomes": "outcome",
            "subscriptions": "subscription", "payer-callbacks": "payer_callback",
            "reports": "report", "coverage-requirements": "coverage_preview",
            "cds-services": "cds_hook"}.get(kind, kind.rstrip("s").replace("-", "_"))
    tail = parts[-1] if len(parts) > 1 and not parts[-1].startswith("<") else None
    return kind[:30], tail


def _action(method: str, tail: str | None, has_id: bool) -> str:
    if method in ("GET", "HEAD"):
        return "read" if has_id else "search"
    if tail and has_id:
        return tail.replace("-", "_")[:20]
    return "create" if method == "POST" else method.lower()


def _audit_request(resp: Response) -> None:
    path = request.path
    if not path.startswith(AUDITED_PREFIXES) or resp.status_code == 503:
        return
    from authsvc.adapters.db import audit

    status = resp.status_code
    request_id = g.get("request_id")
    if status < 400:
        if audit.last_request_id() == request_id or path.startswith("/v1/payer-callbacks/"):
            return  # the handler (or the service layer) audited it with more detail
        outcome, reason = "success", None
    else:
        outcome = DENIED.get(status, "error")
        reason = g.get("deny_reason") or DEFAULT_REASONS.get(status) or f"http_{status}"
    rule = request.url_rule.rule if request.url_rule else ""
    entity_type, tail = _entity(rule or path)
    entity_id = None
    for value in (request.view_args or {}).values():
        if isinstance(value, str) and ID_RE.fullmatch(value):
            entity_id = value  # only well-formed ids: a URL may carry anything
            break
    actor = g.get("actor")
    try:
        with current_app.extensions["authsvc"].engine.begin() as conn:
            audit.append(
                conn, org_id=getattr(actor, "org_id", None),
                token_id=getattr(actor, "token_id", None) or g.get("deny_token_id"),
                role=getattr(actor, "role", None) or (
                    "payer" if entity_type == "payer_callback" else None),
                action=_action(request.method, tail, bool(request.view_args)),
                entity_type=entity_type, entity_id=entity_id, patient_id=None,
                outcome=outcome, request_id=request_id, source_ip=request.remote_addr,
                reason=reason)
    except Exception as exc:  # noqa: BLE001 - never turn an answer into a 500
        log.error("audit write failed: %s", type(exc).__name__)


# ------------------------------------------------------------------ wiring


def init_app(app: Flask, settings: Settings, services: object) -> None:
    """Self-check (production), limiter on Redis, and the request hooks."""
    for name, (env_name, default) in LIMIT_ENV.items():
        if name == "member_ids":
            default = os.environ.get(LIMIT_ENV["token_write"][0]) or default
        app.config.setdefault(env_name, os.environ.get(env_name) or default)
    if settings.production:
        problems = production_problems(app, settings, services)
        if problems:
            raise UnsafeConfiguration(problems)
    _init_limiter(app)
    document_problems(app)

    @app.before_request
    def _security_begin() -> None:
        from authsvc.adapters.db import audit

        audit.forget_request()
        # PostgreSQL refuses NUL in text (a DataError, i.e. a 500, wherever a route passes a
        # path or query value to SQL): refuse it here once for every route.
        if "\x00" in request.path or any(
                "\x00" in k or "\x00" in v for k, v in request.args.items(multi=True)):
            raise ApiProblem(400, "NUL characters are not allowed in the URL.")

    @app.after_request
    def _security_finish(resp: Response) -> Response:
        for key, value in SECURITY_HEADERS.items():
            resp.headers.setdefault(key, value)
        if request.path.rstrip("/") == "/docs":
            resp.headers["Content-Security-Policy"] = DOCS_CSP
        resp.headers["Server"] = "authsvc"
        resp.headers.pop("X-Powered-By", None)
        if resp.status_code == 401 and request.path.startswith(AUDITED_PREFIXES):
            note_auth_failure()
        _audit_request(resp)
        return resp


PROBLEM_SCHEMA = {
    "type": "object", "required": ["type", "title", "status"],
    "properties": {
        "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
        "detail": {"type": "string"}, "request_id": {"type": "string"},
        "errors": {"type": "array", "items": {"type": "object", "properties": {
            "field": {"type": "string"}, "code": {"type": "string"},
            "message": {"type": "string"}}}},
    },
}
PROBLEM_STATUSES = {
    "400": "Malformed request (JSON, header, cursor)", "401": "No or bad credentials",
    "403": "This role may not use this endpoint", "404": "Not found, or another organization's",
    "405": "Method not allowed", "406": "Not acceptable",
    "409": "State conflict or request in flight", "413": "Body too large",
    "415": "Unsupported media type", "422": "Validation failed; see errors[]",
    "429": "Rate limited; see Retry-After",
    "500": "Unexpected error (a generic body, never details)",
    "503": "A dependency is down; see Retry-After",
}


def document_problems(app: Flask) -> None:
    """Add the problem+json answers every operation can give to the OpenAPI document (api.md
    › Errors), so the served contract matches what the hooks above actually answer."""
    ext = app.extensions.get("flask-smorest", {}).get("apis", {})
    for entry in ext.values():
        api = entry["ext_obj"]
        api.spec.components.schema("Problem", PROBLEM_SCHEMA)
        original = api.spec.to_dict

        def to_dict(original=original):  # type: ignore[no-untyped-def]
            doc = original()
            ref = {"$ref": "#/components/schemas/Problem"}
            for item in doc.get("paths", {}).values():
                for method, op in item.items():
                    if method not in ("get", "post", "put", "patch", "delete"):
                        continue
                    responses = op.setdefault("responses", {})
                    for status, text in PROBLEM_STATUSES.items():
                        entry = responses.setdefault(status, {"description": text})
                        content = entry.setdefault("content", {})
                        content.setdefault("application/problem+json", {"schema": ref})
                        if status in ("401",):
                            entry.setdefault("headers", {})["WWW-Authenticate"] = {
                                "schema": {"type": "string"}}
                        if status in ("429", "503"):
                            entry.setdefault("headers", {})["Retry-After"] = {
                                "schema": {"type": "string"}}
            return doc

        api.spec.to_dict = to_dict


def _init_limiter(app: Flask) -> None:
    """Rate limits on, unless switched off for a benchmark (refused in production)."""
    if os.environ.get("AUTHSVC_RATE_LIMITS", "on") == "off" and not app.config.get(
            "AUTHSVC_FORCE_RATE_LIMITS"):
        return
    app.extensions["authsvc_limiter"] = True
