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
