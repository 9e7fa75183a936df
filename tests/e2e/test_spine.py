"""An order travels end to end on real parts: API → rules → database → workers → payer
simulator over PAS → decision → billing feed. Every process is a real `authsvc` process."""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import order_body
from tests.e2e.harness import Http, System, wait_for

pytestmark = pytest.mark.e2e
TERMINAL = {"approved", "denied", "partially_approved", "modified", "no_auth_required",
            "coverage_problem", "cancelled", "needs_attention"}


@pytest.fixture(scope="module")
def system(database_url, redis_url, tmp_path_factory):
    sysm = System(database_url, redis_url, tmp_path_factory.mktemp("e2e"),
                  extra_env={"AUTHSVC_TESTING": "1"})
    try:
        yield sysm.up()
    finally:
        sysm.stop()


@pytest.fixture(scope="module")
def clinician(system) -> Http:
    return Http(system.api, system.token("e2e-clinic", "clinician"))


@pytest.fixture(scope="module")
def billing(system) -> Http:
    return Http(system.api, system.token("e2e-clinic", "billing"))


def post_order(http: Http, body: dict) -> dict:
    status, headers, order = http.request("POST", "/v1/orders", body,
                                          {"Idempotency-Key": uuid.uuid4().hex})
    assert status == 201, order
    return order


def settle(http: Http, order_id: str, want: str | None = None, timeout: float = 60) -> dict:
    def done():  # type: ignore[no-untyped-def]
        _, _, order = http.request("GET", f"/v1/orders/{order_id}")
        if want is not None:
            return order if order["status"] == want else None
        return order if order["status"] in TERMINAL else None

    return wait_for(done, timeout)


def outcomes_for(http: Http, order_id: str) -> list[dict]:
    items, after = [], None
    while True:
        q = "/v1/outcomes?limit=200" + (f"&after={after}" if after else "")
        status, _, page = http.request("GET", q)
        assert status == 200
        items += page["items"]
        if not page["items"]:
            break
        after = page["next_cursor"]
    return [o for o in items if o["order_id"] == order_id]


def unique_member(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8].upper()}"


def test_approved_order_reaches_the_billing_feed(system, clinician, billing):
    member = unique_member("SIM-APPROVE")
    order = post_order(clinician, order_body(member))
    line = order["lines"][0]["determination"]
    assert line["pa_needed"] == "auth-needed"
    assert order["status"] == "checking_eligibility"
    assert order["ruleset_version"].startswith("demo@")

    final = settle(clinician, order["id"], "approved")
    events = [e["event"] for e in final["timeline"]]
    assert events[0] == "order_received"
    assert "eligibility_active" in events and "case_approved" in events
    assert final["cases"][0]["state"] == "approved"
    assert final["cases"][0]["decision_due_at"] is not None

    feed = outcomes_for(billing, order["id"])
    assert len(feed) == 1
    assert feed[0]["outcome"] == "approved" and feed[0]["auth_number"]
    assert feed[0]["authorized_quantity"] == 1 and feed[0]["version"] == 1
    assert feed[0]["valid_from"] and feed[0]["valid_to"]

    kinds = [s["kind"] for s in system.submissions(member)]
    assert kinds.count("eligibility") == 1
    accepted = [s for s in system.submissions(member) if s["kind"] == "submit" and s["accepted"]]
    assert len(accepted) == 1 and accepted[0]["claim_id"] == final["cases"][0]["id"]


def test_denied_order_carries_the_reason(system, clinician, billing):
    member = unique_member("SIM-DENY")
    order = post_order(clinician, order_body(member))
    final = settle(clinician, order["id"], "denied")
    assert final["needs_attention"]["reason"] == "denied_review"
    feed = outcomes_for(billing, order["id"])
    assert [o["outcome"] for o in feed] == ["denied"]
    assert feed[0]["denial_reason"]["code"] == "0F"
    assert "medically necessary" in feed[0]["denial_reason"]["text"].lower()
    assert feed[0]["auth_number"] is None


def test_inactive_coverage_is_a_coverage_problem_and_nothing_is_submitted(
        system, clinician, billing):
    member = unique_member("SIM-INACTIVE")
    order = post_order(clinician, order_body(member))
    final = settle(clinician, order["id"], "coverage_problem")
    det = final["lines"][0]["determination"]
    assert det["covered"] == "not-covered" and det["pa_needed"] is None
    assert det["reasons"][0]["code"] == "no-active-coverage"
    assert final["needs_attention"]["reason"] == "coverage_problem"
    assert final["eligibility"]["status"] == "inactive"
    assert [s["kind"] for s in system.submissions(member)] == ["eligibility"]
    assert outcomes_for(billing, order["id"]) == []


def test_office_visit_needs_no_auth_and_is_never_submitted(system, clinician, billing):
    member = unique_member("SIM-APPROVE")
    body = order_body(member, lines=[{"sequence": 1, "code_system": "CPT", "code": "99213",
                                      "quantity": 1, "service_start": "2026-12-01"}])
    order = post_order(clinician, body)
    assert order["lines"][0]["determination"]["pa_needed"] == "no-auth"
    final = settle(clinician, order["id"], "no_auth_required")
    assert final["cases"] == []
    assert [s["kind"] for s in system.submissions(member)] == ["eligibility"]
    feed = outcomes_for(billing, order["id"])
    assert [(o["outcome"], o["case_id"]) for o in feed] == [("no_auth_required", None)]


def test_pended_order_is_approved_by_the_payers_notification(system, clinician, billing):
    member = unique_member("SIM-PEND")
    order = post_order(clinician, order_body(member))
    pended = settle(clinician, order["id"], "in_review")
    final = settle(clinician, order["id"], "approved", timeout=60)
    events = [e["event"] for e in final["timeline"]]
    assert "case_pended" in events and "case_approved" in events
    feed = outcomes_for(billing, order["id"])
    assert [o["outcome"] for o in feed] == ["approved"]
    assert pended["cases"][0]["id"] == final["cases"][0]["id"]


def test_worker_killed_mid_submission_still_submits_exactly_once(system, clinician, billing):
    """F1b: SIGKILL after the payer accepted, before our commit. The next worker asks the
    payer ($inquire) and takes its answer instead of sending the request again."""
    system.kill("worker")
    system.start("worker", "worker", "--threads", "2",
                 env={"AUTHSVC_FP_AFTER_PAYER_BEFORE_COMMIT": "sleep:30"})
    member = unique_member("SIM-APPROVE")
    order = post_order(clinician, order_body(member))

    def submitted():  # type: ignore[no-untyped-def]
        return [s for s in system.submissions(member) if s["kind"] == "submit"]

    wait_for(submitted, 30)
    system.kill("worker")
    system.start("worker", "worker", "--threads", "4")
    final = settle(clinician, order["id"], "approved", timeout=90)
    subs = system.submissions(member)
    accepted = [s for s in subs if s["kind"] == "submit" and s["accepted"]]
    assert len(accepted) == 1
    assert accepted[0]["claim_id"] == final["cases"][0]["id"]
    assert any(s["kind"] == "inquire" for s in subs), "the payer was asked before resending"
    assert [s["kind"] for s in subs].count("submit") == 1
    assert [o["outcome"] for o in outcomes_for(billing, order["id"])] == ["approved"]
