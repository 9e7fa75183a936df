"""`authsvc reconcile` flags lost work: it is the oracle of the fault tests, so it must fail
when something was lost."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from authsvc.adapters.db import repo
from authsvc.domain import clock, ids
from authsvc.service_layer.reconcile import check
from tests.conftest import auth, order_body

pytestmark = pytest.mark.integration


def test_lost_work_and_feed_gaps_are_violations(services, client, tokens):
    since = clock.now() - dt.timedelta(seconds=1)
    order = client.post("/v1/orders", json=order_body(), headers=auth(
        tokens["org-b"]["clinician"], **{"Idempotency-Key": uuid.uuid4().hex})).get_json()
    assert check(services.engine, since=since, settle_seconds=3600) == []
    old = clock.now() - dt.timedelta(hours=2)
    case_id = ids.new_id("case")
    with services.engine.begin() as conn:
        repo.insert_case(conn, {
            "id": case_id, "org_id": "org-b", "order_id": order["id"], "payer_id": "demo",
            "kind": "initial", "certification_type": "I", "urgency": "standard",
            "state": "ready_to_submit", "created_at": old, "updated_at": old}, [{
                "sequence": 1, "code_system": "CPT", "code": "72148", "quantity": 1,
                "service_start": dt.date(2026, 12, 1), "service_end": None}])
        repo.add_outbox(conn, "submit_case", "case_gone", old)
        for version_gap in (1, 3):
            repo.insert_outcome(conn, {
                "id": ids.new_id("out"), "org_id": "org-b", "order_id": order["id"],
                "case_id": None, "sequence": 1, "code": "72148", "outcome": "no_auth_required",
                "payer_id": "demo", "decided_at": old, "version": version_gap})
    found = {(v.invariant, v.entity) for v in check(services.engine, since=since,
                                                    settle_seconds=60)}
    assert ("I5", case_id) in found
    assert ("I3", "case_gone") in found
    assert ("I7", order["id"]) in found
    with services.engine.begin() as conn:  # leave no stale outbox row for other tests
        from authsvc.adapters.db import tables as t

        conn.execute(t.outbox.update().where(t.outbox.c.entity_id == "case_gone")
                     .values(published_at=clock.now()))


def test_a_notification_stuck_in_the_queue_is_a_violation(services, client, tokens):
    """I6: a queued notification past its next attempt that no worker holds was lost on the
    way (its message gone); a sent one, or one due later, is fine."""
    from authsvc.adapters.db import tables as t

    since = clock.now() - dt.timedelta(seconds=1)
    order = client.post("/v1/orders", json=order_body(), headers=auth(
        tokens["org-b"]["clinician"], **{"Idempotency-Key": uuid.uuid4().hex})).get_json()
    old = clock.now() - dt.timedelta(hours=2)
    rows = {name: ids.new_id("ntf") for name in ("stuck", "sent", "later")}
    with services.engine.begin() as conn:
        for name, nid in rows.items():
            conn.execute(t.notifications.insert(), {
                "id": nid, "org_id": "org-b", "order_id": order["id"], "case_id": None,
                "event": f"reconcile_{name}", "version": 1, "recipient": "contact:0",
                "audience": "patient", "channel": "sms", "language": "en",
                "template": "x", "status": "sent" if name == "sent" else "queued",
                "attempts": 1, "created_at": old,
                "next_attempt_at": clock.now() + dt.timedelta(hours=1) if name == "later"
                else old})
    found = {(v.invariant, v.entity) for v in check(services.engine, since=since,
                                                    settle_seconds=60)}
    assert ("I6", rows["stuck"]) in found
    assert ("I6", rows["sent"]) not in found and ("I6", rows["later"]) not in found
    with services.engine.begin() as conn:  # leave nothing stuck for other tests
        conn.execute(t.notifications.update().where(
            t.notifications.c.id.in_(list(rows.values()))).values(status="sent"))
