"""Helpers for the security matrix (reliability.md §3.3 B1–B14, §3.4 S1–S13).

Route lists come from the served `/openapi.json` (its `x-roles` extension), never from a hand
list, so a route added later is covered by S1, S2 and S3 the day it appears.
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from authsvc.adapters.db import tables as t
from tests.conftest import auth, order_body

ROLES = ("clinician", "coordinator", "billing", "admin")
CANARY = ("ZZCANARY", "CANARYMBR000123", "1901-02-03", "Testperson")
PARAM_RE = re.compile(r"\{([^}]+)\}")
_addr = itertools.count(1)
_RUN = uuid.uuid4().hex[:4]


def fresh_addr() -> str:
    """A distinct client address per test (WSGI environ only, no traffic): failed-auth
    throttling is per address, and the matrix must not throttle the rest of the suite."""
    return f"2001:db8:{_RUN}::{next(_addr):x}"  # documentation range, new per run


def canary_body(**overrides: Any) -> dict:
    body = order_body("CANARYMBR000123")
    body["patient"].update(given_name="ZZCANARY", family_name="Testperson",
                           birth_date="1901-02-03", mrn="MRN-CANARY-1")
    body["requester"]["npi"] = "1234567893"
    body["diagnoses"] = ["J45.50"]
    body.update(overrides)
    return body


def assert_problem(resp, status: int | tuple[int, ...]) -> dict:
    """problem+json with the status, no stack trace, no canary echoed."""
    statuses = status if isinstance(status, tuple) else (status,)
    text = resp.get_data(as_text=True)
    assert resp.status_code in statuses, (resp.status_code, text[:500])
    assert resp.mimetype == "application/problem+json", resp.mimetype
    assert "Traceback" not in text and 'File "' not in text
    for value in CANARY:
        assert value not in text, f"{value} echoed in an error body"
    body = resp.get_json()
    assert body["status"] == resp.status_code and body["title"] and body["type"]
    return body


def count(services, table: sa.Table) -> int:
    with services.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()


def audit_rows(services, request_id: str) -> list[dict]:
    a = t.audit_events
    with services.engine.connect() as conn:
        return [dict(r) for r in conn.execute(
            sa.select(a).where(a.c.request_id == request_id).order_by(a.c.id)).mappings()]


def operations(spec: dict) -> list[dict]:
    """Every operation of the OpenAPI document: method, path, x-roles, body, params."""
    ops = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            ops.append({"method": method.upper(), "path": path,
                        "roles": op.get("x-roles"), "body": "requestBody" in op,
                        "multipart": "multipart/form-data" in (
                            op.get("requestBody") or {}).get("content", {}),
                        "params": PARAM_RE.findall(path)})
    return ops


def token_operations(spec: dict) -> list[dict]:
    """Operations that take an API token: their x-roles name only API roles."""
    return [op for op in operations(spec)
            if op["roles"] and set(op["roles"]) <= set(ROLES)]


def fill(path: str, values: dict[str, str]) -> str:
    return PARAM_RE.sub(lambda m: values.get(m.group(1), "zz_0000000000000000000000000"), path)


# Valid bodies for the action routes of api.md, by the path's last segment: with them the
# request reaches the object lookup, so the cross-organization answer must be 404.
SAMPLE_BODIES: dict[str, dict] = {
    "extensions": {"lines": [{"sequence": 1, "quantity": 2, "service_end": "2026-12-31"}]},
    "coverage": {"member_id": "SIM-APPROVE-0002"},
    "resolve": {"note": "checked"},
    "assign": {"assignee": "Pat"},
    "notes": {"text": "called the payer"},
    "decision": {"reference": "REF-1", "received_via": "phone",
                 "lines": [{"sequence": 1, "outcome": "approved", "auth_number": "A1"}]},
    "appeal": {"kind": "standard", "reason": "new evidence"},
}


def sample_body(path: str) -> dict:
    return SAMPLE_BODIES.get(path.rstrip("/").rsplit("/", 1)[-1], {})


def send(client, op: dict, path: str, token: str | None, **kw: Any):
    headers = auth(token) if token else {}
    headers.update(kw.pop("headers", {}))
    headers.setdefault("X-Request-Id", uuid.uuid4().hex)
    if op["method"] == "GET":
        return client.get(path, headers=headers, **kw)
    headers.setdefault("Idempotency-Key", uuid.uuid4().hex)
    if op.get("multipart") and "json" not in kw:
        import io

        data = {"file": (io.BytesIO(b"%PDF-1.4 security test"), "note.pdf", "application/pdf")}
        return client.open(path, method=op["method"], data=data, headers=headers,
                           content_type="multipart/form-data", **kw)
    body = kw.pop("json", sample_body(op["path"]))
    return client.open(path, method=op["method"], json=body, headers=headers, **kw)


@pytest.fixture(scope="session")
def spec(app) -> dict:
    return app.test_client().get("/openapi.json").get_json()


def insert_case(services, org_id: str, order_id: str, state: str = "approved") -> str:
    """A case row owned by `org_id` (no payer round trip: tenancy is what is tested)."""
    from authsvc.adapters.db import repo
    from authsvc.domain import ids

    now = dt.datetime.now(dt.UTC)
    case_id = ids.new_id("case")
    with services.engine.begin() as conn:
        repo.insert_case(conn, {
            "id": case_id, "org_id": org_id, "order_id": order_id, "payer_id": "demo",
            "kind": "initial", "certification_type": "AR", "urgency": "standard",
            "state": state, "created_at": now, "updated_at": now}, [
            {"sequence": 1, "code_system": "CPT", "code": "72148", "quantity": 1,
             "service_start": dt.date(2026, 12, 1)}])
    return case_id


@pytest.fixture(scope="session")
def org_objects(app, tokens, services) -> dict[str, dict[str, str]]:
    """{org: {param name: id}}: an order and a case in each organization."""
    client = app.test_client()
    out: dict[str, dict[str, str]] = {}
    for org in ("org-a", "org-b"):
        resp = client.post("/v1/orders", json=order_body(), headers=auth(
            tokens[org]["clinician"], **{"Idempotency-Key": uuid.uuid4().hex}))
        assert resp.status_code == 201, resp.get_data(as_text=True)
        order_id = resp.get_json()["id"]
        out[org] = {"order_id": order_id, "case_id": insert_case(services, org, order_id),
                    "id": order_id}
        sub = getattr(t, "webhook_subscriptions", None)
        if sub is not None:  # a subscription row per organization, for `{sub_id}` routes
            from authsvc.domain import ids

            sub_id = ids.new_id("sub")
            with services.engine.begin() as conn:
                conn.execute(sub.insert().values(
                    id=sub_id, org_id=org, url="http://127.0.0.1:9100/hook",
                    events=["outcome.created"], secret="whsec_" + "QUFB" * 8,
                    created_at=dt.datetime.now(dt.UTC), consecutive_failures=0))
            out[org]["sub_id"] = sub_id
    return out
