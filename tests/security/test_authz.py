"""S1 (no/bad token), S2 (role × route matrix), S3 (cross-organization BOLA), S4 (token
lifetime), S12 (inventory drift): every route of `/openapi.json`, generated, not hand-picked."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
import sqlalchemy as sa

from authsvc.adapters.db import tables as t
from tests.conftest import auth, order_body
from tests.security.conftest import (
    ROLES,
    assert_problem,
    audit_rows,
    fill,
    fresh_addr,
    send,
    token_operations,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bad_tokens(services, tokens) -> dict[str, str]:
    from authsvc.api.auth import create_token

    with services.engine.begin() as conn:
        rid, revoked = create_token(conn, "org-a", "admin")
        _, expired = create_token(conn, "org-a", "admin", expires_on=dt.date(2020, 1, 1))
        conn.execute(t.api_tokens.update().where(t.api_tokens.c.id == rid)
                     .values(revoked_at=sa.func.now()))
    return {"garbage": "!!garbage!!", "unknown": "asv_" + "x" * 43, "revoked": revoked,
            "expired": expired, "non_ascii": "asv_ñññ"}


def test_S1_every_route_refuses_missing_and_bad_tokens_with_401_and_audit(
        app, spec, bad_tokens, tokens, org_objects, services):
    client = app.test_client()
    valid = tokens["org-a"]["admin"]
    ops = token_operations(spec)
    assert {op["path"] for op in ops} >= {"/v1/orders", "/v1/outcomes", "/v1/audit"}
    failures = []
    for op in ops:
        path = fill(op["path"], org_objects["org-a"])
        cases = {"none": {}, "basic": {"Authorization": "Basic dXNlcjpwYXNz"},
                 "query": {}, **{k: auth(v) for k, v in bad_tokens.items()}}
        for kind, headers in cases.items():
            rid = uuid.uuid4().hex
            target = path + (f"?access_token={valid}" if kind == "query" else "")
            resp = send(client, op, target, None, headers={**headers, "X-Request-Id": rid},
                        environ_base={"REMOTE_ADDR": fresh_addr()})
            if resp.status_code != 401 or not resp.headers.get(
                    "WWW-Authenticate", "").startswith("Bearer"):
                failures.append((op["method"], op["path"], kind, resp.status_code))
                continue
            assert_problem(resp, 401)
            rows = audit_rows(services, rid)
            if not rows or rows[0]["outcome"] != "denied" or not rows[0]["reason"]:
                failures.append((op["method"], op["path"], kind, "no denied audit"))
    assert failures == []


def test_S1_denial_reasons_name_the_token_problem(app, bad_tokens, services):
    client = app.test_client()
    want = {"revoked": "revoked_token", "expired": "expired_token", "unknown": "unknown_token",
            "garbage": "unknown_token"}
    for kind, reason in want.items():
        rid = uuid.uuid4().hex
        client.get("/v1/orders", headers=auth(bad_tokens[kind], **{"X-Request-Id": rid}),
                   environ_base={"REMOTE_ADDR": fresh_addr()})
        assert audit_rows(services, rid)[0]["reason"] == reason
    rid = uuid.uuid4().hex
    client.get("/v1/orders", headers={"X-Request-Id": rid},
               environ_base={"REMOTE_ADDR": fresh_addr()})
    assert audit_rows(services, rid)[0]["reason"] == "no_token"


@pytest.mark.parametrize("role", ROLES)
def test_S2_role_matrix_from_openapi_x_roles(app, spec, tokens, org_objects, role):
    """403 for every cell the x-roles extension does not allow; the allowed cells pass the
    role gate (2xx, or a 4xx about the request itself: never 401/403, never 5xx)."""
    client = app.test_client()
    token = tokens["org-a"][role]
    failures = []
    for op in token_operations(spec):
        path = fill(op["path"], org_objects["org-a"])
        resp = send(client, op, path, token)
        if role in op["roles"]:
            if resp.status_code in (401, 403) or resp.status_code >= 500:
                failures.append((op["method"], op["path"], "allowed", resp.status_code))
        elif resp.status_code != 403:
            failures.append((op["method"], op["path"], "refused", resp.status_code))
        else:
            assert_problem(resp, 403)
    assert failures == []


def test_S2_allowed_cells_succeed_on_the_read_routes(app, tokens, org_objects):
    client = app.test_client()
    order_id = org_objects["org-a"]["order_id"]
    for role in ("clinician", "coordinator", "admin"):
        assert client.get("/v1/orders", headers=auth(tokens["org-a"][role])).status_code == 200
        assert client.get(f"/v1/orders/{order_id}",
                          headers=auth(tokens["org-a"][role])).status_code == 200
    for role in ("billing", "admin"):
        assert client.get("/v1/outcomes", headers=auth(tokens["org-a"][role])).status_code == 200
    assert client.get("/v1/audit", headers=auth(tokens["org-a"]["admin"])).status_code == 200


def test_S3_every_route_with_an_id_answers_404_across_organizations(
        app, spec, tokens, org_objects, services):
    client = app.test_client()
    ops = [op for op in token_operations(spec) if op["params"]]
    assert any("{order_id}" in op["path"] for op in ops)
    failures = []
    for op in ops:
        a_path = fill(op["path"], org_objects["org-a"])
        for role in op["roles"]:
            rid = uuid.uuid4().hex
            resp = send(client, op, a_path, tokens["org-b"][role], headers={"X-Request-Id": rid})
            if resp.status_code != 404:
                failures.append((op["method"], op["path"], role, resp.status_code))
                continue
            assert_problem(resp, 404)
            rows = audit_rows(services, rid)
            if not rows or rows[-1]["outcome"] != "denied" or rows[-1]["org_id"] != "org-b":
                failures.append((op["method"], op["path"], role, "no denied audit"))
    assert failures == []


def test_S3_guessed_ids_and_org_filters_reveal_nothing(app, tokens, org_objects):
    client = app.test_client()
    b = auth(tokens["org-b"]["clinician"])
    a_order = org_objects["org-a"]["order_id"]
    # sequential guesses around A's id: same prefix, neighbouring characters
    for guess in (a_order[:-1] + "0", a_order[:-1] + "z", "ord_1", "1", "../" + a_order):
        assert client.get(f"/v1/orders/{guess}", headers=b).status_code == 404
    listed = client.get("/v1/orders?limit=200&org_id=org-a", headers=b)
    ids = {o["id"] for o in listed.get_json()["items"]}
    assert a_order not in ids and org_objects["org-b"]["order_id"] in ids


def test_S3_body_reference_to_another_organizations_patient_is_rejected(app, tokens, services):
    client = app.test_client()
    with services.engine.connect() as conn:
        a_patient = conn.execute(sa.select(t.patients.c.id).where(
            t.patients.c.org_id == "org-a").limit(1)).scalar()
    body = order_body()
    body["patient_id"] = a_patient
    body["patient"]["id"] = a_patient
    resp = client.post("/v1/orders", json=body, headers=auth(
        tokens["org-b"]["clinician"], **{"Idempotency-Key": uuid.uuid4().hex}))
    errors = {(e["field"], e["code"]) for e in assert_problem(resp, 422)["errors"]}
    assert {("patient_id", "unknown_field"), ("patient.id", "unknown_field")} <= errors


def test_S4_expired_token_works_through_its_last_day_only(app, services):
    import time_machine

    from authsvc.api.auth import create_token

    with services.engine.begin() as conn:
        _, token = create_token(conn, "org-a", "clinician", expires_on=dt.date(2031, 5, 1))
    client = app.test_client()
    with time_machine.travel(dt.datetime(2031, 5, 1, 23, 59, tzinfo=dt.UTC), tick=False):
        assert client.get("/v1/orders", headers=auth(token)).status_code == 200
    with time_machine.travel(dt.datetime(2031, 5, 2, 0, 0, 1, tzinfo=dt.UTC), tick=False):
        resp = client.get("/v1/orders", headers=auth(token),
                          environ_base={"REMOTE_ADDR": fresh_addr()})
        assert_problem(resp, 401)


def test_S4_revocation_by_the_cli_is_effective_on_the_next_request(
        app, services, settings, monkeypatch, capsys):
    from authsvc import cli
    from authsvc.api.auth import create_token

    with services.engine.begin() as conn:
        token_id, token = create_token(conn, "org-a", "clinician")
    client = app.test_client()
    assert client.get("/v1/orders", headers=auth(token)).status_code == 200
    monkeypatch.setenv("AUTHSVC_DATABASE_URL", settings.database_url)
    assert cli.main(["tokens", "revoke", token_id]) == 0
    listing = capsys.readouterr().out
    assert token not in listing
    resp = client.get("/v1/orders", headers=auth(token), environ_base={"REMOTE_ADDR": fresh_addr()})
    assert_problem(resp, 401)
    assert cli.main(["tokens", "list", "--org", "org-a"]) == 0
    out = capsys.readouterr().out
    assert token_id in out and token not in out and "revoked" in out


def test_S4_no_session_cookie_is_ever_set(app, tokens, org_objects):
    client = app.test_client()
    for path in ("/v1/orders", f"/v1/orders/{org_objects['org-a']['order_id']}", "/healthz",
                 "/openapi.json"):
        resp = client.get(path, headers=auth(tokens["org-a"]["admin"]))
        assert "Set-Cookie" not in resp.headers


def test_S4_tokens_are_random_256_bit_and_stored_only_as_a_hash(services):
    from authsvc.api.auth import create_token, hash_token

    with services.engine.begin() as conn:
        token_id, token = create_token(conn, "org-a", "billing")
        row = conn.execute(sa.select(t.api_tokens).where(t.api_tokens.c.id == token_id)
                           ).mappings().one()
    assert len(token) >= 4 + 43  # asv_ + 32 random bytes, base64url
    assert row["token_hash"] == hash_token(token) and token not in str(dict(row))
    assert row["prefix"] == token[:10]


def test_S12_url_map_equals_the_openapi_paths(app, spec):
    exempt = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/docs"),
              ("GET", "/openapi.json")}
    served = set()
    for rule in app.url_map.iter_rules():
        path = rule.rule.replace("<", "{").replace(">", "}")
        path = path.replace("{path:", "{").replace("{int:", "{")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            served.add((method, path))
    documented = {(m.upper(), p) for p, item in spec["paths"].items() for m in item
                  if m in ("get", "post", "put", "patch", "delete")}
    assert served - exempt == documented
    assert exempt <= served


def test_S4_last_used_time_is_recorded_and_listed_never_the_token(app, services, settings,
                                                                  monkeypatch, capsys):
    """Issue 8 › Tokens: last-used time, the prefix shown for support, the token itself never
    shown again; the hash lookup is confirmed with a constant-time comparison."""
    import inspect

    from authsvc import cli
    from authsvc.api import auth as auth_module
    from authsvc.api.auth import create_token

    org = f"org-lu-{uuid.uuid4().hex[:6]}"
    with services.engine.begin() as conn:
        token_id, token = create_token(conn, org, "clinician", name="ehr-feed")
    api = t.api_tokens

    def last_used():  # type: ignore[no-untyped-def]
        with services.engine.connect() as conn:
            return conn.execute(sa.select(api.c.last_used_at).where(api.c.id == token_id)
                                ).scalar()

    assert last_used() is None
    assert app.test_client().get("/v1/orders", headers=auth(token)).status_code == 200
    assert last_used() is not None
    monkeypatch.setenv("AUTHSVC_DATABASE_URL", settings.database_url)
    assert cli.main(["tokens", "list", "--org", org]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith(token_id))
    assert "ehr-feed" in line and token[:10] in line and "last_used=-" not in line
    assert token not in out and token[10:] not in out
    assert "hmac.compare_digest" in inspect.getsource(auth_module._token_actor_from_header)
