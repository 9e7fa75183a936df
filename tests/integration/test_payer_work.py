"""The payer workflow's service layer against a real simulator over HTTP: retry budget,
lost answers, info requests answered by an update, expiry and deadlines (issue 5)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
import urllib.request
import uuid

import pytest
import sqlalchemy as sa

from authsvc.adapters.db import repo
from authsvc.adapters.db import tables as t
from authsvc.domain import clock, ids
from authsvc.payer_sim import SimServer
from authsvc.service_layer import expiry, payer_work
from tests.conftest import auth, order_body
from workers.scheduler import Scheduler

pytestmark = pytest.mark.integration


@pytest.fixture()
def sim_factory():
    sims: list[SimServer] = []

    def start(**settings: str) -> SimServer:
        sim = SimServer(settings={"AUTHSVC_SIM_PEND_SECONDS": "0.3", **settings}).start()
        sims.append(sim)
        return sim

    yield start
    for sim in sims:
        sim.stop()


def with_sim(services, sim: SimServer, **settings):  # type: ignore[no-untyped-def]
    payers = {"demo": dataclasses.replace(services.payers["demo"], base_url=sim.fhir_base)}
    return dataclasses.replace(services, payers=payers, breakers={},
                               settings=services.settings.replace(**settings))


def new_case(svc, client, tokens, member: str, code: str = "72148") -> str:
    """An order whose eligibility was active: its case is ready to submit."""
    body = order_body(member)
    body["lines"][0]["code"] = code
    order = client.post("/v1/orders", json=body, headers=auth(
        tokens["org-a"]["coordinator"], **{"Idempotency-Key": uuid.uuid4().hex})).get_json()
    with svc.engine.begin() as conn:
        check = repo.latest_eligibility(conn, order["id"])
        from authsvc.service_layer.orders import apply_eligibility

        apply_eligibility(svc, conn, check, "active", clock.now())
        cases = repo.cases_of_order(conn, order["id"])
    return cases[0]["id"]


def drive(svc, case_id: str, rounds: int = 20) -> dict:
    """Run the submit step as the worker would, waiting out the backoff between attempts."""
    for _ in range(rounds):
        payer_work.submit_case(svc, case_id)
        with svc.engine.connect() as conn:
            case = repo.case_row(conn, case_id)
        if case["state"] != "submitting":
            return case
        wait = (case["next_attempt_at"] - clock.now()).total_seconds()
        time.sleep(max(wait, 0) + 0.05)
    return case


def test_retry_budget_ends_in_error_with_needs_attention(services, client, tokens, sim_factory):
    sim = sim_factory(AUTHSVC_SIM_FAULT="503")
    svc = with_sim(services, sim, submit_max_attempts=3, retry_base_seconds=0.1,
                   retry_cap_seconds=0.3)
    case_id = new_case(svc, client, tokens, f"SIM-APPROVE-{uuid.uuid4().hex[:6]}")
    case = drive(svc, case_id)
    assert case["state"] == "error" and case["attention_reason"] == "error"
    assert case["attempts"] == 3
    with svc.engine.connect() as conn:
        order = repo.order_row(conn, case["order_id"])
        exchanges = repo.exchanges_of_case(conn, case_id)
    assert order["status"] == "needs_attention"
    assert [x["http_status"] for x in exchanges if x["kind"] == "submit"] == [503, 503, 503]


def test_a_lost_answer_is_settled_by_asking_the_payer(services, client, tokens, sim_factory):
    member = f"SIM-APPROVE-{uuid.uuid4().hex[:6]}"
    slow = sim_factory(AUTHSVC_SIM_LATENCY_MS="1500")
    svc = with_sim(services, slow, retry_base_seconds=0.1, retry_cap_seconds=0.2)
    svc.payers["demo"] = dataclasses.replace(svc.payers["demo"], timeout_seconds=0.5)
    case_id = new_case(svc, client, tokens, member)
    payer_work.submit_case(svc, case_id)  # times out: the payer may have it
    with svc.engine.connect() as conn:
        case = repo.case_row(conn, case_id)
    assert case["state"] == "submitting" and case["submission_unknown"]
    svc.payers["demo"] = dataclasses.replace(svc.payers["demo"], timeout_seconds=5)
    case = drive(svc, case_id)
    assert case["state"] == "approved" and not case["submission_unknown"]
    with svc.engine.connect() as conn:
        sent = [x["kind"] for x in repo.exchanges_of_case(conn, case_id)]
    assert sent == ["submit", "inquire"]  # asked, found it, never sent again
    with urllib.request.urlopen(f"{slow.url}/sim/submissions?member_id={member}") as resp:
        ledger = json.load(resp)["items"]
    assert [(x["kind"], x["accepted"]) for x in ledger if x["kind"] == "submit"] == [
        ("submit", True)]


def test_info_request_is_answered_by_an_update_claim(services, client, tokens, sim_factory):
    sim = sim_factory()
    svc = with_sim(services, sim)
    case_id = new_case(svc, client, tokens, f"SIM-INFO-{uuid.uuid4().hex[:6]}", code="73722")
    case = drive(svc, case_id)
    assert case["state"] == "info_requested" and case["attention_reason"] == "info_requested"
    received = case["payer_received_at"]
    now = clock.now()
    with svc.engine.begin() as conn:
        conn.execute(t.attachments.insert().values(
            id=ids.new_id("att"), org_id="org-a", case_id=case_id, filename="mri-report.pdf",
            content_type="application/pdf", size=9, sha256="0" * 64, data=b"%PDF-1.4\n",
            loinc="18748-4", created_by="test", created_at=now))
        repo.update_case(conn, case_id, state="submitting", update_pending=True,
                         attention_reason=None, updated_at=now)
    case = drive(svc, case_id)
    assert case["state"] == "approved" and case["payer_received_at"] == received
    with svc.engine.connect() as conn:
        kinds = [x["kind"] for x in repo.exchanges_of_case(conn, case_id)]
        sent = conn.execute(sa.select(t.attachments.c.sent_at).where(
            t.attachments.c.case_id == case_id)).scalar_one()
        info = conn.execute(sa.select(t.info_requests).where(
            t.info_requests.c.case_id == case_id)).mappings().one()
    assert kinds == ["submit", "update"]
    assert sent is not None and info["answered_at"] is not None and "18748-4" in info["codes"]


def test_expired_approval_gets_an_expired_outcome(services, client, tokens, sim_factory):
    sim = sim_factory()
    svc = with_sim(services, sim)
    case_id = new_case(svc, client, tokens, f"SIM-APPROVE-{uuid.uuid4().hex[:6]}")
    case = drive(svc, case_id)
    assert case["state"] == "approved"
    with svc.engine.connect() as conn:
        valid_to = repo.case_lines(conn, case_id)[0]["valid_to"]
    assert expiry.expire_authorizations(svc, today=valid_to) == 0  # still valid that day
    assert expiry.expire_authorizations(svc, today=valid_to + dt.timedelta(days=1)) >= 1
    with svc.engine.connect() as conn:
        feed = repo.outcomes_of_order(conn, case["order_id"])
        order = repo.order_row(conn, case["order_id"])
    assert [(o["outcome"], o["version"]) for o in feed] == [("approved", 1), ("expired", 2)]
    assert order["status"] == "approved"  # unchanged; the feed says expired


def test_overdue_case_raises_needs_attention_with_the_injected_clock(
        services, client, tokens, sim_factory):
    sim = sim_factory()
    svc = with_sim(services, sim)
    body_member = f"SIM-SILENT-{uuid.uuid4().hex[:6]}"
    case_id = new_case(svc, client, tokens, body_member)
    case = drive(svc, case_id)
    assert case["state"] == "pended"
    due = case["decision_due_at"]
    assert due == case["payer_received_at"] + dt.timedelta(hours=168)
    scheduler = Scheduler(svc, broker=None)
    previous = clock.install(clock.FixedClock(due - dt.timedelta(hours=1)))
    try:
        scheduler.deadlines_once()
        with svc.engine.connect() as conn:
            assert repo.case_row(conn, case_id)["attention_reason"] is None
        clock.install(clock.FixedClock(due + dt.timedelta(seconds=1)))
        assert scheduler.deadlines_once() >= 1
        with svc.engine.connect() as conn:
            late = repo.case_row(conn, case_id)
        assert late["attention_reason"] == "overdue" and late["state"] == "pended"
    finally:
        clock.install(previous)


def _overdue_events(svc, case: dict) -> int:  # type: ignore[no-untyped-def]
    with svc.engine.connect() as conn:
        return sum(1 for e in repo.timeline(conn, case["order_id"])
                   if e["event"] == "decision_overdue" and e["case_id"] == case["id"])


def test_overdue_is_raised_once_per_deadline_and_keeps_a_more_specific_reason(
        services, client, tokens, sim_factory):
    """A coordinator who resolves the overdue alert does not get it back two seconds later for
    the same deadline; a case that already needs attention for an information request keeps
    that reason (the alert is still on its timeline); a new deadline raises it again."""
    svc = with_sim(services, sim_factory())
    first = drive(svc, new_case(svc, client, tokens, f"SIM-SILENT-{uuid.uuid4().hex[:6]}"))
    other = drive(svc, new_case(svc, client, tokens, f"SIM-SILENT-{uuid.uuid4().hex[:6]}"))
    assert first["state"] == other["state"] == "pended"
    with svc.engine.begin() as conn:
        repo.update_case(conn, other["id"], attention_reason="info_requested",
                         attention_since=clock.now())
    due = max(first["decision_due_at"], other["decision_due_at"])
    scheduler = Scheduler(svc, broker=None)
    previous = clock.install(clock.FixedClock(due + dt.timedelta(seconds=1)))
    try:
        scheduler.deadlines_once()
        with svc.engine.connect() as conn:
            assert repo.case_row(conn, first["id"])["attention_reason"] == "overdue"
            assert repo.case_row(conn, other["id"])["attention_reason"] == "info_requested"
        assert _overdue_events(svc, first) == _overdue_events(svc, other) == 1

        resolved = client.post(f"/v1/cases/{first['id']}/resolve",
                               json={"note": "Called the payer; decision expected today."},
                               headers=auth(tokens["org-a"]["coordinator"]))
        assert resolved.status_code == 200, resolved.get_json()
        for minutes in (1, 5, 60):  # the scheduler's later sweeps, same deadline
            clock.install(clock.FixedClock(due + dt.timedelta(minutes=minutes)))
            scheduler.deadlines_once()
        with svc.engine.connect() as conn:
            assert repo.case_row(conn, first["id"])["attention_reason"] is None
            assert repo.case_row(conn, other["id"])["attention_reason"] == "info_requested"
        assert _overdue_events(svc, first) == _overdue_events(svc, other) == 1

        # the payer received an update: a new deadline, and once it passes, a new alert
        later = due + dt.timedelta(days=7)
        with svc.engine.begin() as conn:
            repo.update_case(conn, first["id"], decision_due_at=later)
        clock.install(clock.FixedClock(later + dt.timedelta(seconds=1)))
        scheduler.deadlines_once()
        with svc.engine.connect() as conn:
            assert repo.case_row(conn, first["id"])["attention_reason"] == "overdue"
        assert _overdue_events(svc, first) == 2
    finally:
        clock.install(previous)


def test_429_is_retried_no_sooner_than_retry_after(services, client, tokens, sim_factory):
    """F11: the payer's Retry-After (30 s from the simulator) wins over a shorter backoff."""
    sim = sim_factory(AUTHSVC_SIM_FAULT="429")
    svc = with_sim(services, sim, retry_base_seconds=0.1, retry_cap_seconds=0.2)
    case_id = new_case(svc, client, tokens, f"SIM-APPROVE-{uuid.uuid4().hex[:6]}")
    before = clock.now()
    payer_work.submit_case(svc, case_id)
    with svc.engine.connect() as conn:
        case = repo.case_row(conn, case_id)
        exchanges = repo.exchanges_of_case(conn, case_id)
    assert case["state"] == "submitting" and not case["submission_unknown"]
    assert [x["http_status"] for x in exchanges] == [429]
    assert case["next_attempt_at"] >= before + dt.timedelta(seconds=30)
    payer_work.submit_case(svc, case_id)  # too early: nothing is sent
    with svc.engine.connect() as conn:
        assert len(repo.exchanges_of_case(conn, case_id)) == 1


# ------------------------------------------------------------------ appeals, resubmission,
# contact_payer: linked cases and phone decisions through the simulator (issue 5)


def coordinator_post(client, tokens, path: str, body: dict | None = None):  # type: ignore[no-untyped-def]
    headers = auth(tokens["org-a"]["coordinator"])
    if body is None:
        return client.post(path, headers=headers)
    return client.post(path, json=body, headers=headers)


def attach(client, tokens, case_id: str, data: bytes = b"%PDF-1.7\n%%EOF\n"):  # type: ignore[no-untyped-def]
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="note.pdf"\r\nContent-Type: application/pdf\r\n\r\n').encode() \
        + data + f"\r\n--{boundary}--\r\n".encode()
    return client.post(f"/v1/cases/{case_id}/attachments", data=body,
                       content_type=f"multipart/form-data; boundary={boundary}",
                       headers=auth(tokens["org-a"]["coordinator"]))


def ledger(sim: SimServer, **query: str) -> list[dict]:
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    with urllib.request.urlopen(f"{sim.url}/sim/submissions?{qs}") as resp:
        return json.load(resp)["items"]


def sent_claim(svc, case_id: str) -> dict:  # type: ignore[no-untyped-def]
    """The Claim of the PAS Bundle the worker sends for this case."""
    from authsvc.adapters.payers import pas_fhir

    with svc.engine.connect() as conn:
        claim = payer_work.build_claim(conn, repo.case_row(conn, case_id))
    bundle = pas_fhir.build_claim_bundle(claim, svc.payers["demo"])
    return bundle["entry"][0]["resource"]


def test_appeal_is_resubmitted_referencing_the_denial_and_overturned(
        services, client, tokens, sim_factory):
    sim = sim_factory()
    svc = with_sim(services, sim)
    member = f"SIM-OVERTURN-{uuid.uuid4().hex[:6]}"
    denied_id = new_case(svc, client, tokens, member)
    denied = drive(svc, denied_id)
    assert denied["state"] == "denied" and denied["attention_reason"] == "denied_review"
    resp = coordinator_post(client, tokens, f"/v1/cases/{denied_id}/appeal",
                            {"kind": "standard", "reason": "New imaging shows progression."})
    assert resp.status_code == 201, resp.get_json()
    appeal_id = resp.get_json()["id"]
    claim = sent_claim(svc, appeal_id)
    assert claim["identifier"][0]["value"] == appeal_id
    assert claim["related"][0]["claim"]["identifier"]["value"] == denied_id
    certs = {e["valueCodeableConcept"]["coding"][0]["code"] for item in claim["item"]
             for e in item["extension"] if e["url"].endswith("certificationType")}
    assert certs == {"2"}
    assert "New imaging shows progression." in [
        s.get("valueString") for s in claim.get("supportingInfo", [])]

    appeal = drive(svc, appeal_id)
    assert appeal["state"] == "approved" and appeal["payer_received_at"] is not None
    with svc.engine.connect() as conn:
        original = repo.case_row(conn, denied_id)
        order = repo.order_row(conn, appeal["order_id"])
        feed = repo.outcomes_of_order(conn, appeal["order_id"])
    assert original["state"] == "superseded" and original["attention_reason"] is None
    assert order["status"] == "approved"
    assert [(o["outcome"], o["version"], o["case_id"]) for o in feed] == [
        ("denied", 1, denied_id), ("approved", 2, appeal_id)]
    assert feed[1]["auth_number"]
    submits = [(x["claim_id"], x["accepted"]) for x in ledger(sim, member_id=member)
               if x["kind"] == "submit"]
    assert submits == [(denied_id, True), (appeal_id, True)]


def test_upheld_appeal_keeps_the_order_denied_and_versions_the_feed(
        services, client, tokens, sim_factory):
    sim = sim_factory()
    svc = with_sim(services, sim)
    denied_id = new_case(svc, client, tokens, f"SIM-DENY-{uuid.uuid4().hex[:6]}")
    assert drive(svc, denied_id)["state"] == "denied"
    # PAS: a denied request cannot be updated; the payer refuses it (only an appeal helps)
    from authsvc.domain.payer import PayerRejected

    with svc.engine.connect() as conn:
        claim = payer_work.build_claim(conn, repo.case_row(conn, denied_id))
    with pytest.raises(PayerRejected) as refused:
        svc.adapter("demo", lambda record: None).update(claim)
    assert refused.value.http_status == 422
    resp = coordinator_post(client, tokens, f"/v1/cases/{denied_id}/appeal",
                            {"kind": "immediate", "level_of_care": "inpatient"})
    assert resp.status_code == 201, resp.get_json()
    appeal = drive(svc, resp.get_json()["id"])
    assert appeal["state"] == "denied" and appeal["attention_reason"] == "denied_review"
    assert appeal["urgency"] == "expedited" and appeal["decision_due_at"] == \
        appeal["payer_received_at"] + dt.timedelta(hours=72)
    with svc.engine.connect() as conn:
        original = repo.case_row(conn, denied_id)
        assert original["state"] == "denied" and original["attention_reason"] is None
        order = repo.order_row(conn, appeal["order_id"])
        feed = repo.outcomes_of_order(conn, appeal["order_id"])
    assert order["status"] == "denied"
    assert [(o["outcome"], o["version"]) for o in feed] == [("denied", 1), ("denied", 2)]


def test_rejected_request_is_fixed_with_a_document_and_resubmitted(
        services, client, tokens, sim_factory):
    sim = sim_factory()
    svc = with_sim(services, sim)
    member = f"SIM-REJECT-{uuid.uuid4().hex[:6]}"
    first = new_case(svc, client, tokens, member)
    rejected = drive(svc, first)
    assert rejected["state"] == "rejected"
    assert rejected["last_error"]["aaa_code"] == "15" and rejected["last_error"]["followup"] == "C"
    # resubmitted as is: the payer still misses the data and rejects it again
    resp = coordinator_post(client, tokens, f"/v1/cases/{first}/resubmit")
    assert resp.status_code == 201, resp.get_json()
    second = resp.get_json()["id"]
    assert sent_claim(svc, second)["related"][0]["claim"]["identifier"]["value"] == first
    assert drive(svc, second)["state"] == "rejected"
    # the coordinator attaches the missing document, then resubmits: it travels along
    assert attach(client, tokens, second).status_code == 201
    resp = coordinator_post(client, tokens, f"/v1/cases/{second}/resubmit")
    assert resp.status_code == 201, resp.get_json()
    third = resp.get_json()["id"]
    final = drive(svc, third)
    assert final["state"] == "approved" and final["kind"] == "resubmission"
    with svc.engine.connect() as conn:
        states = {c["id"]: c["state"] for c in repo.cases_of_order(conn, final["order_id"])}
        order = repo.order_row(conn, final["order_id"])
        feed = repo.outcomes_of_order(conn, final["order_id"])
    assert states == {first: "superseded", second: "superseded", third: "approved"}
    assert order["status"] == "approved" and order["attention_reason"] is None
    assert [(o["outcome"], o["version"], o["case_id"]) for o in feed] == [
        ("approved", 1, third)]
    accepted = [x["claim_id"] for x in ledger(sim, member_id=member)
                if x["kind"] == "submit" and x["accepted"]]
    assert accepted == [third]


def test_resubmission_refused_when_the_payer_forbids_it(services, client, tokens, sim_factory):
    sim = sim_factory()
    svc = with_sim(services, sim)
    case_id = new_case(svc, client, tokens, f"SIM-NORESUBMIT-{uuid.uuid4().hex[:6]}")
    case = drive(svc, case_id)
    assert case["state"] == "rejected" and case["last_error"]["followup"] == "N"
    resp = coordinator_post(client, tokens, f"/v1/cases/{case_id}/resubmit")
    assert resp.status_code == 409 and resp.get_json()["current_state"] == "rejected"


def test_contact_payer_then_the_phone_decision_is_recorded(
        services, client, tokens, sim_factory):
    sim = sim_factory()
    svc = with_sim(services, sim)
    case_id = new_case(svc, client, tokens, f"SIM-CONTACT-{uuid.uuid4().hex[:6]}")
    case = drive(svc, case_id)
    assert case["state"] == "contact_payer" and case["attention_reason"] == "contact_payer"
    assert case["decision_due_at"] == case["payer_received_at"] + dt.timedelta(hours=168)
    view = client.get(f"/v1/cases/{case_id}",
                      headers=auth(tokens["org-a"]["coordinator"])).get_json()
    decision = view["lines"][0]["decision"]
    assert decision["review_action"] == "CT" and decision["outcome"] == "contact_payer"
    assert decision["denial_reason"]["code"] == "0V"
    assert "1-800-555-0199" in decision["denial_reason"]["text"]
    with svc.engine.connect() as conn:
        order = repo.order_row(conn, case["order_id"])
    assert order["status"] == "needs_attention"
    resp = coordinator_post(client, tokens, f"/v1/cases/{case_id}/decision", {
        "reference": "call 2026-11-27 J. Payer", "received_via": "phone",
        "lines": [{"sequence": 1, "outcome": "approved", "auth_number": "PH-1234",
                   "authorized_quantity": 1, "valid_from": "2026-12-01",
                   "valid_to": "2026-12-31"}]})
    assert resp.status_code == 200, resp.get_json()
    with svc.engine.connect() as conn:
        decided = repo.case_row(conn, case_id)
        order = repo.order_row(conn, case["order_id"])
        feed = repo.outcomes_of_order(conn, case["order_id"])
    assert decided["state"] == "approved" and decided["attention_reason"] is None
    assert order["status"] == "approved"
    assert [(o["outcome"], o["auth_number"], o["version"]) for o in feed] == [
        ("approved", "PH-1234", 1)]


def test_partial_approval_appealed_for_the_denied_line_only(
        services, client, tokens, sim_factory):
    sim = sim_factory()
    svc = with_sim(services, sim)
    body = order_body(f"SIM-PARTIAL-{uuid.uuid4().hex[:6]}")
    body["lines"].append({**body["lines"][0], "sequence": 2, "code": "72149"})
    order = client.post("/v1/orders", json=body, headers=auth(
        tokens["org-a"]["coordinator"], **{"Idempotency-Key": uuid.uuid4().hex})).get_json()
    with svc.engine.begin() as conn:
        from authsvc.service_layer.orders import apply_eligibility

        apply_eligibility(svc, conn, repo.latest_eligibility(conn, order["id"]), "active",
                          clock.now())
        case_id = repo.cases_of_order(conn, order["id"])[0]["id"]
    partial = drive(svc, case_id)
    assert partial["state"] == "partially_approved"
    resp = coordinator_post(client, tokens, f"/v1/cases/{case_id}/appeal", {"kind": "standard"})
    assert resp.status_code == 201, resp.get_json()
    appeal = resp.get_json()
    assert [line["sequence"] for line in appeal["lines"]] == [2]
    assert [i["sequence"] for i in sent_claim(svc, appeal["id"])["item"]] == [2]
    assert drive(svc, appeal["id"])["state"] == "approved"
    with svc.engine.connect() as conn:
        feed = repo.outcomes_of_order(conn, order["id"])
        status = repo.order_row(conn, order["id"])["status"]
        states = [c["state"] for c in repo.cases_of_order(conn, order["id"])]
    assert sorted((o["sequence"], o["version"], o["outcome"]) for o in feed) == [
        (1, 1, "approved"), (2, 1, "denied"), (2, 2, "approved")]
    assert states == ["superseded", "approved"] and status == "approved"
