"""Payer notifications: signature and freshness checked, duplicates and stale events
absorbed, decided cases never moved backwards (reliability.md S5, S6, F14, F15)."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid

import pytest

from authsvc.adapters import webhooks
from authsvc.adapters.db import repo
from authsvc.domain import clock, ids
from authsvc.domain.payer import LineDecision, PayerAnswer
from authsvc.service_layer import payer_work
from tests.conftest import DEMO_SECRET, FIXTURES, auth, order_body

pytestmark = pytest.mark.integration
NOTIFICATION = (FIXTURES / "pas-2.2.1" / "Bundle-PASSubscriptionNotification.json").read_bytes()


def signed(body: bytes, msg_id: str | None = None, ts: int | None = None,
           secret: str = DEMO_SECRET) -> dict:
    return {**webhooks.headers(secret, msg_id or f"msg_{uuid.uuid4().hex}", body, ts),
            "Content-Type": "application/fhir+json"}


def test_unsigned_stale_future_or_forged_notifications_are_401(client):
    url = "/v1/payer-callbacks/demo"
    now = int(time.time())
    assert client.post(url, data=NOTIFICATION,
                       headers={"Content-Type": "application/fhir+json"}).status_code == 401
    for ts in (now - 360, now + 360):
        assert client.post(url, data=NOTIFICATION, headers=signed(NOTIFICATION, ts=ts)
                           ).status_code == 401
    forged = signed(NOTIFICATION, secret="whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB")
    assert client.post(url, data=NOTIFICATION, headers=forged).status_code == 401
    tampered = NOTIFICATION.replace(b'"2"', b'"3"', 1)
    assert client.post(url, data=tampered, headers=signed(NOTIFICATION)).status_code == 401


def test_unknown_payer_is_404_and_a_genuine_notification_is_200(client):
    hdrs = signed(NOTIFICATION)
    assert client.post("/v1/payer-callbacks/acme", data=NOTIFICATION,
                       headers=hdrs).status_code == 404
    resp = client.post("/v1/payer-callbacks/demo", data=NOTIFICATION, headers=hdrs)
    assert resp.status_code == 200 and resp.get_json()["result"] == "unknown_case"
    again = client.post("/v1/payer-callbacks/demo", data=NOTIFICATION, headers=hdrs)
    assert again.status_code == 200 and again.get_json()["result"] == "duplicate"


def test_signed_garbage_is_400(client):
    body = json.dumps({"resourceType": "Patient"}).encode()
    resp = client.post("/v1/payer-callbacks/demo", data=body, headers=signed(body))
    assert resp.status_code == 400
    assert resp.mimetype == "application/problem+json"


def _pended_case(services, client, tokens) -> str:
    """An order with a case the payer pended (stored directly, as the worker would)."""
    order = client.post("/v1/orders", json=order_body(), headers=auth(
        tokens["org-a"]["coordinator"], **{"Idempotency-Key": uuid.uuid4().hex})).get_json()
    now = clock.now()
    case_id = ids.new_id("case")
    with services.engine.begin() as conn:
        repo.insert_case(conn, {
            "id": case_id, "org_id": "org-a", "order_id": order["id"], "payer_id": "demo",
            "kind": "initial", "certification_type": "I", "urgency": "standard",
            "state": "pended", "payer_received_at": now - dt.timedelta(minutes=5),
            "submitted_at": now - dt.timedelta(minutes=5), "created_at": now,
            "updated_at": now}, [{
                "sequence": 1, "code_system": "CPT", "code": "72148", "quantity": 1,
                "service_start": dt.date(2026, 12, 1), "service_end": None,
                "review_action": "A4"}])
    return case_id


def answer(case_id: str, action: str, event: int | None) -> PayerAnswer:
    return PayerAnswer(outcome="complete", claim_identifier=case_id, event_number=event,
                       lines=(LineDecision(sequence=1, review_action=action,
                                           auth_number="AUTH1" if action == "A1" else None),))


def test_duplicates_apply_once_and_older_events_never_overwrite(services, client, tokens):
    case_id = _pended_case(services, client, tokens)
    results = [payer_work.handle_notification(services, "demo", "wh-1", answer(case_id, "A1", 3))
               for _ in range(5)]
    assert results == ["applied"] + ["duplicate"] * 4
    older = payer_work.handle_notification(services, "demo", "wh-2", answer(case_id, "A4", 2))
    assert older == "ignored_final"
    with services.engine.connect() as conn:
        case = repo.case_row(conn, case_id)
        feed = repo.outcomes_of_order(conn, case["order_id"])
    assert case["state"] == "approved"
    assert [(o["outcome"], o["version"]) for o in feed] == [("approved", 1)]


def test_an_older_event_number_is_ignored_while_still_pending(services, client, tokens):
    case_id = _pended_case(services, client, tokens)
    assert payer_work.handle_notification(
        services, "demo", "wh-a", answer(case_id, "A4", 5)) == "applied"
    assert payer_work.handle_notification(
        services, "demo", "wh-b", answer(case_id, "A1", 4)) == "ignored_stale"
    with services.engine.connect() as conn:
        assert repo.case_row(conn, case_id)["state"] == "pended"
