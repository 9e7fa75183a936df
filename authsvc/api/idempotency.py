"""Idempotency-Key semantics of api.md, in the same transaction as the work itself.

Scope is (organization, route template, key). Same key + same body → the stored response
again with `Idempotent-Replayed: true`; a different body → 422; a request still in flight
with the key → 409. On PostgreSQL a transaction-scoped advisory lock marks "in flight";
SQLite serializes writers, so a second request waits and then replays.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable

import sqlalchemy as sa
from flask import Response, current_app, g, request

from authsvc.adapters.db import batch
from authsvc.adapters.db import tables as t
from authsvc.api.errors import ApiProblem
from authsvc.domain import clock
from authsvc.service_layer import failpoints

KEY_RE = re.compile(r"[\x21-\x7E]{1,255}")
_IK = t.idempotency_keys
# Built once: a statement object per call costs SQLAlchemy a fresh cache key every request.
_LOOKUP = sa.select(_IK.c.fingerprint, _IK.c.status_code, _IK.c.response_body).where(
    _IK.c.org_id == sa.bindparam("org_id"), _IK.c.route == sa.bindparam("route"),
    _IK.c.key == sa.bindparam("key"))
_LOCK_AND_LOOKUP = sa.select(
    sa.func.pg_try_advisory_xact_lock(sa.bindparam("lock", type_=sa.BigInteger)).label("got"),
    _IK.c.fingerprint, _IK.c.status_code, _IK.c.response_body,
).select_from(sa.select(sa.literal(1).label("one")).subquery("one").outerjoin(_IK, sa.and_(
    _IK.c.org_id == sa.bindparam("org_id"), _IK.c.route == sa.bindparam("route"),
    _IK.c.key == sa.bindparam("key"))))


def fingerprint(body: object) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _lock_key(org_id: str, route: str, key: str) -> int:
    digest = hashlib.blake2b(f"{org_id}\0{route}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _json_response(status: int, body_text: str, replayed: bool = False) -> Response:
    resp = Response(body_text, status=status, mimetype="application/json")
    if replayed:
        resp.headers["Idempotent-Replayed"] = "true"
    return resp


def _located(resp: Response, location: str | None, new_id: object) -> Response:
    """A 201's Location header: `location` with the created resource's id."""
    if location and resp.status_code == 201 and isinstance(new_id, str) and new_id:
        resp.headers["Location"] = location.format(id=new_id)
    return resp


def _replay(existing: sa.Row, fp: str, location: str | None) -> Response:
    """The stored response again, or 422 when the key came with another body."""
    if existing.fingerprint != fp:
        raise ApiProblem(422, "This Idempotency-Key was used with a different body.",
                         errors=[{"field": "Idempotency-Key", "code": "invalid_choice",
                                  "message": "key reused with another body"}])
    replay = _json_response(existing.status_code, existing.response_body, True)
    stored_id = json.loads(existing.response_body).get("id") if location else None
    return _located(replay, location, stored_id)


def run(work: Callable[[sa.Connection], tuple[int, dict]], *, required: bool,
        raw_body: object, location: str | None = None) -> Response:
    """Run `work(conn)` in one transaction, honouring the request's Idempotency-Key.

    `location` (e.g. "/v1/orders/{id}") makes a 201, replayed or not, carry Location."""
    services = current_app.extensions["authsvc"]
    actor = g.actor
    key = request.headers.get("Idempotency-Key")
    if key is None and required:
        raise ApiProblem(400, "This endpoint requires an Idempotency-Key header.")
    if key is not None and not KEY_RE.fullmatch(key):
        raise ApiProblem(400, "Idempotency-Key must be 1-255 visible ASCII characters.")
    route = request.url_rule.rule if request.url_rule else request.path
    scope = {"org_id": actor.org_id, "route": route, "key": key}
    fp = fingerprint(raw_body) if key is not None else ""
    try:
        with services.engine.begin() as conn:
            if key is not None:
                if conn.dialect.name == "postgresql":
                    # The in-flight lock and the lookup in one round trip. The lookup's snapshot
                    # can predate the commit of a request that held the lock a moment ago: then
                    # our record collides with its row at commit (handled below).
                    existing = conn.execute(_LOCK_AND_LOOKUP, {
                        **scope, "lock": _lock_key(actor.org_id, route, key)}).one()
                    if not existing.got:
                        raise ApiProblem(409, "A request with this Idempotency-Key is in "
                                         "flight.", headers={"Retry-After": "1"})
                    if existing.status_code is not None:
                        return _replay(existing, fp, location)
                else:
                    existing = conn.execute(_LOOKUP, scope).first()
                    if existing is not None:
                        return _replay(existing, fp, location)
            status, body = work(conn)
            text = json.dumps(body)
            if key is not None:
                batch.add(conn, _IK, {
                    **scope, "fingerprint": fp, "status_code": status, "response_body": text,
                    "created_at": clock.now()})
    except sa.exc.IntegrityError:
        if key is None:
            raise
        with services.engine.connect() as conn:
            existing = conn.execute(_LOOKUP, scope).first()
        if existing is None:
            raise
        return _replay(existing, fp, location)  # the other request's work stands, not ours
    failpoints.hit("API_AFTER_COMMIT")
    return _located(_json_response(status, text), location, body.get("id"))
