"""Bearer tokens per organization and role; the route × role table lives here, once."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import secrets
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from flask import current_app, g, request

from authsvc.adapters.db import repo
from authsvc.adapters.db import tables as t
from authsvc.api.errors import ApiProblem
from authsvc.domain import clock, ids
from authsvc.service_layer.context import Actor

ROLES = ("clinician", "coordinator", "billing", "admin")
TOKEN_PREFIX = "asv_"  # noqa: S105 - a public prefix, not a secret


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def create_token(conn: sa.Connection, org_id: str, role: str, name: str | None = None,
                 expires_on: dt.date | None = None) -> tuple[str, str]:
    """A random 256-bit token, stored only as its hash. Returns (token_id, token)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    now = clock.now()
    repo.ensure_organization(conn, org_id, now)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token_id = ids.new_id("tok")
    conn.execute(t.api_tokens.insert().values(
        id=token_id, org_id=org_id, role=role, name=name, token_hash=hash_token(token),
        prefix=token[:10], created_at=now, expires_on=expires_on))
    return token_id, token


def _unauthorized(detail: str) -> ApiProblem:
    return ApiProblem(401, detail, headers={"WWW-Authenticate": 'Bearer realm="authsvc"'})


def _deny(reason: str, detail: str, token_id: str | None = None) -> ApiProblem:
    """A 401 whose reason the audit hook records (never the token itself)."""
    g.deny_reason = reason
    g.deny_token_id = token_id
    return _unauthorized(detail)


def authenticate() -> Actor:
    """The caller's token → Actor, or 401. An address over its failed-authentication limit
    gets 429 instead (checked here for a refused token; for a valid one, with the other rate
    limits in `security.enforce_rate_limits`, one Redis round trip per request)."""
    from authsvc.api import security

    try:
        return _token_actor_from_header()
    except ApiProblem as exc:
        if exc.status == 401:
            security.check_auth_failures()
        raise


def _token_actor_from_header() -> Actor:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        if "access_token" in request.args or "token" in request.args:
            raise _deny("token_in_query", "Send the token in the Authorization header only.")
        raise _deny("no_token", "Send a bearer token in the Authorization header.")
    token = header[7:].strip()
    if not token or len(token) > 200 or not token.isascii():
        raise _deny("malformed_token", "The token is not valid.")
    digest = hash_token(token)
    services = current_app.extensions["authsvc"]
    now = clock.now()
    # Autocommit: one round trip, no BEGIN/ROLLBACK around a single read.
    with services.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        row = repo.token_by_hash(conn, digest)
    if row is None or not hmac.compare_digest(row["token_hash"], digest):
        raise _deny("unknown_token", "The token is not valid.")
    if row["revoked_at"] is not None:
        raise _deny("revoked_token", "The token was revoked.", row["id"])
    if row["expires_on"] is not None and now.date() > row["expires_on"]:
        raise _deny("expired_token", "The token has expired.", row["id"])
    # on PostgreSQL the lookup brought the organization's webhook subscriptions (see
    # `repo.token_by_hash`): order intake uses them instead of reading them again
    g.org_subscriptions = row.get("webhook_subscriptions")
    last = row["last_used_at"]
    if last is None or now - last > dt.timedelta(seconds=60):
        with services.engine.begin() as conn:
            conn.execute(t.api_tokens.update().where(t.api_tokens.c.id == row["id"])
                         .values(last_used_at=now))
    return Actor(org_id=row["org_id"], role=row["role"], token_id=row["id"], name=row["name"],
                 request_id=g.get("request_id"), source_ip=request.remote_addr)


def requires(*roles: str) -> Callable:
    """Authenticate, then allow only these roles (403 otherwise). Sets `g.actor`."""

    def decorate(view: Callable) -> Callable:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from authsvc.api import security

            actor = authenticate()
            g.actor = actor
            security.enforce_rate_limits(actor.org_id, actor.token_id or "")
            if actor.role not in roles:
                raise ApiProblem(403, "This role may not use this endpoint.")
            return view(*args, **kwargs)

        wrapper._roles = roles  # type: ignore[attr-defined]
        return wrapper

    return decorate


def token_actor(*, token: str | None = None, token_id: str | None = None,
                request_id: str | None = None,
                source_ip: str | None = None) -> tuple[Actor | None, str | None]:
    """The actor of a token (by its secret) or of a token id, checked exactly like
    `authenticate` checks a bearer token: unknown, revoked and expired tokens give
    `(None, reason)` with the reason `authenticate` would audit. For callers that do not
    read an Authorization header (the dashboard's sign-in and its per-request re-check)."""
    services = current_app.extensions["authsvc"]
    now = clock.now()
    with services.engine.connect() as conn:
        if token is not None:
            if not token or len(token) > 200 or not token.isascii():
                return None, "malformed_token"
            digest = hash_token(token)
            row = repo.token_by_hash(conn, digest)
            if row is not None and not hmac.compare_digest(row["token_hash"], digest):
                row = None
        elif token_id is not None:
            row = conn.execute(sa.select(t.api_tokens).where(
                t.api_tokens.c.id == token_id)).mappings().first()
        else:
            return None, "no_token"
    if row is None:
        return None, "unknown_token"
    if row["revoked_at"] is not None:
        return None, "revoked_token"
    if row["expires_on"] is not None and now.date() > row["expires_on"]:
        return None, "expired_token"
    return Actor(org_id=row["org_id"], role=row["role"], token_id=row["id"], name=row["name"],
                 request_id=request_id, source_ip=source_ip), None
