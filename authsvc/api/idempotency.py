"""Idempotency-Key semantics of api.md, in the same transaction as the work itself.

Scope is (organization, route template, key). Same key + same body → the stored response
again with `Idempotent-Replayed: true`; a different body → 422; a request still in flight
with the key → 409. On PostgreSQL a transaction-scoped advisory lock marks "in flight";
SQLite serializes writers, so a second request waits and then replays.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

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
#: A write sent with the key's claim on PostgreSQL (`run`'s `first_write`): given the claim's
#: guard (this request holds the key and no response is stored for it), an INSERT … RETURNING
#: one column that runs only when the guard holds.
FirstWrite = Callable[[sa.ColumnElement[bool]], sa.Insert]


@functools.cache
def _claim(first_write: FirstWrite | None = None) -> sa.Select:
    """PostgreSQL: the in-flight lock, the stored response's lookup and (optionally) the
    request's first write, one statement."""
    lock = sa.select(sa.func.pg_try_advisory_xact_lock(
        sa.bindparam("lock", type_=sa.BigInteger)).label("got")).cte("claim_lock")
    stored = sa.select(_IK.c.fingerprint, _IK.c.status_code, _IK.c.response_body).where(
        _IK.c.org_id == sa.bindparam("org_id"), _IK.c.route == sa.bindparam("route"),
        _IK.c.key == sa.bindparam("key")).cte("claim_stored")
    columns: list[Any] = [lock.c.got, stored.c.fingerprint, stored.c.status_code,
                          stored.c.response_body]
    if first_write is not None:
        guard = sa.and_(sa.select(lock.c.got).scalar_subquery(), ~sa.exists(
            sa.select(stored.c.status_code).where(stored.c.status_code.is_not(None))))
        written = first_write(guard).cte("claim_write")
        columns.append(sa.select(*written.c).scalar_subquery().label("written"))
    return sa.select(*columns).select_from(lock.outerjoin(stored, sa.true()))


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


def run(work: Callable[..., tuple[int, dict]], *, required: bool, raw_body: object,
        location: str | None = None,
        first_write: tuple[FirstWrite, dict] | None = None) -> Response:
    """Run `work(conn)` in one transaction, honouring the request's Idempotency-Key.

    `location` (e.g. "/v1/orders/{id}") makes a 201, replayed or not, carry Location.
    `first_write` (a `FirstWrite` and its parameters): on PostgreSQL, with a key, the write
    goes in the key's claim statement (a round trip saved) and `work(conn, written)` gets
    its RETURNING value; otherwise `work(conn, None)` does the write itself."""
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
                    existing = conn.execute(
                        _claim(first_write[0] if first_write else None),
                        {**scope, "lock": _lock_key(actor.org_id, route, key),
                         **(first_write[1] if first_write else {})}).one()
                    if not existing.got:
                        raise ApiProblem(409, "A request with this Idempotency-Key is in "
                                         "flight.", headers={"Retry-After": "1"})
                    if existing.status_code is not None:
                        return _replay(existing, fp, location)
                else:
                    existing = conn.execute(_LOOKUP, scope).first()
                    if existing is not None:
                        return _replay(existing, fp, location)
            if first_write is None:
                status, body = work(conn)
            else:
                written = existing.written if key is not None and \
                    conn.dialect.name == "postgresql" else None
                status, body = work(conn, written)
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
