"""The machine's ceiling for authsvc's intake: marshmallow validation + one PostgreSQL insert.

A minimal Flask app that does, per ``POST /orders``, the irreducible part of order intake and
nothing else: parse the JSON body, validate it with the project's real schema
(``schemas.orders.load_order``), insert one row (a generated id and the raw body as JSONB)
with one SQLAlchemy Core insert, commit, answer 201 with a small JSON body. No auth, no
idempotency record, no rules, no outbox.

Served by ``bench.intake`` exactly like the API (gunicorn, 2 sync workers)::

    AUTHSVC_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/DB \\
        .venv/bin/gunicorn -w 2 -k sync -b 127.0.0.1:PORT 'bench.ceiling_app:create_app()'

Without ``--preload`` gunicorn calls ``create_app()`` in each worker after the fork, so each
worker gets its own engine and connection pool.

``create_floor_app()`` (bench.intake's informational phase a2) adds what the issues require of
*any* intake request before it does an order's own work: the bearer token looked up by its
hash (one autocommit read), the rate limit (one Redis script call), the Idempotency-Key's
in-flight lock and stored-response lookup (one statement, with BEGIN pipelined by authsvc's
engine), the key's record (a second row), the rows queued and sent with the COMMIT in one
pipeline (`authsvc.adapters.db.batch`): the same three PostgreSQL round trips as authsvc.
Between the ceiling and this floor is the price of those rules; between the floor and
authsvc, the order's own work (rules, patient, lines, eligibility, timeline, notifications,
outbox, audit chain).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid

import sqlalchemy as sa
from flask import Flask, Response, request
from sqlalchemy.dialects.postgresql import JSONB

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
KNOWN_PAYERS = frozenset({"demo"})

metadata = sa.MetaData()
ceiling_orders = sa.Table(
    "bench_ceiling_orders", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("body", JSONB, nullable=False),
)
# The raw body text goes to PostgreSQL as is and is cast there: no re-serialization.
INSERT = ceiling_orders.insert().values(
    id=sa.bindparam("id"), body=sa.cast(sa.bindparam("body", type_=sa.Text), JSONB))


floor_keys = sa.Table(
    "bench_floor_keys", metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("response", sa.Text, nullable=False),
)
floor_tokens = sa.Table(
    "bench_floor_tokens", metadata,
    sa.Column("token_hash", sa.Text, primary_key=True),
    sa.Column("org_id", sa.Text, nullable=False),
)
FLOOR_TOKEN = "bench-floor-token"
FLOOR_TOKEN_LOOKUP = sa.select(floor_tokens.c.org_id).where(
    floor_tokens.c.token_hash == sa.bindparam("token_hash"))
FLOOR_CLAIM = sa.select(
    sa.func.pg_try_advisory_xact_lock(sa.func.hashtext(sa.bindparam("key"))).label("got"),
    sa.select(floor_keys.c.response).where(floor_keys.c.key == sa.bindparam("key"))
    .scalar_subquery().label("response"))
FLOOR_LIMIT_LUA = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], 60000) end
return n
"""


def ensure_table(engine: sa.Engine) -> None:
    """Create the tables once, even when several workers start at the same moment."""
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(7263541)"))
        metadata.create_all(conn, checkfirst=True)
        conn.execute(sa.text("INSERT INTO bench_floor_tokens VALUES (:h, 'bench') "
                             "ON CONFLICT DO NOTHING"), {"h": _hash(FLOOR_TOKEN)})


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_app(database_url: str | None = None) -> Flask:
    from schemas.common import ValidationProblem
    from schemas.orders import load_order

    url = database_url or os.environ.get("AUTHSVC_DATABASE_URL", DEFAULT_URL)
    engine = sa.create_engine(url, pool_size=2, max_overflow=2)
    ensure_table(engine)
    app = Flask("bench_ceiling")
    app.extensions["bench_engine"] = engine

    @app.post("/orders")
    def create_order() -> Response:
        raw = request.get_data(cache=False)
        try:
            data = json.loads(raw)
            load_order(data, KNOWN_PAYERS)
        except (ValueError, ValidationProblem) as exc:
            return Response(json.dumps({"error": type(exc).__name__}), status=422,
                            mimetype="application/json")
        order_id = "ord_" + uuid.uuid4().hex
        with engine.begin() as conn:
            conn.execute(INSERT, {"id": order_id, "body": raw.decode("utf-8")})
        return Response(json.dumps({"id": order_id, "status": "received"}), status=201,
                        mimetype="application/json")

    @app.get("/healthz")
    def healthz() -> Response:
        return Response('{"status": "ok"}', mimetype="application/json")

    return app


def create_floor_app(database_url: str | None = None) -> Flask:
    """The ceiling plus the per-request rules every intake must follow (module docstring)."""
    import redis

    from authsvc.adapters.db import batch
    from authsvc.adapters.db.engine import make_engine
    from schemas.common import ValidationProblem
    from schemas.orders import load_order

    url = database_url or os.environ.get("AUTHSVC_DATABASE_URL", DEFAULT_URL)
    engine = make_engine(url, pool_size=2)
    ensure_table(engine)
    limit = redis.Redis.from_url(os.environ.get("AUTHSVC_REDIS_URL", "redis://127.0.0.1:6379/0")
                                 ).register_script(FLOOR_LIMIT_LUA)
    app = Flask("bench_floor")

    def problem(status: int, title: str) -> Response:
        return Response(json.dumps({"title": title, "status": status}), status=status,
                        mimetype="application/problem+json")

    @app.post("/orders")
    def create_order() -> Response:
        header = request.headers.get("Authorization", "")
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            org = conn.execute(FLOOR_TOKEN_LOOKUP, {"token_hash": _hash(header[7:])}).scalar()
        if org is None:
            return problem(401, "The token is not valid.")
        limit(keys=[f"bench-floor:{org}"])
        key = request.headers.get("Idempotency-Key")
        if not key:
            return problem(400, "Idempotency-Key is required.")
        try:
            body = json.loads(request.get_data(cache=False))
            load_order(body, KNOWN_PAYERS)
        except (ValueError, ValidationProblem) as exc:
            return problem(422, type(exc).__name__)
        order_id = "ord_" + uuid.uuid4().hex
        text = json.dumps({"id": order_id, "status": "received"})
        with engine.begin() as conn:
            claim = conn.execute(FLOOR_CLAIM, {"key": f"{org}:{key}"}).one()
            if not claim.got:
                return problem(409, "In flight.")
            if claim.response is not None:
                return Response(claim.response, status=201, mimetype="application/json")
            # both rows leave with the COMMIT in one pipeline, as authsvc's rows do
            batch.add(conn, ceiling_orders, {"id": order_id, "body": body})
            batch.add(conn, floor_keys, {"key": f"{org}:{key}", "response": text})
        return Response(text, status=201, mimetype="application/json")

    @app.get("/healthz")
    def healthz() -> Response:
        return Response('{"status": "ok"}', mimetype="application/json")

    return app
