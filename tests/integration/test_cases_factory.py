"""Helpers for the case, subscription and report tests: orders through the real API, cases
inserted with the repository functions in a known state (no payer needed)."""

from __future__ import annotations

import datetime as dt
import uuid

import sqlalchemy as sa

from authsvc.adapters.db import repo
from authsvc.adapters.db import tables as t
from authsvc.domain import clock, ids
from tests.conftest import auth, order_body

UTC = dt.UTC


def new_order(client, token: str, external_id: str, *, lines: list[dict] | None = None,
              urgency: str = "standard") -> dict:
    body = order_body(external_id=external_id, urgency=urgency)
    if lines is not None:
        body["lines"] = lines
    resp = client.post("/v1/orders", json=body,
                       headers=auth(token, **{"Idempotency-Key": uuid.uuid4().hex}))
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


def two_lines() -> list[dict]:
    return [
        {"sequence": 1, "code_system": "CPT", "code": "72148", "quantity": 2,
         "service_start": "2026-12-01", "service_end": "2026-12-31"},
        {"sequence": 2, "code_system": "CPT", "code": "72149", "quantity": 1,
         "service_start": "2026-12-01", "service_end": "2026-12-31"},
    ]


def insert_case(services, order_id: str, state: str, *, due: dt.datetime | None = None,
                received: dt.datetime | None = None, decided: dt.datetime | None = None,
                submitted: dt.datetime | None = None, kind: str = "initial",
                actions: dict[int, str] | None = None, assignee: str | None = None,
                attention: str | None = None, last_error: dict | None = None,
                related: str | None = None, payer_id: str | None = None,
                urgency: str | None = None, created: dt.datetime | None = None) -> str:
    """A case of the order in `state`, its lines copied from the order's lines."""
    now = clock.now()
    case_id = ids.new_id("case")
    actions = actions or {}
    with services.engine.begin() as conn:
        order = repo.order_row(conn, order_id)
        assert order is not None
        lines = repo.order_lines(conn, order_id)
        repo.insert_case(conn, {
            "id": case_id, "org_id": order["org_id"], "order_id": order_id,
            "payer_id": payer_id or order["payer_id"], "kind": kind, "related_case_id": related,
            "certification_type": "I", "urgency": urgency or order["urgency"], "state": state,
            "decision_due_at": due, "payer_received_at": received, "decided_at": decided,
            "submitted_at": submitted if submitted is not None else received,
            "assignee": assignee, "attention_reason": attention,
            "attention_since": now if attention else None, "last_error": last_error,
            "created_at": created or now, "updated_at": now,
        }, [{
            "sequence": line["sequence"], "code_system": line["code_system"],
            "code": line["code"], "quantity": line["quantity"],
            "service_start": line["service_start"], "service_end": line["service_end"],
            "review_action": actions.get(line["sequence"]),
            "auth_number": f"AUTH-{line['sequence']}" if actions.get(line["sequence"]) in (
                "A1", "A2", "A6") else None,
            "authorized_quantity": line["quantity"] if actions.get(line["sequence"]) in (
                "A1", "A6") else None,
            "valid_from": line["service_start"] if actions.get(line["sequence"]) == "A1"
            else None,
            "valid_to": line["service_end"] if actions.get(line["sequence"]) == "A1" else None,
            "denial_code": "0F" if actions.get(line["sequence"]) == "A3" else None,
            "denial_text": "Not Medically Necessary" if actions.get(line["sequence"]) == "A3"
            else None,
            "decided_at": decided if actions.get(line["sequence"]) else None,
        } for line in lines])
        repo.add_timeline(conn, org_id=order["org_id"], order_id=order_id, case_id=case_id,
                          at=now, event="case_opened", actor="test", detail={"state": state})
    return case_id


def outbox_rows(services, entity_id: str) -> list[str]:
    o = t.outbox
    with services.engine.connect() as conn:
        return list(conn.execute(sa.select(o.c.actor).where(o.c.entity_id == entity_id)
                                 .order_by(o.c.id)).scalars())


def case_row(services, case_id: str) -> dict:
    with services.engine.connect() as conn:
        row = repo.case_row(conn, case_id)
    assert row is not None
    return row


def outcomes_of(services, order_id: str) -> list[dict]:
    with services.engine.connect() as conn:
        return repo.outcomes_of_order(conn, order_id)
