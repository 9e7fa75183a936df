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
"""

from __future__ import annotations

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


def ensure_table(engine: sa.Engine) -> None:
    """Create the table once, even when several workers start at the same moment."""
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(7263541)"))
        metadata.create_all(conn, checkfirst=True)


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
