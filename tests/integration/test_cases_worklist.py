"""GET /v1/cases and GET /v1/cases/{id} over the real database: order, filters, pagination
under concurrent inserts, deadline flags, detail shape, roles and tenancy."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
import sqlalchemy as sa

from authsvc.adapters.db import tables as t
from authsvc.domain import clock
from tests.conftest import auth
from tests.integration.test_cases_factory import insert_case, new_order

pytestmark = pytest.mark.integration
H = dt.timedelta(hours=1)


def page(client, token, query: str) -> dict:
    resp = client.get(f"/v1/cases?{query}", headers=auth(token))
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


def ids_of(client, token, query: str) -> list[str]:
    return [c["id"] for c in page(client, token, query)["items"]]


@pytest.fixture()
def tag() -> str:
    return uuid.uuid4().hex[:10]


def test_worklist_is_ordered_by_deadline_with_nulls_last(client, tokens, services, tag):
    token = tokens["org-a"]["coordinator"]
    now = clock.now()
    order = new_order(client, token, f"WL-{tag}")
    late = insert_case(services, order["id"], "pended", due=now + 100 * H, received=now - H)
    none = insert_case(services, order["id"], "ready_to_submit")
    soon = insert_case(services, order["id"], "submitted", due=now + 2 * H, received=now - H)
    mid = insert_case(services, order["id"], "pended", due=now + 50 * H, received=now - H)
    got = ids_of(client, token, f"q={tag}")
    assert got == [soon, mid, late, none]
    item = page(client, token, f"q={tag}")["items"][0]
    for key in ("decision_due_at", "overdue", "at_risk", "needs_attention", "assignee",
                "last_event", "state", "payer_id", "urgency", "order_id", "kind"):
        assert key in item
    assert item["last_event"]["event"] == "case_opened"
    assert item["at_risk"] is True and item["overdue"] is False  # 2 h of 168 h left


def test_every_filter(client, tokens, services, tag):
    token = tokens["org-a"]["coordinator"]
    now = clock.now()
    order = new_order(client, token, f"WL-{tag}")
    exp = new_order(client, token, f"WL-{tag}-x", urgency="expedited")
    overdue = insert_case(services, order["id"], "pended", due=now - H, received=now - 200 * H)
    attention = insert_case(services, order["id"], "rejected", attention="rejected",
                            assignee="org-a-coordinator")
    later = insert_case(services, exp["id"], "submitted", due=now + 60 * H, received=now,
                        assignee="Maria")
    final = insert_case(services, order["id"], "approved", due=now - H, received=now - 200 * H,
                        actions={1: "A1"}, decided=now - 2 * H)
    other_payer = insert_case(services, order["id"], "pended", payer_id="acme",
                              due=now + 10 * H, received=now)
    q = f"q={tag}"
    assert set(ids_of(client, token, f"{q}&state=pended")) == {overdue, other_payer}
    assert set(ids_of(client, token, f"{q}&state=pended,rejected")) == {
        overdue, other_payer, attention}
    assert set(ids_of(client, token, f"{q}&payer_id=acme")) == {other_payer}
    assert set(ids_of(client, token, f"{q}&urgency=expedited")) == {later}
    assert set(ids_of(client, token, f"{q}&overdue=true")) == {overdue}  # final: not overdue
    assert set(ids_of(client, token, f"{q}&needs_attention=true")) == {overdue, attention}
    items = {c["id"]: c for c in page(client, token, f"{q}&needs_attention=true")["items"]}
    assert items[overdue]["needs_attention"]["reason"] == "overdue"
    assert items[overdue]["overdue"] is True
    assert items[attention]["needs_attention"]["reason"] == "rejected"
    assert overdue not in ids_of(client, token, f"{q}&needs_attention=false")
    assert set(ids_of(client, token, f"{q}&assignee=me")) == {attention}
    assert set(ids_of(client, token, f"{q}&assignee=Maria")) == {later}
    cutoff = (now + 20 * H).isoformat().replace("+00:00", "Z")
    assert set(ids_of(client, token, f"{q}&due_before={cutoff}")) == {
        overdue, final, other_payer}
    tomorrow_plus = (now + 30 * H).date() + dt.timedelta(days=1)
    got = set(ids_of(client, token, f"{q}&due_before={tomorrow_plus.isoformat()}"))
    assert {overdue, final, other_payer} <= got and attention not in got
    assert set(ids_of(client, token, f"q={tag}-x")) == {later}


@pytest.mark.parametrize("query", [
    "state=nope", "urgency=urgent", "overdue=yes", "needs_attention=1", "needs_attention=",
    "due_before=tomorrow", "due_before=2026-12-01T10:00:00", "limit=0", "limit=201",
])
def test_bad_query_parameters_are_422(client, tokens, query):
    resp = client.get(f"/v1/cases?{query}", headers=auth(tokens["org-a"]["coordinator"]))
    assert resp.status_code == 422 and resp.mimetype == "application/problem+json"


def test_bad_cursor_is_400(client, tokens):
    token = tokens["org-a"]["coordinator"]
    for cursor in ("%%%", "eyJ4IjoxfQ", "bm90IGpzb24"):
        assert client.get(f"/v1/cases?cursor={cursor}", headers=auth(token)).status_code == 400


def test_pages_return_every_case_exactly_once_while_cases_arrive(client, tokens, services, tag):
    token = tokens["org-a"]["coordinator"]
    now = clock.now()
    order = new_order(client, token, f"WL-{tag}")
    present = set()
    for i in range(23):
        due = None if i % 4 == 0 else now + (i % 7) * H  # ties on purpose
        present.add(insert_case(services, order["id"], "pended", due=due, received=now))
    seen: list[str] = []
    arrived: set[str] = set()
    cursor = None
    for i in range(100):
        url = f"q={tag}&limit=4" + (f"&cursor={cursor}" if cursor else "")
        body = page(client, token, url)
        seen += [c["id"] for c in body["items"]]
        # New cases land before, at and after the page boundary meanwhile.
        arrived.add(insert_case(services, order["id"], "pended", due=now + (i % 9) * H,
                                received=now))
        arrived.add(insert_case(services, order["id"], "ready_to_submit"))
        cursor = body["next_cursor"]
        if not cursor:
            break
    assert len(seen) == len(set(seen)), "a case was returned twice"
    assert present <= set(seen), "a case present for the whole walk was skipped"
    assert set(seen) <= present | arrived


def test_case_detail_has_lines_decisions_exchanges_notes_and_timeline(client, tokens, services,
                                                                     tag):
    token = tokens["org-a"]["coordinator"]
    now = clock.now()
    order = new_order(client, token, f"WL-{tag}")
    case_id = insert_case(services, order["id"], "denied", actions={1: "A3"}, decided=now,
                          received=now - H)
    with services.engine.begin() as conn:
        conn.execute(t.payer_exchanges.insert().values(
            org_id="org-a", order_id=order["id"], case_id=case_id, payer_id="demo",
            kind="submit", direction="out", url="http://payer/Claim/$submit", http_status=200,
            started_at=now, finished_at=now, request_body='{"resourceType": "Bundle"}',
            response_body='{"resourceType": "Bundle", "patient": "Ana"}'))
    client.post(f"/v1/cases/{case_id}/notes", json={"text": "called the payer"},
                headers=auth(token))
    view = client.get(f"/v1/cases/{case_id}", headers=auth(token)).get_json()
    line = view["lines"][0]
    assert line["decision"]["review_action"] == "A3"
    assert line["decision"]["outcome"] == "denied"
    assert line["decision"]["denial_reason"] == {"code": "0F", "text": "Not Medically Necessary"}
    assert view["kind"] == "initial" and view["related_case_id"] is None
    assert view["payer_exchanges"][0]["kind"] == "submit"
    assert "response_body" not in view["payer_exchanges"][0]  # PHI: admins only
    assert [n["text"] for n in view["notes"]] == ["called the payer"]
    assert [e["event"] for e in view["timeline"]] == ["case_opened", "note_added"]
    admin = client.get(f"/v1/cases/{case_id}", headers=auth(tokens["org-a"]["admin"]))
    assert "Ana" in admin.get_json()["payer_exchanges"][0]["response_body"]
    clinician = client.get(f"/v1/cases/{case_id}", headers=auth(tokens["org-a"]["clinician"]))
    assert clinician.status_code == 200
    with services.engine.connect() as conn:
        reads = conn.execute(sa.select(sa.func.count()).select_from(t.audit_events).where(
            t.audit_events.c.entity_id == case_id, t.audit_events.c.action == "read")).scalar()
    assert reads == 3


def test_roles_and_tenancy_on_reads(client, tokens, services, tag):
    order = new_order(client, tokens["org-a"]["coordinator"], f"WL-{tag}")
    case_id = insert_case(services, order["id"], "pended")
    assert client.get("/v1/cases").status_code == 401
    assert client.get("/v1/cases", headers=auth(tokens["org-a"]["billing"])).status_code == 403
    resp = client.get(f"/v1/cases/{case_id}", headers=auth(tokens["org-a"]["billing"]))
    assert resp.status_code == 403
    for role in ("clinician", "coordinator", "admin"):
        token = tokens["org-b"][role]
        assert client.get(f"/v1/cases/{case_id}", headers=auth(token)).status_code == 404
        assert case_id not in ids_of(client, token, f"q={tag}")


def test_state_counts_cover_the_organization_only(client, tokens, services, tag):
    """The dashboard's counts per state: one grouped query, zeros for empty states, and
    another organization's cases never counted."""
    from authsvc.service_layer import worklist

    states = ("pended", "submitted", "info_requested")
    with services.engine.connect() as conn:
        before_a = worklist.state_counts(conn, "org-a", states)
        before_b = worklist.state_counts(conn, "org-b", states)
    order = new_order(client, tokens["org-a"]["coordinator"], f"WL-{tag}")
    for state in ("pended", "pended", "submitted"):
        insert_case(services, order["id"], state)
    with services.engine.connect() as conn:
        after_a = worklist.state_counts(conn, "org-a", states)
        after_b = worklist.state_counts(conn, "org-b", states)
    assert {s: after_a[s] - before_a[s] for s in states} == {
        "pended": 2, "submitted": 1, "info_requested": 0}
    assert after_b == before_b


def _b64(raw: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


FORGED_CURSORS = {
    "nul_in_id": _b64(b'{"d":null,"id":"a\\u0000b"}'),
    "deeply_nested": _b64(b"[" * 1200),
    "too_long": _b64(b'{"d":null,"id":"case_' + b"a" * 600 + b'"}'),
    "id_not_a_case_id": _b64(b'{"d":null,"id":"x; drop"}'),
}


@pytest.mark.parametrize("name", sorted(FORGED_CURSORS))
def test_a_forged_cursor_is_a_400_problem_not_a_500(client, tokens, name):
    resp = client.get(f"/v1/cases?cursor={FORGED_CURSORS[name]}",
                      headers=auth(tokens["org-a"]["coordinator"]))
    assert resp.status_code == 400, resp.get_data(as_text=True)[:300]
    assert resp.mimetype == "application/problem+json"
    assert "cursor" in resp.get_json()["detail"]


def test_a_cursor_the_service_issued_still_pages_on(client, tokens, services, tag):
    token = tokens["org-a"]["coordinator"]
    order = new_order(client, token, f"WL-{tag}")
    for _ in range(3):
        insert_case(services, order["id"], "pended")
    first = page(client, token, f"q={tag}&limit=2")
    assert first["next_cursor"] and len(first["items"]) == 2
    rest = page(client, token, f"q={tag}&limit=2&cursor={first['next_cursor']}")
    assert len(rest["items"]) == 1
