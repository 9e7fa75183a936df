"""Case actions over the real database: assign, notes, resolve, attachments, recorded
decisions, appeal, resubmit, cancel; state conflicts, roles, tenancy and audit."""

from __future__ import annotations

import datetime as dt
import io
import uuid

import pytest
import sqlalchemy as sa

from authsvc.adapters.db import tables as t
from authsvc.domain import clock
from tests.conftest import auth
from tests.integration.test_cases_factory import (
    case_row,
    insert_case,
    new_order,
    outbox_rows,
    outcomes_of,
    two_lines,
)

pytestmark = pytest.mark.integration
H = dt.timedelta(hours=1)
PDF = b"%PDF-1.7\n" + b"0" * 2048 + b"\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


@pytest.fixture()
def coord(tokens) -> str:
    return tokens["org-a"]["coordinator"]


@pytest.fixture()
def order(client, coord) -> dict:
    return new_order(client, coord, f"ACT-{uuid.uuid4().hex[:8]}", lines=two_lines())


def post(client, token, path, body=None, **headers):
    if body is None:
        return client.post(path, headers=auth(token, **headers))
    return client.post(path, json=body, headers=auth(token, **headers))


def upload(client, token, case_id, data: bytes, name="report.pdf", ctype="application/pdf",
           **form):
    """A multipart body built here: werkzeug's test builder leaves big temp files open."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
             .encode() for k, v in form.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                 f'filename="{name}"\r\nContent-Type: {ctype}\r\n\r\n'.encode()
                 + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return client.post(f"/v1/cases/{case_id}/attachments", data=body,
                       content_type=f"multipart/form-data; boundary={boundary}",
                       headers=auth(token))


def audits(services, case_id) -> list[str]:
    a = t.audit_events
    with services.engine.connect() as conn:
        reasons = conn.execute(sa.select(a.c.reason).where(a.c.entity_id == case_id)
                               .order_by(a.c.id)).scalars()
        return [r for r in reasons if not (r or "").startswith("http_")]


def test_assign_unassign_note_and_resolve(client, coord, services, order):
    case_id = insert_case(services, order["id"], "rejected", attention="rejected")
    resp = post(client, coord, f"/v1/cases/{case_id}/assign", {"assignee": "Maria"})
    assert resp.status_code == 200 and resp.get_json()["assignee"] == "Maria"
    resp = post(client, coord, f"/v1/cases/{case_id}/assign", {"assignee": None})
    assert resp.status_code == 200 and resp.get_json()["assignee"] is None
    assert post(client, coord, f"/v1/cases/{case_id}/assign", {}).status_code == 422
    assert post(client, coord, f"/v1/cases/{case_id}/assign",
                {"assignee": "x", "who": 1}).status_code == 422
    resp = post(client, coord, f"/v1/cases/{case_id}/notes", {"text": "left a voicemail"})
    assert resp.status_code == 201 and resp.get_json()["notes"][0]["text"] == "left a voicemail"
    assert post(client, coord, f"/v1/cases/{case_id}/notes", {"text": ""}).status_code == 422
    resp = post(client, coord, f"/v1/cases/{case_id}/resolve", {"note": "fixed the NPI"})
    assert resp.status_code == 200 and resp.get_json()["needs_attention"] is None
    events = resp.get_json()["timeline"]
    assert events[-1]["event"] == "attention_resolved"
    assert events[-1]["detail"] == {"reason": "rejected", "note": "fixed the NPI"}
    assert audits(services, case_id) == ["assign", "assign", "note", "resolve"]


def test_actions_need_coordinator_or_admin_and_the_same_org(client, tokens, services, order):
    case_id = insert_case(services, order["id"], "pended", submitted=clock.now())
    actions = [("assign", {"assignee": "x"}), ("notes", {"text": "x"}), ("resolve", {}),
               ("decision", {"received_via": "fax", "lines": [
                   {"sequence": 1, "outcome": "approved"}]}),
               ("appeal", {"kind": "standard"}), ("resubmit", None), ("cancel", None)]
    for action, body in actions:
        for role in ("clinician", "billing"):
            resp = post(client, tokens["org-a"][role], f"/v1/cases/{case_id}/{action}", body)
            assert resp.status_code == 403, (action, role)
        for role in ("coordinator", "admin"):
            resp = post(client, tokens["org-b"][role], f"/v1/cases/{case_id}/{action}", body)
            assert resp.status_code == 404, (action, role)
    resp = upload(client, tokens["org-b"]["coordinator"], case_id, PDF)
    assert resp.status_code == 404
    resp = upload(client, tokens["org-a"]["clinician"], case_id, PDF)
    assert resp.status_code == 403
    assert case_row(services, case_id)["state"] == "pended"


@pytest.mark.parametrize(("state", "action", "body"), [
    ("approved", "appeal", {"kind": "standard"}),
    ("pended", "appeal", {"kind": "standard"}),
    ("approved", "decision", {"received_via": "phone",
                              "lines": [{"sequence": 1, "outcome": "denied"}]}),
    ("ready_to_submit", "decision", {"received_via": "phone",
                                     "lines": [{"sequence": 1, "outcome": "approved"}]}),
    ("approved", "resubmit", None),
    ("pended", "resubmit", None),
    ("denied", "cancel", None),
    ("superseded", "cancel", None),
    ("expired", "cancel", None),
])
def test_state_conflicts_are_409_with_the_current_state(client, coord, services, order, state,
                                                        action, body):
    actions = {1: "A1", 2: "A1"} if state == "approved" else (
        {1: "A3", 2: "A3"} if state == "denied" else None)
    case_id = insert_case(services, order["id"], state, actions=actions)
    resp = post(client, coord, f"/v1/cases/{case_id}/{action}", body)
    assert resp.status_code == 409, resp.get_json()
    assert resp.mimetype == "application/problem+json"
    assert resp.get_json()["current_state"] == state
    assert case_row(services, case_id)["state"] == state


def test_attachment_round_trip_in_needs_input(client, coord, tokens, services, order):
    case_id = insert_case(services, order["id"], "needs_input")
    resp = upload(client, coord, case_id, PDF, name="../../etc/notes.txt", ctype="text/plain")
    assert resp.status_code == 201, resp.get_json()
    view = resp.get_json()
    assert view["state"] == "ready_to_submit"
    att = view["attachments"][0]
    assert att["content_type"] == "application/pdf" and att["size"] == len(PDF)
    assert att["filename"] == "notes.txt"
    assert outbox_rows(services, case_id) == ["submit_case"]
    got = client.get(att["links"]["content"], headers=auth(tokens["org-a"]["clinician"]))
    assert got.status_code == 200 and got.data == PDF and got.mimetype == "application/pdf"
    assert client.get(att["links"]["content"]).status_code == 401
    other = client.get(att["links"]["content"], headers=auth(tokens["org-b"]["admin"]))
    assert other.status_code == 404
    wrong_case = insert_case(services, order["id"], "pended")
    resp = client.get(f"/v1/cases/{wrong_case}/attachments/{att['id']}", headers=auth(coord))
    assert resp.status_code == 404


def test_attachment_in_info_requested_sends_an_update(client, coord, services, order):
    case_id = insert_case(services, order["id"], "info_requested", attention="info_requested",
                          received=clock.now() - H)
    with services.engine.begin() as conn:
        conn.execute(t.info_requests.insert().values(id="info_" + uuid.uuid4().hex[:10],
                                                     case_id=case_id, codes=["18748-4"],
                                                     requested_at=clock.now()))
    resp = upload(client, coord, case_id, PNG, name="scan.png", ctype="image/png",
                  loinc="18748-4")
    assert resp.status_code == 201
    row = case_row(services, case_id)
    assert row["state"] == "submitting" and row["update_pending"] is True
    assert row["attention_reason"] is None
    assert outbox_rows(services, case_id) == ["submit_case"]
    view = resp.get_json()
    assert view["info_requests"][0]["answered_at"] is not None
    assert view["attachments"][0]["loinc"] == "18748-4"


def test_attachment_in_other_open_states_travels_with_the_next_send(client, coord, services,
                                                                     order):
    case_id = insert_case(services, order["id"], "pended", received=clock.now())
    resp = upload(client, coord, case_id, b"\xff\xd8\xff\xe0" + b"j" * 100, name="a.jpg")
    assert resp.status_code == 201 and resp.get_json()["state"] == "pended"
    assert resp.get_json()["attachments"][0]["content_type"] == "image/jpeg"
    assert outbox_rows(services, case_id) == []


def test_attachment_limits(client, coord, services, order):
    case_id = insert_case(services, order["id"], "needs_input")
    big = b"%PDF-" + b"0" * (10 * 1024 * 1024 - 4)
    assert upload(client, coord, case_id, big).status_code == 413
    assert upload(client, coord, case_id, b"hello, not a document").status_code == 415
    assert upload(client, coord, case_id, b"").status_code == 422
    none = client.post(f"/v1/cases/{case_id}/attachments", data={"loinc": "x"},
                       content_type="multipart/form-data", headers=auth(coord))
    assert none.status_code == 422
    two = client.post(f"/v1/cases/{case_id}/attachments",
                      data={"a": (io.BytesIO(PDF), "a.pdf"), "b": (io.BytesIO(PDF), "b.pdf")},
                      content_type="multipart/form-data", headers=auth(coord))
    assert two.status_code == 422
    as_json = post(client, coord, f"/v1/cases/{case_id}/attachments", {"file": "x"})
    assert as_json.status_code == 415
    assert case_row(services, case_id)["state"] == "needs_input"
    exactly = b"%PDF-" + b"0" * (10 * 1024 * 1024 - 5)
    assert upload(client, coord, case_id, exactly).status_code == 201
    final = insert_case(services, order["id"], "denied", actions={1: "A3", 2: "A3"})
    resp = upload(client, coord, final, PDF)
    assert resp.status_code == 409 and resp.get_json()["current_state"] == "denied"


def test_recorded_decision_moves_the_case_and_emits_outcomes(client, coord, services, order):
    case_id = insert_case(services, order["id"], "pended", received=clock.now() - H)
    body = {"reference": "CALL-778", "received_via": "phone", "lines": [
        {"sequence": 1, "outcome": "approved", "auth_number": "PH-1", "authorized_quantity": 2,
         "valid_from": "2026-12-01", "valid_to": "2026-12-31"},
        {"sequence": 2, "outcome": "denied",
         "denial_reason": {"code": "0F", "text": "Not Medically Necessary"}},
    ]}
    bad = {**body, "lines": [{"sequence": 9, "outcome": "approved"}]}
    resp = post(client, coord, f"/v1/cases/{case_id}/decision", bad)
    assert resp.status_code == 422 and resp.get_json()["errors"][0]["field"] == \
        "lines[0].sequence"
    invalid = {"received_via": "pigeon", "lines": [
        {"sequence": 1, "outcome": "modified", "valid_from": "2026-12-31",
         "valid_to": "2026-12-01"}]}
    resp = post(client, coord, f"/v1/cases/{case_id}/decision", invalid)
    fields = {(e["field"], e["code"]) for e in resp.get_json()["errors"]}
    assert fields == {("received_via", "invalid_choice"),
                      ("lines[0].authorized_quantity", "required"),
                      ("lines[0].valid_to", "invalid_date_range")}
    resp = post(client, coord, f"/v1/cases/{case_id}/decision", body)
    assert resp.status_code == 200, resp.get_json()
    view = resp.get_json()
    assert view["state"] == "partially_approved"
    assert view["needs_attention"]["reason"] == "denied_review"
    recorded = [e for e in view["timeline"] if e["event"] == "decision_recorded"][0]
    assert recorded["detail"]["reference"] == "CALL-778"
    assert recorded["detail"]["received_via"] == "phone"
    assert recorded["detail"]["who"] == "org-a-coordinator"
    got = {o["sequence"]: o for o in outcomes_of(services, order["id"])}
    assert got[1]["outcome"] == "approved" and got[1]["auth_number"] == "PH-1"
    assert got[2]["outcome"] == "denied" and got[2]["denial_code"] == "0F"
    order_now = client.get(f"/v1/orders/{order['id']}", headers=auth(coord)).get_json()
    assert order_now["status"] == "partially_approved"
    again = post(client, coord, f"/v1/cases/{case_id}/decision", body)
    assert again.status_code == 409
    assert len(outcomes_of(services, order["id"])) == 2


def test_appeal_opens_a_linked_case_for_the_denied_lines(client, coord, services, order):
    now = clock.now()
    case_id = insert_case(services, order["id"], "partially_approved",
                          actions={1: "A1", 2: "A3"}, decided=now, received=now - H)
    resp = post(client, coord, f"/v1/cases/{case_id}/appeal", {"kind": "immediate"})
    assert resp.status_code == 422
    assert resp.get_json()["errors"][0]["field"] == "level_of_care"
    assert post(client, coord, f"/v1/cases/{case_id}/appeal",
                {"kind": "later"}).status_code == 422
    resp = post(client, coord, f"/v1/cases/{case_id}/appeal",
                {"kind": "immediate", "level_of_care": "inpatient",
                 "reason": "progressive neurological deficit"})
    assert resp.status_code == 201, resp.get_json()
    appeal = resp.get_json()
    assert appeal["kind"] == "appeal_immediate" and appeal["related_case_id"] == case_id
    assert appeal["state"] == "ready_to_submit" and appeal["level_of_care"] == "inpatient"
    assert [line["sequence"] for line in appeal["lines"]] == [2]
    row = case_row(services, appeal["id"])
    assert row["certification_type"] == "1" and row["urgency"] == "expedited"
    assert outbox_rows(services, appeal["id"]) == ["submit_case"]
    second = post(client, coord, f"/v1/cases/{case_id}/appeal", {"kind": "standard"})
    assert second.status_code == 409
    denied = insert_case(services, order["id"], "denied", actions={1: "A3", 2: "A3"},
                         decided=now)
    resp = post(client, coord, f"/v1/cases/{denied}/appeal", {"kind": "standard"})
    assert resp.status_code == 201
    assert case_row(services, resp.get_json()["id"])["certification_type"] == "2"


def test_resubmit_after_rejection(client, coord, services, order):
    refused = insert_case(services, order["id"], "rejected", attention="rejected",
                          last_error={"aaa_code": "15", "followup": "N"})
    resp = post(client, coord, f"/v1/cases/{refused}/resubmit")
    assert resp.status_code == 409 and resp.get_json()["current_state"] == "rejected"
    case_id = insert_case(services, order["id"], "rejected", attention="rejected",
                          last_error={"aaa_code": "15", "followup": "C"})
    resp = post(client, coord, f"/v1/cases/{case_id}/resubmit")
    assert resp.status_code == 201, resp.get_json()
    new = resp.get_json()
    assert new["kind"] == "resubmission" and new["related_case_id"] == case_id
    assert [line["sequence"] for line in new["lines"]] == [1, 2]
    assert outbox_rows(services, new["id"]) == ["submit_case"]
    old = case_row(services, case_id)
    assert old["state"] == "superseded" and old["attention_reason"] is None


def test_cancel_an_open_sent_case_tells_the_payer(client, coord, services, order):
    case_id = insert_case(services, order["id"], "pended", received=clock.now() - H)
    resp = post(client, coord, f"/v1/cases/{case_id}/cancel")
    assert resp.status_code == 200 and resp.get_json()["state"] == "cancelled"
    assert outbox_rows(services, case_id) == ["cancel_case"]
    assert outcomes_of(services, order["id"]) == []
    unsent = insert_case(services, order["id"], "needs_input")
    assert post(client, coord, f"/v1/cases/{unsent}/cancel").status_code == 200
    assert outbox_rows(services, unsent) == []


def test_cancel_an_approval_withdraws_it_with_cancelled_outcomes(client, coord, services, order):
    case_id = insert_case(services, order["id"], "pended", received=clock.now() - H)
    post(client, coord, f"/v1/cases/{case_id}/decision", {
        "received_via": "portal", "lines": [{"sequence": 1, "outcome": "approved"},
                                            {"sequence": 2, "outcome": "approved"}]})
    assert case_row(services, case_id)["state"] == "approved"
    resp = post(client, coord, f"/v1/cases/{case_id}/cancel")
    assert resp.status_code == 200 and resp.get_json()["state"] == "cancelled"
    feed = outcomes_of(services, order["id"])
    assert [(o["sequence"], o["outcome"], o["version"]) for o in feed] == [
        (1, "approved", 1), (2, "approved", 1), (1, "cancelled", 2), (2, "cancelled", 2)]
    assert outbox_rows(services, case_id) == ["cancel_case"]
    order_now = client.get(f"/v1/orders/{order['id']}", headers=auth(coord)).get_json()
    assert order_now["status"] == "cancelled"
    again = post(client, coord, f"/v1/cases/{case_id}/cancel")
    assert again.status_code == 409 and again.get_json()["current_state"] == "cancelled"


def test_an_idempotency_key_replays_an_action(client, coord, services, order):
    case_id = insert_case(services, order["id"], "denied", actions={1: "A3", 2: "A3"})
    key = uuid.uuid4().hex
    first = post(client, coord, f"/v1/cases/{case_id}/appeal", {"kind": "standard"},
                 **{"Idempotency-Key": key})
    again = post(client, coord, f"/v1/cases/{case_id}/appeal", {"kind": "standard"},
                 **{"Idempotency-Key": key})
    assert first.status_code == again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert first.get_json()["id"] == again.get_json()["id"]


def test_uploaded_file_names_lose_control_and_direction_characters(client, tokens, services):
    """U+202E would show "fdp.exe" as "exe.pdf" in a coordinator's list: the API stores the
    name without it (as the dashboard does), and a path never survives."""
    coord = tokens["org-a"]["coordinator"]
    order = new_order(client, coord, f"FN-{uuid.uuid4().hex[:8]}")
    case_id = insert_case(services, order["id"], "needs_input")
    resp = upload(client, coord, case_id, PDF, name="..\\\\evil\\\\\u202efdp.exe")
    assert resp.status_code == 201, resp.get_json()
    names = [a["filename"] for a in resp.get_json()["attachments"]]
    assert names == ["fdp.exe"]
