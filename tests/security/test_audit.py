"""S9 and I8: one audit row per PHI call (denials included), a hash chain that `authsvc audit
verify` checks, and an application role that cannot UPDATE or DELETE audit rows."""

from __future__ import annotations

import datetime as dt
import secrets
import tempfile
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from authsvc.adapters.db import audit
from authsvc.adapters.db import tables as t
from tests.conftest import auth, order_body
from tests.security.conftest import audit_rows, fresh_addr

pytestmark = pytest.mark.integration


@pytest.fixture()
def scratch_db(database_url):
    """A database of its own, migrated to head: this test corrupts it on purpose."""
    from authsvc.adapters.db.engine import make_engine, upgrade

    if database_url.startswith("postgresql"):
        name = f"authsvc_audit_{secrets.token_hex(4)}"
        admin = sa.create_engine(database_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        url = database_url.rsplit("/", 1)[0] + "/" + name
    else:
        url = f"sqlite:///{Path(tempfile.mkdtemp(prefix='authsvc-audit-')) / 'a.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield url, engine
    engine.dispose()
    if database_url.startswith("postgresql"):
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _append(engine, n: int) -> list[int]:
    for i in range(n):
        with engine.begin() as conn:
            audit.append(
                conn, at=dt.datetime.now(dt.UTC), org_id="org-x", token_id=f"tok_{i}",
                role="clinician", action="read", entity_type="order", entity_id=f"ord_{i:04d}",
                patient_id="pat_1", outcome="success", request_id=f"r{i}",
                source_ip="127.0.0.1")
    with engine.connect() as conn:
        return list(conn.execute(sa.select(t.audit_events.c.id).where(
            t.audit_events.c.org_id == "org-x").order_by(t.audit_events.c.id)).scalars())


def _corrupt(engine, row_id: int) -> None:
    """As the superuser / schema owner: PostgreSQL allows it; SQLite needs its guard off."""
    with engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("DROP TRIGGER audit_events_no_update")
        conn.execute(t.audit_events.update().where(t.audit_events.c.id == row_id)
                     .values(outcome="denied"))


def test_S9_verifier_flags_the_corrupted_row_and_every_row_after_it(scratch_db, capsys):
    from authsvc import cli

    url, engine = scratch_db
    ids = _append(engine, 12)
    with engine.connect() as conn:
        assert audit.verify(conn).ok
    assert cli.main(["audit", "verify", "--database-url", url]) == 0
    assert "12 rows" in capsys.readouterr().out
    _corrupt(engine, ids[4])
    with engine.connect() as conn:
        verdict = audit.verify(conn)
    assert verdict.first_bad == ids[4] and verdict.bad_ids == tuple(ids[4:])
    assert cli.main(["audit", "verify", "--database-url", url, "--list"]) == 1
    out = capsys.readouterr().out
    assert f"row {ids[4]}" in out and " ".join(map(str, ids[4:])) in out


def test_S9_audit_rows_are_written_at_commit_and_dropped_on_rollback(scratch_db):
    _, engine = scratch_db
    with engine.connect() as conn:
        with conn.begin():
            audit.append(conn, org_id="org-x", action="read", entity_type="order",
                         outcome="success", reason="kept")
            conn.execute(t.organizations.insert().values(
                id="org-x", name="x", created_at=dt.datetime.now(dt.UTC)))  # work after it
        tx = conn.begin()
        audit.append(conn, org_id="org-x", action="read", entity_type="order",
                     outcome="success", reason="dropped")
        tx.rollback()
        with conn.begin():
            pass  # a later transaction on the same connection writes nothing stale
        reasons = list(conn.execute(sa.select(t.audit_events.c.reason)).scalars())
        assert reasons == ["kept"]
        assert audit.verify(conn).ok


def test_S9_a_deleted_or_inserted_row_breaks_the_chain(scratch_db):
    url, engine = scratch_db
    ids = _append(engine, 6)
    with engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("DROP TRIGGER audit_events_no_delete")
        conn.execute(t.audit_events.delete().where(t.audit_events.c.id == ids[2]))
    with engine.connect() as conn:
        assert audit.verify(conn).first_bad == ids[3]


def test_S9_app_role_cannot_update_or_delete_audit_rows(services):
    """PostgreSQL: the `authsvc_app` role of migration 0003 has INSERT/SELECT only on
    audit_events. SQLite has no roles; its documented alternative is a pair of triggers
    that abort any UPDATE or DELETE (docs/operations.md)."""
    with services.engine.begin() as conn:
        audit.append(conn, org_id="org-a", action="read", entity_type="order",
                     outcome="success")
    if services.engine.dialect.name == "postgresql":
        from sqlalchemy.exc import ProgrammingError

        for stmt in ("UPDATE audit_events SET outcome = 'x'", "DELETE FROM audit_events",
                     "TRUNCATE audit_events"):
            with services.engine.connect() as conn, conn.begin() as tx:
                conn.exec_driver_sql("SET LOCAL ROLE authsvc_app")
                with pytest.raises(ProgrammingError, match="permission denied"):
                    conn.exec_driver_sql(stmt)
                tx.rollback()
        with services.engine.connect() as conn, conn.begin() as tx:
            conn.exec_driver_sql("SET LOCAL ROLE authsvc_app")
            conn.execute(t.orders.update().where(t.orders.c.id == "none").values(notes=None))
            audit.append(conn, org_id="org-a", action="read", entity_type="order",
                         outcome="success", reason="as_app_role")
            tx.commit()  # the chained INSERT (and its SELECT of the head) run as the app role
        with services.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(t.audit_events).where(
                t.audit_events.c.reason == "as_app_role")).scalar() >= 1
    else:
        from sqlalchemy.exc import DBAPIError

        for stmt in ("UPDATE audit_events SET outcome = 'x'", "DELETE FROM audit_events"):
            with services.engine.connect() as conn, conn.begin():
                with pytest.raises(DBAPIError, match="append-only"):
                    conn.exec_driver_sql(stmt)


def test_S9_scripted_session_audits_every_phi_call_and_the_chain_holds(
        app, tokens, services):
    client = app.test_client()
    clin, b_clin = tokens["org-a"]["clinician"], tokens["org-b"]["clinician"]
    calls: list[tuple[str, int, str, str]] = []  # request id, status, action, org
    order_ids = []
    for i in range(10):
        rid = uuid.uuid4().hex
        body = order_body()
        body["patient"]["mrn"] = f"MRN-AUD-{i}"
        resp = client.post("/v1/orders", json=body, headers=auth(
            clin, **{"Idempotency-Key": uuid.uuid4().hex, "X-Request-Id": rid}))
        assert resp.status_code == 201
        order_ids.append(resp.get_json()["id"])
        calls.append((rid, 201, "create", "org-a"))
    for i in range(36):
        rid = uuid.uuid4().hex
        resp = client.get(f"/v1/orders/{order_ids[i % 10]}",
                          headers=auth(clin, **{"X-Request-Id": rid}))
        assert resp.status_code == 200
        calls.append((rid, 200, "read", "org-a"))
    for _ in range(2):
        rid = uuid.uuid4().hex
        assert client.get("/v1/orders", headers=auth(
            clin, **{"X-Request-Id": rid})).status_code == 200
        calls.append((rid, 200, "search", "org-a"))
    rid = uuid.uuid4().hex
    assert client.post(f"/v1/orders/{order_ids[0]}/cancel", headers=auth(
        clin, **{"X-Request-Id": rid})).status_code == 200
    calls.append((rid, 200, "cancel", "org-a"))
    rid = uuid.uuid4().hex
    assert client.get(f"/v1/orders/{order_ids[1]}", headers=auth(
        b_clin, **{"X-Request-Id": rid})).status_code == 404
    calls.append((rid, 404, "read", "org-b"))
    rid = uuid.uuid4().hex
    assert client.get("/v1/outcomes", headers=auth(
        clin, **{"X-Request-Id": rid})).status_code == 403
    calls.append((rid, 403, "search", "org-a"))
    rid = uuid.uuid4().hex
    assert client.get(f"/v1/orders/{order_ids[2]}", headers={"X-Request-Id": rid},
                      environ_base={"REMOTE_ADDR": fresh_addr()}).status_code == 401
    calls.append((rid, 401, "read", ""))
    assert len(calls) >= 50
    with services.engine.connect() as conn:
        patients = dict(conn.execute(sa.select(t.orders.c.id, t.orders.c.patient_id).where(
            t.orders.c.id.in_(order_ids))).all())
    want_outcome = {2: "success", 4: "denied"}
    for rid, status, action, org in calls:
        rows = audit_rows(services, rid)
        assert rows, f"no audit row for {action} ({status})"
        row = rows[0]
        assert row["outcome"] == want_outcome[status // 100], (action, status, row)
        assert row["action"] == action, (action, row)
        assert (row["org_id"] or "") == org
        if status < 400:
            assert row["token_id"] and row["role"] == "clinician" and row["source_ip"]
        if action in ("create", "read", "cancel") and status < 400:
            assert row["patient_id"] in patients.values()
            assert row["entity_id"] in order_ids
    with services.engine.connect() as conn:
        assert audit.verify(conn).ok


def test_audit_rows_hold_identifiers_only(services, app, tokens):
    client = app.test_client()
    body = order_body()
    body["patient"].update(given_name="ZZCANARY", family_name="Testperson",
                           birth_date="1901-02-03", mrn="MRN-CANARY-AUD")
    rid = uuid.uuid4().hex
    resp = client.post("/v1/orders", json=body, headers=auth(
        tokens["org-a"]["clinician"], **{"Idempotency-Key": uuid.uuid4().hex,
                                         "X-Request-Id": rid}))
    assert resp.status_code == 201
    text = repr(audit_rows(services, rid))
    for canary in ("ZZCANARY", "Testperson", "1901-02-03", "MRN-CANARY-AUD"):
        assert canary not in text


def test_get_audit_answers_who_looked_at_a_patient(app, tokens):
    client = app.test_client()
    clin, admin = tokens["org-a"]["clinician"], tokens["org-a"]["admin"]
    mrn = f"MRN-WHO-{uuid.uuid4().hex[:6]}"
    body = order_body()
    body["patient"]["mrn"] = mrn
    order = client.post("/v1/orders", json=body, headers=auth(
        clin, **{"Idempotency-Key": uuid.uuid4().hex})).get_json()
    client.get(f"/v1/orders/{order['id']}", headers=auth(clin))
    today = dt.datetime.now(dt.UTC).date().isoformat()
    resp = client.get(f"/v1/audit?patient_mrn={mrn}&from={today}&to={today}",
                      headers=auth(admin))
    assert resp.status_code == 200
    items = resp.get_json()["items"]
    assert [i["action"] for i in items] == ["create", "read"]
    assert {i["entity_id"] for i in items} == {order["id"]}
    assert all(i["role"] == "clinician" and i["outcome"] == "success" for i in items)
    # another organization's admin sees nothing of it
    other = client.get(f"/v1/audit?patient_mrn={mrn}", headers=auth(tokens["org-b"]["admin"]))
    assert other.status_code == 200 and other.get_json()["items"] == []
    # paging and bad parameters
    page = client.get("/v1/audit?limit=1", headers=auth(admin)).get_json()
    assert len(page["items"]) == 1 and page["next_cursor"]
    for bad in ("from=yesterday", "to=2026-13-01", "from=2026-01-02T00:00:00",
                "limit=0", "from=2026-02-01&to=2026-01-01"):
        r = client.get(f"/v1/audit?{bad}", headers=auth(admin))
        assert r.status_code == 422, bad
    assert client.get("/v1/audit?cursor=abc", headers=auth(admin)).status_code == 400


def test_S9_app_role_grants_cover_every_table_or_sqlite_triggers_guard(services):
    """PostgreSQL-only feature: the grants of `authsvc_app`. On SQLite the documented
    alternative is asserted instead: the two append-only triggers exist."""
    if services.engine.dialect.name != "postgresql":
        with services.engine.connect() as conn:
            names = set(conn.exec_driver_sql(
                "SELECT name FROM sqlite_master WHERE type = 'trigger' "
                "AND tbl_name = 'audit_events'").scalars())
        assert names == {"audit_events_no_update", "audit_events_no_delete"}
        return
    with services.engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT table_name, string_agg(privilege_type, ',') FROM "
            "information_schema.role_table_grants WHERE grantee = 'authsvc_app' "
            "GROUP BY table_name")).all()
    grants = {name: set(privs.split(",")) for name, privs in rows}
    assert grants["audit_events"] == {"INSERT", "SELECT"}
    assert {"SELECT", "INSERT", "UPDATE", "DELETE"} <= grants["orders"]
    missing = {name for name in t.metadata.tables if name not in grants}
    assert missing == set()
