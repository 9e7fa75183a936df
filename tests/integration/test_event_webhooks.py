"""Order and case event webhooks (`order.*`, `case.*`): queued with the state change through
`timeline.record`, signed per Standard Webhooks and checked by a real HTTP receiver with the
`standardwebhooks` verifier, free of patient data, retried, disabled and redelivered like
`outcome.created`, scoped to the subscriber's organization."""

from __future__ import annotations

import json
import uuid

import pytest
import sqlalchemy as sa

from authsvc.adapters.db import repo
from authsvc.adapters.db import tables as t
from authsvc.domain import clock
from authsvc.service_layer import orders, timeline, webhooks_out
from tests.conftest import auth
from tests.integration.test_cases_factory import insert_case, new_order
from tests.integration.test_subscriptions_webhooks import (
    Receiver,
    deliveries_of,
    make_due,
    subscribe,
)

pytestmark = pytest.mark.integration

ORDER_AND_CASE = ("order.received", "order.eligibility_checked", "order.needs_attention",
                  "order.no_auth_required", "order.cancelled", "case.opened",
                  "case.state_changed", "case.needs_attention", "case.decision")
# What conftest.order_body puts in an order about the patient: never in a webhook.
PHI = ("Ana", "Diaz", "1984-03-02", "MRN-0001", "SIM-APPROVE", "ana@example.org",
       "+15555550101", "G-100")


@pytest.fixture()
def hook(monkeypatch, services):
    rec = Receiver()
    monkeypatch.setattr(services, "settings", services.settings.replace(
        webhook_allowlist=(f"127.0.0.1:{rec.port}",)))
    yield rec
    rec.close()
    with services.engine.begin() as conn:  # later tests need not queue deliveries
        s = t.webhook_subscriptions
        conn.execute(s.update().where(s.c.deleted_at.is_(None)).values(deleted_at=clock.now()))


def _subscribe(client, tokens, hook, events, org="org-a") -> dict:
    resp = subscribe(client, tokens[org]["billing"], hook.url, events=events)
    assert resp.status_code == 201, resp.get_json()
    sub = resp.get_json()
    hook.secret = sub["secret"]
    return sub


def _deliver_all(services, sub_id) -> None:
    """Send every pending delivery of the subscription (oldest first) to the receiver."""
    for row in deliveries_of(services, sub_id):
        if row["status"] == "pending":
            assert webhooks_out.deliver(services, row["id"]) == "delivered"


def _received(hook) -> list[dict]:
    """The payloads the receiver got, each checked with the `standardwebhooks` verifier."""
    out = []
    for r in hook.received:
        assert isinstance(r["verified"], dict), r["verified"]  # the signature checked out
        out.append(r["verified"])
    return out


def test_events_are_in_the_openapi_enum_and_unknown_ones_are_422(client, tokens, hook):
    spec = client.get("/openapi.json").get_json()
    body = spec["paths"]["/v1/subscriptions"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]
    assert set(body["properties"]["events"]["items"]["enum"]) == {"outcome.created",
                                                                  *ORDER_AND_CASE}
    assert "case.decision" in body["properties"]["events"]["description"]
    billing = tokens["org-a"]["billing"]
    for events, field in ((["case.opened", "case.exploded"], "events[1]"),
                          (["order.*"], "events[0]"), ([""], "events[0]"),
                          (["case.opened", 7], "events")):
        resp = client.post("/v1/subscriptions", json={"url": hook.url, "events": events},
                           headers=auth(billing, **{"Idempotency-Key": uuid.uuid4().hex}))
        assert resp.status_code == 422, resp.get_json()
        assert resp.mimetype == "application/problem+json"
        assert [e["field"] for e in resp.get_json()["errors"]] == [field]
    sub = _subscribe(client, tokens, hook, ["case.decision", "order.received"])
    assert sub["events"] == ["case.decision", "order.received"]


def test_order_and_case_events_signed_and_free_of_patient_data(client, tokens, services,
                                                               hook):
    sub = _subscribe(client, tokens, hook, list(ORDER_AND_CASE))
    coord = tokens["org-a"]["coordinator"]
    order = new_order(client, coord, f"EVT-{uuid.uuid4().hex[:8]}")
    [received] = deliveries_of(services, sub["id"])
    assert received["event_type"] == "order.received"
    with services.engine.connect() as conn:  # queued with the order, same transaction
        outbox = conn.execute(sa.select(t.outbox.c.actor).where(
            t.outbox.c.entity_id == received["id"])).scalars().all()
    assert outbox == ["deliver_webhook"]
    # Eligibility answers: the case is opened in the same use case.
    with services.engine.begin() as conn:
        check = repo.latest_eligibility(conn, order["id"])
        assert check is not None
        orders.apply_eligibility(services, conn, check, "active", clock.now())
    # A decision recorded by phone on a pended case: approved.
    case_id = insert_case(services, order["id"], "pended", received=clock.now())
    resp = client.post(f"/v1/cases/{case_id}/decision", headers=auth(coord), json={
        "received_via": "phone", "reference": "call with Ana Diaz 1984-03-02",
        "lines": [{"sequence": 1, "outcome": "approved", "auth_number": "AUTH-EVT"}]})
    assert resp.status_code == 200, resp.get_json()
    _deliver_all(services, sub["id"])
    payloads = _received(hook)
    types = [p["type"] for p in payloads]
    assert types[:3] == ["order.received", "order.eligibility_checked", "case.opened"], types
    assert sorted(types[3:]) == ["case.decision", "case.state_changed"]  # one transaction
    by_type = {p["type"]: p["data"] for p in payloads}
    assert by_type["order.received"]["order_id"] == order["id"]
    assert by_type["order.received"]["lines"] == 1
    assert by_type["order.eligibility_checked"]["eligibility"] == "active"
    opened = by_type["case.opened"]
    assert opened["case_id"] and opened["kind"] == "initial" and opened["sequences"] == [1]
    assert by_type["case.state_changed"] == {**by_type["case.state_changed"],
                                             "case_id": case_id, "state": "approved",
                                             "event": "case_approved"}
    assert by_type["case.decision"]["review_actions"] == {"1": "A1"}
    ids = {r["headers"]["webhook-id"] for r in hook.received}
    assert len(ids) == len(hook.received)  # one webhook-id per event
    for r in hook.received:
        text = r["body"].decode()
        for phi in PHI:
            assert phi not in text, (phi, text)
        assert "call with" not in text  # free text a coordinator typed: never sent
    # Nothing for an organization's subscriber about another organization's orders.
    assert all(p["data"]["order_id"] == order["id"] for p in payloads)


def test_needs_attention_and_cancellation_events(client, tokens, services, hook):
    sub = _subscribe(client, tokens, hook, ["case.needs_attention", "order.needs_attention",
                                            "order.cancelled", "case.state_changed"])
    coord = tokens["org-a"]["coordinator"]
    order = new_order(client, coord, f"ATT-{uuid.uuid4().hex[:8]}")
    assert deliveries_of(services, sub["id"]) == []  # not subscribed to order.received
    case_id = insert_case(services, order["id"], "pended", received=clock.now())
    resp = client.post(f"/v1/cases/{case_id}/decision", headers=auth(coord), json={
        "received_via": "fax", "lines": [{"sequence": 1, "outcome": "denied",
                                          "denial_reason": {"code": "0F", "text": "x"}}]})
    assert resp.status_code == 200, resp.get_json()
    other = new_order(client, coord, f"ATT-{uuid.uuid4().hex[:8]}")
    with services.engine.begin() as conn:
        check = repo.latest_eligibility(conn, other["id"])
        orders.apply_eligibility(services, conn, check, "inactive", clock.now())
    assert client.post(f"/v1/orders/{other['id']}/cancel",
                       headers=auth(coord)).status_code == 200
    _deliver_all(services, sub["id"])
    got = [(p["type"], p["data"].get("reason") or p["data"].get("state"))
           for p in _received(hook)]
    assert sorted(got[:2]) == [("case.needs_attention", "denied_review"),
                               ("case.state_changed", "denied")]  # the same transaction
    assert got[2:] == [("order.needs_attention", "coverage_problem"),
                       ("order.cancelled", None)]
    assert {p["data"]["order_id"] for p in _received(hook)[2:]} == {other["id"]}


def test_retry_disable_and_redeliver_like_outcomes(client, tokens, services, hook,
                                                   monkeypatch):
    monkeypatch.setattr(webhooks_out, "RETRY_SCHEDULE", [0])
    monkeypatch.setattr(webhooks_out, "DISABLE_AFTER_FAILURES", 2)
    billing = tokens["org-a"]["billing"]
    sub = _subscribe(client, tokens, hook, ["order.received"])
    new_order(client, tokens["org-a"]["coordinator"], f"RTY-{uuid.uuid4().hex[:8]}")
    [delivery] = deliveries_of(services, sub["id"])
    hook.script = [500, 503]
    assert webhooks_out.deliver(services, delivery["id"]) == "retry"
    make_due(services, delivery["id"])
    assert webhooks_out.deliver(services, delivery["id"]) == "failed"
    shown = client.get(f"/v1/subscriptions/{sub['id']}", headers=auth(billing)).get_json()
    assert shown["status"] == "disabled" and "HTTP 503" in shown["disabled_reason"]
    new_order(client, tokens["org-a"]["coordinator"], f"RTY-{uuid.uuid4().hex[:8]}")
    assert len(deliveries_of(services, sub["id"])) == 1  # disabled: nothing new queued
    resp = client.post(f"/v1/subscriptions/{sub['id']}/redeliver", headers=auth(billing))
    assert resp.status_code == 202 and resp.get_json()["queued"] == [delivery["id"]]
    assert webhooks_out.deliver(services, delivery["id"]) == "delivered"
    first, second, third = hook.received
    assert first["headers"]["webhook-id"] == third["headers"]["webhook-id"]
    assert third["verified"]["type"] == "order.received"
    log = client.get(f"/v1/subscriptions/{sub['id']}/deliveries",
                     headers=auth(billing)).get_json()
    assert log["items"][0]["event_type"] == "order.received"
    assert log["items"][0]["status"] == "delivered"


def test_queued_only_when_the_event_commits_and_only_for_its_organization(
        client, tokens, services, hook):
    mine = _subscribe(client, tokens, hook, ["order.cancelled"])
    theirs = _subscribe(client, tokens, hook, ["order.cancelled"], org="org-b")
    order = new_order(client, tokens["org-a"]["coordinator"], f"TX-{uuid.uuid4().hex[:8]}")

    class Boom(Exception):
        pass

    with pytest.raises(Boom), services.engine.begin() as conn:
        timeline.record(conn, org_id="org-a", order_id=order["id"], at=clock.now(),
                        event="order_cancelled", actor="test")
        raise Boom
    assert deliveries_of(services, mine["id"]) == []
    with services.engine.connect() as conn:  # nor an outbox row for a delivery that is not
        o, d = t.outbox, t.webhook_deliveries
        orphans = conn.execute(sa.select(sa.func.count()).select_from(o).where(
            o.c.actor == "deliver_webhook", o.c.entity_id.notin_(sa.select(d.c.id)))).scalar()
    assert orphans == 0
    assert client.post(f"/v1/orders/{order['id']}/cancel",
                       headers=auth(tokens["org-a"]["coordinator"])).status_code == 200
    assert [r["event_type"] for r in deliveries_of(services, mine["id"])] == ["order.cancelled"]
    assert deliveries_of(services, theirs["id"]) == []


def test_a_subscription_created_mid_transaction_is_not_missed_by_the_next_one(
        client, tokens, services, hook):
    """The subscriptions are read once per transaction, never remembered across them."""
    order = new_order(client, tokens["org-a"]["coordinator"], f"MEMO-{uuid.uuid4().hex[:8]}")
    with services.engine.begin() as conn:  # reads (and memoizes) "no subscription"
        assert webhooks_out.announce(conn, org_id="org-a", order_id=order["id"], case_id=None,
                                     event="order_cancelled", at=clock.now(), detail=None) == 0
    sub = _subscribe(client, tokens, hook, ["order.cancelled"])
    with services.engine.begin() as conn:
        assert webhooks_out.announce(conn, org_id="org-a", order_id=order["id"], case_id=None,
                                     event="order_cancelled", at=clock.now(), detail=None) == 1
    [row] = deliveries_of(services, sub["id"])
    assert row["payload"]["data"]["order_id"] == order["id"]


def test_event_mapping_takes_only_ids_states_and_codes():
    types = webhooks_out.event_types
    assert types("attention_resolved", {"note": "called Ana Diaz"}) == {}
    assert types("note_added", {"note_id": "note_1"}) == {}
    assert types("eligibility_member_not_found", None) == {
        "order.eligibility_checked": {"eligibility": "member_not_found"},
        "order.needs_attention": {"reason": "coverage_problem"}}
    assert types("lines_not_sent", {"sequences": [2, "x"]}) == {
        "order.needs_attention": {"reason": "not_sent", "sequences": [2]}}
    partial = {"source": "poll", "review_actions": {"1": "A1", "2": "A3"}}
    assert set(types("case_partially_approved", partial)) == {
        "case.state_changed", "case.decision", "case.needs_attention"}
    assert set(types("case_partially_approved", {"review_actions": {"1": "A1", "2": "A2"}})) \
        == {"case.state_changed", "case.decision"}
    assert types("decision_overdue", None) == {"case.needs_attention": {"reason": "overdue"}}
    assert types("authorization_expired", None) == {"case.state_changed": {"state": "expired"}}
    assert types("case_rejected", {"aaa_code": "75", "followup": "C"}) == {
        "case.state_changed": {"state": "rejected"},
        "case.needs_attention": {"reason": "rejected", "state": "rejected"}}
    assert types("extension_requested", {"extends": "case_1", "sequences": [1]}) == {
        "case.opened": {"kind": "extension", "state": "ready_to_submit",
                        "related_case_id": "case_1", "sequences": [1]}}
    assert types("payer_update_ignored", {"source": "poll"}) == {}
    every = set()
    for kind in webhooks_out.TIMELINE_KINDS:
        every |= set(types(kind, {"review_actions": {"1": "A3"}}))
    assert every == set(ORDER_AND_CASE)  # each documented event has a timeline source
    assert set(webhooks_out.EVENT_DOCS) == set(webhooks_out.EVENTS)
    assert json.dumps(webhooks_out.EVENTS)  # plain strings


def test_what_recording_an_event_costs_in_statements(client, tokens, services, hook):
    """The intake hot path: a kind no webhook announces costs no statement; an organization
    subscribed to nothing costs one SELECT per transaction; deliveries and their outbox rows
    cost one statement on PostgreSQL (two on SQLite), however many subscribers."""
    order = new_order(client, tokens["org-a"]["coordinator"], f"COST-{uuid.uuid4().hex[:8]}")
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):  # noqa: ARG001
        statements.append(statement.split()[0].upper())

    def record(conn, event: str) -> None:
        timeline.record(conn, org_id="org-a", order_id=order["id"], at=clock.now(),
                        event=event, actor="test")

    def announced(event: str, times: int = 1) -> list[str]:
        statements.clear()
        with services.engine.begin() as conn:
            sa.event.listen(conn, "before_cursor_execute", count)
            for _ in range(times):
                webhooks_out.announce(conn, org_id="org-a", order_id=order["id"],
                                      case_id=None, event=event, at=clock.now(), detail=None)
            sa.event.remove(conn, "before_cursor_execute", count)
        return list(statements)

    assert announced("coverage_assertion_reused") == []
    assert announced("order_cancelled", times=3) == ["SELECT"]  # once per transaction
    _subscribe(client, tokens, hook, ["order.cancelled"])
    _subscribe(client, tokens, hook, ["order.cancelled", "order.received"])
    inserts = ["WITH"] if services.engine.dialect.name == "postgresql" else ["INSERT"] * 2
    assert announced("order_cancelled") == ["SELECT", *inserts]
    with services.engine.begin() as conn:
        record(conn, "order_cancelled")
    d, o = t.webhook_deliveries, t.outbox
    with services.engine.connect() as conn:
        rows = conn.execute(sa.select(d.c.id, d.c.event_id).where(
            d.c.org_id == "org-a", d.c.event_type == "order.cancelled",
            d.c.payload["data"]["order_id"].as_string() == order["id"])).all()
        queued = conn.execute(sa.select(o.c.entity_id).where(
            o.c.entity_id.in_([r.id for r in rows]))).scalars().all()
    assert len(rows) == 4 and len({r.event_id for r in rows}) == 2  # 2 events × 2 subscribers
    assert sorted(queued) == sorted(r.id for r in rows)


def test_a_subscription_made_between_two_transactions_of_one_connection_gets_the_event(
        client, tokens, services, hook):
    """A pooled connection's second transaction (autobegun by the event itself) sees a
    subscription created after its first one committed: the event is delivered."""
    order = new_order(client, tokens["org-a"]["coordinator"], f"MEMO-{uuid.uuid4().hex[:8]}")

    def cancelled(conn) -> int:  # type: ignore[no-untyped-def]
        return webhooks_out.announce(conn, org_id="org-a", order_id=order["id"], case_id=None,
                                     event="order_cancelled", at=clock.now(), detail=None)

    with services.engine.connect() as conn:
        assert cancelled(conn) == 0  # nobody subscribes yet
        conn.commit()
        sub = _subscribe(client, tokens, hook, ["order.cancelled"])
        assert cancelled(conn) == 1
        conn.commit()
        sub2 = _subscribe(client, tokens, hook, ["order.cancelled"])
        assert cancelled(conn) == 2
        conn.rollback()  # and after a rollback too: this event is not queued at all
        assert deliveries_of(services, sub2["id"]) == []
    [row] = deliveries_of(services, sub["id"])
    assert row["payload"]["data"]["order_id"] == order["id"]


def test_coordinator_actions_announce_their_case_events(client, tokens, services, hook):
    """A coordinator's appeal opens a case (case.opened) and a cancel changes a case's state
    (case.state_changed), announced as the same events raised by a worker are."""
    sub = _subscribe(client, tokens, hook, ["case.opened", "case.state_changed"])
    coord = tokens["org-a"]["coordinator"]
    order = new_order(client, coord, f"ACT-{uuid.uuid4().hex[:8]}")
    denied = insert_case(services, order["id"], "denied", received=clock.now(),
                         actions={1: "A3"})
    resp = client.post(f"/v1/cases/{denied}/appeal", headers=auth(coord),
                       json={"kind": "standard", "reason": "New imaging attached."})
    assert resp.status_code == 201, resp.get_json()
    appeal_id = resp.get_json()["id"]
    resp = client.post(f"/v1/cases/{appeal_id}/cancel", headers=auth(coord), json={})
    assert resp.status_code == 200, resp.get_json()
    _deliver_all(services, sub["id"])
    got = [(p["type"], p["data"]["case_id"], p["data"].get("state")) for p in _received(hook)]
    assert ("case.opened", appeal_id, "ready_to_submit") in got
    assert ("case.state_changed", appeal_id, "cancelled") in got
