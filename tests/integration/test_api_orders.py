"""The orders API over the real database: payload rules, auth, tenancy, idempotency."""

from __future__ import annotations

import threading
import uuid

import pytest
import sqlalchemy as sa

from authsvc.adapters.db import tables as t
from tests.conftest import auth, order_body

pytestmark = pytest.mark.integration


def post(client, token, body, key=None, **headers):
    h = auth(token, **headers)
    h["Idempotency-Key"] = key or uuid.uuid4().hex
    return client.post("/v1/orders", json=body, headers=h)


def count_orders(services) -> int:
    with services.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(t.orders)).scalar()


def test_order_is_stored_with_its_determination_and_timeline(client, tokens):
    resp = post(client, tokens["org-a"]["clinician"], order_body())
    assert resp.status_code == 201
    assert resp.mimetype == "application/json"
    order = resp.get_json()
    assert order["id"].startswith("ord_") and resp.headers["Location"] == order["links"]["self"]
    det = order["lines"][0]["determination"]
    assert det["pa_needed"] == "auth-needed" and det["rules"] == ["demo/imaging/mri-lumbar"]
    assert order["eligibility"]["status"] == "pending"
    got = client.get(f"/v1/orders/{order['id']}", headers=auth(tokens["org-a"]["clinician"]))
    assert got.status_code == 200
    assert [e["event"] for e in got.get_json()["timeline"]] == ["order_received"]


def test_errors_are_problem_json_naming_each_field(client, tokens, services):
    before = count_orders(services)
    body = order_body()
    body["lines"][0]["code"] = "99213-25"
    body["requester"]["npi"] = "1234567890"
    body["status"] = "approved"
    resp = post(client, tokens["org-a"]["clinician"], body)
    assert resp.status_code == 422 and resp.mimetype == "application/problem+json"
    errors = {(e["field"], e["code"]) for e in resp.get_json()["errors"]}
    assert errors == {("lines[0].code", "invalid_format"),
                      ("requester.npi", "invalid_check_digit"), ("status", "unknown_field")}
    assert "Ana" not in resp.get_data(as_text=True)
    assert count_orders(services) == before


def test_unknown_payer_is_unknown_code(client, tokens):
    body = order_body()
    body["coverage"]["payer_id"] = "acme"
    resp = post(client, tokens["org-a"]["clinician"], body)
    assert resp.status_code == 422
    assert {"field": "coverage.payer_id", "code": "unknown_code"}.items() <= \
        resp.get_json()["errors"][0].items()


@pytest.mark.parametrize(("data", "ctype", "status"), [
    (b"{bad", "application/json", 400),
    (b"", "application/json", 400),
    (b"null", "application/json", 400),
    (b'{"a": NaN}', "application/json", 400),
    (b'{"a": 1, "a": 2}', "application/json", 400),
    (b"[" * 100000 + b"]" * 100000, "application/json", 400),
    (b'{"external_id": "x"}', "text/plain", 415),
    (b"{" + b" " * (300 * 1024) + b"}", "application/json", 413),
])
def test_unusable_bodies(client, tokens, data, ctype, status):
    resp = client.post("/v1/orders", data=data, content_type=ctype,
                       headers=auth(tokens["org-a"]["clinician"], **{"Idempotency-Key": "x1"}))
    assert resp.status_code == status
    assert resp.mimetype == "application/problem+json"
    assert "Traceback" not in resp.get_data(as_text=True)


def test_no_token_bad_token_and_wrong_role(client, tokens):
    resp = client.get("/v1/orders")
    assert resp.status_code == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
    resp = client.get("/v1/orders", headers=auth("asv_not-a-token"))
    assert resp.status_code == 401
    resp = post(client, tokens["org-a"]["billing"], order_body())
    assert resp.status_code == 403
    resp = client.get("/v1/outcomes", headers=auth(tokens["org-a"]["clinician"]))
    assert resp.status_code == 403


def test_revoked_and_expired_tokens_are_refused(client, services):
    import datetime as dt

    from authsvc.api.auth import create_token

    with services.engine.begin() as conn:
        rid, revoked = create_token(conn, "org-a", "clinician")
        _, expired = create_token(conn, "org-a", "clinician",
                                  expires_on=dt.date(2020, 1, 1))
        conn.execute(t.api_tokens.update().where(t.api_tokens.c.id == rid)
                     .values(revoked_at=sa.func.now()))
    assert client.get("/v1/orders", headers=auth(revoked)).status_code == 401
    assert client.get("/v1/orders", headers=auth(expired)).status_code == 401


def test_another_organizations_order_is_not_found(client, tokens):
    order = post(client, tokens["org-a"]["clinician"], order_body()).get_json()
    for role in ("clinician", "coordinator", "admin"):
        token = tokens["org-b"][role]
        assert client.get(f"/v1/orders/{order['id']}", headers=auth(token)).status_code == 404
        resp = client.post(f"/v1/orders/{order['id']}/cancel", headers=auth(token))
        assert resp.status_code == 404
    listed = client.get("/v1/orders?limit=200", headers=auth(tokens["org-b"]["clinician"]))
    assert order["id"] not in {o["id"] for o in listed.get_json()["items"]}


def test_idempotency_replay_conflict_and_key_rules(client, tokens, services):
    token = tokens["org-a"]["clinician"]
    key = uuid.uuid4().hex
    first = post(client, token, order_body(), key)
    again = post(client, token, order_body(), key)
    assert first.status_code == again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.headers["Location"] == first.headers["Location"]  # the replay points there too
    other = post(client, token, order_body(external_id="EHR-OTHER"), key)
    assert other.status_code == 422
    # the same key in another organization is another scope
    assert post(client, tokens["org-b"]["clinician"], order_body(), key).status_code == 201
    missing = client.post("/v1/orders", json=order_body(), headers=auth(token))
    assert missing.status_code == 400
    assert post(client, token, order_body(), "k" * 256).status_code == 400
    assert post(client, token, order_body(), "bad key").status_code == 400


def test_a_replay_does_not_write_the_patient_again(client, tokens, services):
    """The patient's details come from the newest order; replaying an older request (a
    client retry) answers from the stored response and must not put the older details back.
    On PostgreSQL the upsert rides with the key's claim, guarded by it."""
    token = tokens["org-a"]["clinician"]
    mrn = f"MRN-R-{uuid.uuid4().hex[:8]}"
    older = order_body(patient={**order_body()["patient"], "mrn": mrn, "family_name": "Diaz"})
    newer = order_body(patient={**older["patient"], "family_name": "Diaz-Lopez"})
    key = uuid.uuid4().hex
    first = post(client, token, older, key)
    assert first.status_code == 201
    assert post(client, token, newer, uuid.uuid4().hex).status_code == 201
    again = post(client, token, older, key)
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"

    with services.engine.connect() as conn:
        rows = conn.execute(sa.select(t.patients.c.id, t.patients.c.family_name).where(
            t.patients.c.org_id == "org-a", t.patients.c.mrn == mrn)).all()
        order_patients = set(conn.execute(sa.select(t.orders.c.patient_id).where(
            t.orders.c.org_id == "org-a",
            t.orders.c.patient_id.in_([r.id for r in rows]))).scalars())
    assert [r.family_name for r in rows] == ["Diaz-Lopez"]  # one row, the newest details
    assert order_patients == {rows[0].id}  # both orders point at it


def test_twenty_concurrent_posts_with_one_key_make_one_order(app, tokens, services):
    token = tokens["org-a"]["clinician"]
    key = uuid.uuid4().hex
    barrier = threading.Barrier(20)
    results: list[tuple[int, str | None]] = []
    lock = threading.Lock()

    def worker() -> None:
        client = app.test_client()
        barrier.wait()
        resp = post(client, token, order_body(external_id="CONCURRENT"), key)
        with lock:
            results.append((resp.status_code, (resp.get_json() or {}).get("id")))

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert len(results) == 20
    assert {code for code, _ in results} <= {201, 409}
    ids = {oid for code, oid in results if code == 201}
    assert len(ids) == 1
    with services.engine.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).select_from(t.orders)
                         .where(t.orders.c.external_id == "CONCURRENT")).scalar()
    assert n == 1


def test_list_orders_pages_with_a_cursor(client, tokens):
    token = tokens["org-b"]["coordinator"]
    made = {post(client, token, order_body(external_id=f"P{i}")).get_json()["id"]
            for i in range(5)}
    seen, cursor = [], None
    while True:
        url = "/v1/orders?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(url, headers=auth(token)).get_json()
        seen += [o["id"] for o in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert made <= set(seen) and len(seen) == len(set(seen))
    assert client.get("/v1/orders?limit=201", headers=auth(token)).status_code == 422
    assert client.get("/v1/orders?cursor=%%%", headers=auth(token)).status_code == 400


def test_cancel_an_undecided_order(client, tokens):
    token = tokens["org-a"]["coordinator"]
    order = post(client, token, order_body()).get_json()
    resp = client.post(f"/v1/orders/{order['id']}/cancel", headers=auth(token))
    assert resp.status_code == 200 and resp.get_json()["status"] == "cancelled"
    again = client.post(f"/v1/orders/{order['id']}/cancel", headers=auth(token))
    assert again.status_code == 200


def test_openapi_matches_the_routes(app, client):
    spec = client.get("/openapi.json").get_json()
    documented = {(path, method.upper()) for path, ops in spec["paths"].items()
                  for method in ops if method in ("get", "post", "put", "delete", "patch")}
    exempt = {"/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"}
    served = set()
    for rule in app.url_map.iter_rules():
        path = rule.rule.replace("<", "{").replace(">", "}")
        if path in exempt or path.startswith("/docs") or rule.endpoint == "static":
            continue
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            served.add((path, method))
    assert served == documented
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if method in ("get", "post", "put", "delete", "patch"):
                assert "x-roles" in op, (path, method)


def test_operations_endpoints(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz").get_json()
    assert ready["status"] == "ok" and set(ready["checks"]) == {"database", "broker", "rules"}
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "authsvc_http_requests" in metrics


def test_the_intake_answer_equals_the_stored_order(client, tokens):
    """The 201 body is built from the values in hand; it must equal a fresh read."""
    body = order_body(lines=[
        {"sequence": 2, "code_system": "CPT", "code": "99213", "quantity": 1,
         "service_start": "2026-12-03"},
        {"sequence": 1, "code_system": "CPT", "code": "72148", "quantity": 1,
         "service_start": "2026-12-01", "service_end": "2026-12-31"}])
    created = post(client, tokens["org-a"]["clinician"], body)
    assert created.status_code == 201
    stored = client.get(f"/v1/orders/{created.get_json()['id']}",
                        headers=auth(tokens["org-a"]["clinician"])).get_json()
    assert created.get_json() == stored


def test_an_order_needs_a_payer_we_can_reach_a_preview_only_its_policies(client, tokens):
    """Medicare's policy lists ship without a payer endpoint: a preview answers, an order
    is refused at coverage.payer_id instead of waiting forever for an unreachable payer."""
    body = order_body()
    body["coverage"]["payer_id"] = "medicare"
    order = post(client, tokens["org-a"]["clinician"], body)
    assert order.status_code == 422
    assert order.get_json()["errors"][0]["field"] == "coverage.payer_id"
    preview = client.post("/v1/coverage-requirements", json=body,
                          headers=auth(tokens["org-a"]["clinician"]))
    assert preview.status_code == 200
    assert preview.get_json()["ruleset_version"].startswith("medicare@")
