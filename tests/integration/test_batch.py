"""Queued inserts (`adapters/db/batch.py`): a transaction's new rows leave in one statement,
yet the transaction behaves exactly as if they had been inserted one by one.

Runs on the suite's database (PostgreSQL in CI: the CTE and pipeline path) and on a SQLite
file (the embedded default's executemany path), so both backends keep the same semantics.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets

import pytest
import sqlalchemy as sa
from flask import g

from authsvc.adapters.db import audit, batch
from authsvc.adapters.db import tables as t
from authsvc.adapters.db.tables import JSONType, UTCDateTime
from authsvc.service_layer.context import Actor

AT = dt.datetime(2026, 11, 27, 9, 30, 15, 123456, tzinfo=dt.UTC)


def _tables() -> tuple[sa.MetaData, sa.Table, sa.Table]:
    md = sa.MetaData()
    suffix = secrets.token_hex(3)
    parent = sa.Table(f"bt_parent_{suffix}", md,
                      sa.Column("id", sa.String(20), primary_key=True),
                      sa.Column("at", UTCDateTime, nullable=False),
                      sa.Column("day", sa.Date),
                      sa.Column("doc", JSONType),
                      sa.Column("n", sa.Integer, nullable=False, server_default="7"),
                      sa.Column("note", sa.Text))
    child = sa.Table(f"bt_child_{suffix}", md,
                     sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                     sa.Column("parent_id", sa.String(20), sa.ForeignKey(parent.c.id),
                               nullable=False),
                     sa.Column("label", sa.String(10), nullable=False))
    return md, parent, child


@pytest.fixture(params=["suite", "sqlite"])
def db(request, services, tmp_path):
    """(engine, parent table, child table) on the suite's database and on SQLite."""
    if request.param == "suite":
        engine = services.engine
    else:
        engine = sa.create_engine(f"sqlite:///{tmp_path / 'batch.db'}")
    md, parent, child = _tables()
    md.create_all(engine)
    yield engine, parent, child
    md.drop_all(engine)
    if request.param == "sqlite":
        engine.dispose()


def _count(conn: sa.Connection, table: sa.Table) -> int:
    return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


def test_rows_come_back_with_their_types_and_defaults(db):
    engine, parent, child = db
    with engine.begin() as conn:
        batch.add(conn, parent, [
            {"id": "p1", "at": AT, "day": dt.date(2026, 12, 1),
             "doc": {"codes": ["72148"], "nested": {"ok": True, "n": 1.5}}, "note": "é ' \""},
            {"id": "p2", "at": AT.replace(tzinfo=None), "day": None, "doc": None, "note": None},
        ])
        batch.add(conn, parent, {"id": "p3", "at": AT})  # fewer keys: server default for n
        batch.add(conn, child, [{"parent_id": "p1", "label": "a"},
                                {"parent_id": "p1", "label": "b"}])
        assert batch.pending(conn) == 5
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(sa.select(parent))}
        labels = conn.execute(sa.select(child.c.label).order_by(child.c.id)).scalars().all()
    assert rows["p1"].at == AT and rows["p1"].day == dt.date(2026, 12, 1)
    assert rows["p1"].doc == {"codes": ["72148"], "nested": {"ok": True, "n": 1.5}}
    assert rows["p1"].note == "é ' \""
    assert rows["p2"].at == AT and rows["p2"].day is None and rows["p2"].doc is None
    assert rows["p3"].n == 7 and rows["p3"].note is None
    assert labels == ["a", "b"]


def test_a_read_in_the_transaction_sees_queued_rows(db):
    engine, parent, _child = db
    with engine.begin() as conn:
        batch.add(conn, parent, {"id": "seen", "at": AT})
        assert _count(conn, parent) == 1
        assert batch.pending(conn) == 0


def test_rollback_drops_queued_rows(db):
    engine, parent, _child = db
    with pytest.raises(RuntimeError), engine.begin() as conn:
        batch.add(conn, parent, {"id": "gone", "at": AT})
        raise RuntimeError("the use case failed")
    with engine.begin() as conn:  # the next transaction on the same pooled connection
        batch.add(conn, parent, {"id": "kept", "at": AT})
    with engine.connect() as conn:
        assert conn.execute(sa.select(parent.c.id)).scalars().all() == ["kept"]


def test_a_rolled_back_savepoint_takes_only_its_own_rows(db):
    engine, parent, _child = db
    with engine.begin() as conn:
        batch.add(conn, parent, {"id": "before", "at": AT})
        savepoint = conn.begin_nested()
        batch.add(conn, parent, {"id": "inside", "at": AT})
        savepoint.rollback()
        batch.add(conn, parent, {"id": "after", "at": AT})
    with engine.connect() as conn:
        ids = set(conn.execute(sa.select(parent.c.id)).scalars())
    assert ids == {"before", "after"}


def test_a_conflict_fails_the_commit_and_writes_nothing(db):
    engine, parent, child = db
    with engine.begin() as conn:
        batch.add(conn, parent, {"id": "dup", "at": AT})
    audited = _audit_count(engine)
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        batch.add(conn, parent, {"id": "fresh", "at": AT})
        batch.add(conn, child, {"parent_id": "fresh", "label": "x"})
        batch.add(conn, parent, {"id": "dup", "at": AT})
        audit.append(conn, at=AT, org_id="org-a", role="system", action="create",
                     entity_type="order", entity_id="dup", outcome="success")
    with engine.connect() as conn:
        assert set(conn.execute(sa.select(parent.c.id)).scalars()) == {"dup"}
        assert _count(conn, child) == 0
    assert _audit_count(engine) == audited
    with engine.begin() as conn:  # the pooled connection is usable again
        batch.add(conn, parent, {"id": "again", "at": AT})
    assert _audit_count(engine) == audited


def _audit_count(engine: sa.Engine) -> int | None:
    if not sa.inspect(engine).has_table("audit_events"):
        return None  # the bare SQLite file has no audit table
    with engine.connect() as conn:
        return _count(conn, t.audit_events)


def test_an_unknown_column_is_refused_when_queued(db):
    engine, parent, _child = db
    with engine.begin() as conn, pytest.raises(KeyError, match="colour"):
        batch.add(conn, parent, {"id": "x", "at": AT, "colour": "red"})


def test_postgresql_sends_the_rows_in_one_statement_and_commits_in_one_round_trip(services):
    engine = services.engine
    if engine.dialect.name != "postgresql":
        pytest.skip("the single-statement flush and the pipelined commit are PostgreSQL's; "
                    "the SQLite path is covered by the tests above")
    md, parent, child = _tables()
    md.create_all(engine)
    sent: list[str] = []

    def log(_conn, _cursor, statement, *_args):  # type: ignore[no-untyped-def]
        sent.append(statement.split(None, 1)[0].upper())

    sa.event.listen(engine, "before_cursor_execute", log)
    try:
        with engine.begin() as conn:
            batch.add(conn, parent, [{"id": f"p{i}", "at": AT} for i in range(3)])
            batch.add(conn, child, [{"parent_id": "p0", "label": str(i)} for i in range(5)])
            audit.append(conn, at=AT, org_id="org-a", role="system", action="create",
                         entity_type="order", entity_id="p0", outcome="success")
            sent.clear()
        # the queued rows: one statement; then the chain lock and the audit row; COMMIT goes
        # through the driver in the same pipeline (SQLAlchemy's own COMMIT then sends nothing)
        assert sent == ["WITH", "SELECT", "INSERT"]
        with engine.connect() as conn:  # committed: another connection sees every row
            assert _count(conn, parent) == 3 and _count(conn, child) == 5
            assert conn.execute(sa.select(sa.func.count()).select_from(t.audit_events).where(
                t.audit_events.c.entity_id == "p0")).scalar_one() == 1
    finally:
        sa.event.remove(engine, "before_cursor_execute", log)
        md.drop_all(engine)


def test_a_key_committed_by_another_request_after_our_lookup_is_replayed(app, services):
    """PostgreSQL: our lock-and-lookup statement can run on a snapshot taken just before a
    request that held the key committed; its row then collides with ours at commit. The
    answer is the other request's stored response, replayed, and our work is rolled back."""
    from authsvc.api import idempotency

    if services.engine.dialect.name != "postgresql":
        pytest.skip("SQLite serializes writers: the collision cannot happen there")
    key = f"race-{secrets.token_hex(4)}"
    body = {"probe": key}

    def work(conn):  # type: ignore[no-untyped-def]
        with services.engine.begin() as other:  # the other request commits meanwhile
            other.execute(t.idempotency_keys.insert(), {
                "org_id": "org-a", "route": "/v1/orders", "key": key,
                "fingerprint": idempotency.fingerprint(body), "status_code": 201,
                "response_body": json.dumps({"id": "ord_theirs"}), "created_at": AT})
        batch.add(conn, t.organizations, {"id": f"org-{key}", "name": "must not stay",
                                          "created_at": AT})
        return 201, {"id": "ord_ours"}

    with app.test_request_context("/v1/orders", method="POST",
                                  headers={"Idempotency-Key": key}):
        g.actor = Actor(org_id="org-a", role="clinician")
        resp = idempotency.run(work, required=True, raw_body=body, location="/v1/orders/{id}")
    assert resp.status_code == 201
    assert resp.headers["Idempotent-Replayed"] == "true"
    assert json.loads(resp.get_data()) == {"id": "ord_theirs"}
    assert resp.headers["Location"] == "/v1/orders/ord_theirs"
    with services.engine.connect() as conn:
        assert conn.execute(sa.select(t.organizations.c.id).where(
            t.organizations.c.id == f"org-{key}")).first() is None
