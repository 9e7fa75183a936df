"""Every simulator scenario end to end on real processes (issue 5): the case lifecycle as a
coordinator and a billing system see it over HTTP, checked against the payer's own ledger."""

from __future__ import annotations

import subprocess
import sys

import pytest
import redis

from authsvc.domain import clock
from tests.conftest import order_body
from tests.e2e.harness import Http, System, wait_for
from tests.e2e.test_spine import outcomes_for, post_order, settle, unique_member

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def system(database_url, redis_url, tmp_path_factory):
    sysm = System(database_url, redis_url, tmp_path_factory.mktemp("scenarios"),
                  extra_env={"AUTHSVC_SIM_SLOW_SECONDS": "3"})
    try:
        yield sysm.up()
    finally:
        sysm.stop()


@pytest.fixture(scope="module")
def started_at() -> str:
    return clock.isoformat(clock.now())


@pytest.fixture(scope="module")
def coordinator(system, started_at) -> Http:
    return Http(system.api, system.token("scenario-clinic", "coordinator"))


@pytest.fixture(scope="module")
def billing(system) -> Http:
    return Http(system.api, system.token("scenario-clinic", "billing"))


def lines(*specs: tuple[str, int]) -> list[dict]:
    return [{"sequence": i + 1, "code_system": "CPT", "code": code, "quantity": qty,
             "service_start": "2026-12-01", "service_end": "2026-12-31"}
            for i, (code, qty) in enumerate(specs)]


def accepted_submits(system: System, member: str) -> list[dict]:
    return [s for s in system.submissions(member) if s["kind"] == "submit" and s["accepted"]]


def test_partial_approval_decides_per_line(system, coordinator, billing):
    member = unique_member("SIM-PARTIAL")
    order = post_order(coordinator, order_body(member, lines=lines(("72148", 1), ("72149", 1))))
    final = settle(coordinator, order["id"], "partially_approved")
    assert final["needs_attention"]["reason"] == "denied_review"
    feed = sorted(outcomes_for(billing, order["id"]), key=lambda o: o["sequence"])
    assert [(o["sequence"], o["outcome"]) for o in feed] == [(1, "approved"), (2, "denied")]
    assert feed[0]["auth_number"] and feed[1]["denial_reason"]["code"]


def test_payer_modification_reports_the_granted_quantity(system, coordinator, billing):
    member = unique_member("SIM-MODIFY")
    order = post_order(coordinator, order_body(member, lines=lines(("97530", 5))))
    settle(coordinator, order["id"], "modified")
    feed = outcomes_for(billing, order["id"])
    assert [(o["outcome"], o["authorized_quantity"]) for o in feed] == [("modified", 2)]


def test_flaky_payer_is_retried_with_the_same_identifier_and_accepts_once(
        system, coordinator, billing):
    member = unique_member("SIM-FLAKY")
    order = post_order(coordinator, order_body(member))
    final = settle(coordinator, order["id"], "approved")
    submits = [s for s in system.submissions(member) if s["kind"] == "submit"]
    assert [s["http_status"] for s in submits] == [503, 503, 200]
    assert {s["claim_id"] for s in submits} == {final["cases"][0]["id"]}
    assert len(accepted_submits(system, member)) == 1
    events = [e["event"] for e in final["timeline"]]
    assert events.count("submission_retry_scheduled") == 2
    assert [o["outcome"] for o in outcomes_for(billing, order["id"])] == ["approved"]


def test_rejection_needs_a_person_and_emits_nothing(system, coordinator, billing):
    member = unique_member("SIM-REJECT")
    order = post_order(coordinator, order_body(member))
    final = settle(coordinator, order["id"], "needs_attention")
    assert final["cases"][0]["state"] == "rejected"
    assert final["needs_attention"]["reason"] == "rejected"
    assert outcomes_for(billing, order["id"]) == []


def test_member_not_found_then_fixed_by_the_coordinator(system, coordinator, billing):
    member = unique_member("SIM-NOTFOUND")
    order = post_order(coordinator, order_body(member))
    problem = settle(coordinator, order["id"], "coverage_problem")
    det = problem["lines"][0]["determination"]
    assert det["covered"] == "indeterminate" and det["reasons"][0]["code"] == "no-member-found"
    assert [s["kind"] for s in system.submissions(member)] == ["eligibility"]
    fixed_member = unique_member("SIM-APPROVE")
    status, _, body = coordinator.request("POST", f"/v1/orders/{order['id']}/coverage",
                                          {"member_id": fixed_member})
    assert status == 200 and body["status"] == "checking_eligibility"
    assert body["lines"][0]["determination"]["pa_needed"] == "auth-needed"
    final = settle(coordinator, order["id"], "approved")
    assert "coverage_updated" in [e["event"] for e in final["timeline"]]
    assert len(accepted_submits(system, fixed_member)) == 1


def test_slow_payer_does_not_hold_up_other_orders(system, coordinator):
    slow = post_order(coordinator, order_body(unique_member("SIM-SLOW")))
    quick = post_order(coordinator, order_body(unique_member("SIM-APPROVE")))
    settle(coordinator, quick["id"], "approved", timeout=30)
    _, _, still = coordinator.request("GET", f"/v1/orders/{slow['id']}")
    assert still["status"] in ("checking_eligibility", "in_review", "approved")
    settle(coordinator, slow["id"], "approved", timeout=60)


def test_silent_payer_gets_a_deadline_and_cancelling_tells_the_payer(
        system, coordinator, billing):
    member = unique_member("SIM-SILENT")
    body = order_body(member)
    body["urgency"] = "expedited"
    order = post_order(coordinator, body)

    def pended():  # type: ignore[no-untyped-def]
        _, _, o = coordinator.request("GET", f"/v1/orders/{order['id']}")
        return o if o["cases"] and o["cases"][0]["state"] == "pended" else None

    o = wait_for(pended, 60)
    assert o["cases"][0]["decision_due_at"] is not None
    status, _, cancelled = coordinator.request("POST", f"/v1/orders/{order['id']}/cancel")
    assert status == 200 and cancelled["status"] == "cancelled"
    wait_for(lambda: [s for s in system.submissions(member) if s["kind"] == "cancel"], 30)
    assert outcomes_for(billing, order["id"]) == []
    status, _, again = coordinator.request("POST", f"/v1/orders/{order['id']}/cancel")
    assert status == 200


def test_extension_supersedes_the_approval_and_versions_the_feed(system, coordinator, billing):
    member = unique_member("SIM-APPROVE")
    order = post_order(coordinator, order_body(member, lines=lines(("97530", 6))))
    settle(coordinator, order["id"], "approved")
    status, _, case = coordinator.request(
        "POST", f"/v1/orders/{order['id']}/extensions",
        {"lines": [{"sequence": 1, "quantity": 10, "service_end": "2027-02-28"}]})
    assert status == 201 and case["kind"] == "extension"

    def extended():  # type: ignore[no-untyped-def]
        feed = outcomes_for(billing, order["id"])
        return feed if len(feed) == 2 else None

    feed = wait_for(extended, 60)
    assert [(o["version"], o["outcome"], o["authorized_quantity"]) for o in feed] == [
        (1, "approved", 6), (2, "approved", 10)]
    _, _, final = coordinator.request("GET", f"/v1/orders/{order['id']}")
    assert [c["state"] for c in final["cases"]] == ["superseded", "approved"]
    assert final["status"] == "approved"
    missing = coordinator.request("POST", f"/v1/orders/{order['id']}/extensions",
                                  {"lines": [{"sequence": 7, "quantity": 3,
                                              "service_end": "2027-01-31"}]})
    assert missing[0] == 409


def test_a_flushed_redis_delays_but_loses_nothing(system, coordinator, billing, redis_url):
    system.kill("worker")
    members = [unique_member("SIM-APPROVE") for _ in range(3)]
    orders = [post_order(coordinator, order_body(m)) for m in members]
    r = redis.Redis.from_url(redis_url)
    wait_for(lambda: r.hlen(f"{system.namespace}:default.msgs") >= 3, 20)
    for key in r.scan_iter(f"{system.namespace}:*"):
        r.delete(key)  # every queued message is gone, as after FLUSHALL
    r.close()
    system.start("worker", "worker", "--threads", "4")
    for order, member in zip(orders, members, strict=True):
        settle(coordinator, order["id"], "approved", timeout=90)
        assert len(accepted_submits(system, member)) == 1
        assert [o["outcome"] for o in outcomes_for(billing, order["id"])] == ["approved"]


def case_view(http: Http, case_id: str) -> dict:
    status, _, view = http.request("GET", f"/v1/cases/{case_id}")
    assert status == 200, view
    return view


def case_settles(http: Http, case_id: str, state: str, timeout: float = 60) -> dict:
    return wait_for(lambda: (lambda v: v if v["state"] == state else None)(
        case_view(http, case_id)), timeout)


def attach_pdf(system: System, token: str, case_id: str) -> int:
    """POST a small PDF as multipart/form-data; returns the HTTP status."""
    import urllib.error
    import urllib.request
    import uuid

    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="report.pdf"\r\nContent-Type: application/pdf\r\n\r\n').encode() \
        + b"%PDF-1.7\nclinical notes\n%%EOF\n" + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(
        f"{system.api}/v1/cases/{case_id}/attachments", data=body, method="POST",
        headers={"Authorization": f"Bearer {token}",
                 "Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_denial_appealed_and_overturned_by_the_payer(system, coordinator, billing):
    member = unique_member("SIM-OVERTURN")
    order = post_order(coordinator, order_body(member))
    denied = settle(coordinator, order["id"], "denied")
    denied_id = denied["cases"][0]["id"]
    assert denied["needs_attention"]["reason"] == "denied_review"
    status, _, refused = coordinator.request("POST", f"/v1/cases/{denied_id}/appeal",
                                             {"kind": "immediate"})
    assert status == 422  # an immediate appeal needs the level of care
    status, _, appeal = coordinator.request("POST", f"/v1/cases/{denied_id}/appeal", {
        "kind": "standard", "reason": "MRI shows progression since the first request"})
    assert status == 201 and appeal["kind"] == "appeal_standard"
    assert appeal["related_case_id"] == denied_id
    view = case_settles(coordinator, appeal["id"], "approved")
    assert view["payer_received_at"] and view["decision_due_at"]
    assert view["lines"][0]["decision"]["auth_number"]
    final = settle(coordinator, order["id"], "approved")
    assert {c["id"]: c["state"] for c in final["cases"]} == {
        denied_id: "superseded", appeal["id"]: "approved"}
    assert final["needs_attention"] is None
    feed = outcomes_for(billing, order["id"])
    assert [(o["version"], o["outcome"], o["case_id"]) for o in feed] == [
        (1, "denied", denied_id), (2, "approved", appeal["id"])]
    assert feed[1]["auth_number"] and feed[0]["auth_number"] is None
    # the payer saw two requests, each accepted once: the appeal is not a resend
    assert [s["claim_id"] for s in accepted_submits(system, member)] == [denied_id,
                                                                         appeal["id"]]
    events = [e["event"] for e in final["timeline"]]
    assert "case_appealed" in events and "case_superseded" in events


def test_upheld_appeal_leaves_the_order_denied(system, coordinator, billing):
    member = unique_member("SIM-DENY")
    order = post_order(coordinator, order_body(member))
    denied_id = settle(coordinator, order["id"], "denied")["cases"][0]["id"]
    status, _, appeal = coordinator.request("POST", f"/v1/cases/{denied_id}/appeal", {
        "kind": "immediate", "level_of_care": "inpatient", "reason": "worsening deficit"})
    assert status == 201 and appeal["kind"] == "appeal_immediate"
    view = case_settles(coordinator, appeal["id"], "denied")
    assert view["needs_attention"]["reason"] == "denied_review"
    assert case_view(coordinator, denied_id)["needs_attention"] is None  # one item, not two
    assert view["urgency"] == "expedited"
    assert view["lines"][0]["decision"]["denial_reason"]["code"] == "0F"
    _, _, final = coordinator.request("GET", f"/v1/orders/{order['id']}")
    assert final["status"] == "denied"
    assert [(o["version"], o["outcome"]) for o in outcomes_for(billing, order["id"])] == [
        (1, "denied"), (2, "denied")]
    assert coordinator.request("POST", f"/v1/cases/{appeal['id']}/appeal",
                               {"kind": "standard"})[0] == 201  # a second-level appeal


def test_rejection_fixed_with_a_document_then_resubmitted(system, coordinator, billing):
    member = unique_member("SIM-REJECT")
    order = post_order(coordinator, order_body(member))
    rejected = settle(coordinator, order["id"], "needs_attention")
    first = rejected["cases"][0]["id"]
    view = case_view(coordinator, first)
    assert view["state"] == "rejected"
    assert view["last_error"]["aaa_code"] == "15" and view["last_error"]["followup"] == "C"
    assert attach_pdf(system, coordinator.token, first) == 201  # the missing data
    status, _, again = coordinator.request("POST", f"/v1/cases/{first}/resubmit")
    assert status == 201 and again["kind"] == "resubmission"
    assert again["related_case_id"] == first
    case_settles(coordinator, again["id"], "approved")
    final = settle(coordinator, order["id"], "approved")
    assert {c["id"]: c["state"] for c in final["cases"]} == {
        first: "superseded", again["id"]: "approved"}
    assert final["needs_attention"] is None
    feed = outcomes_for(billing, order["id"])
    assert [(o["version"], o["outcome"], o["case_id"]) for o in feed] == [
        (1, "approved", again["id"])]
    assert [s["claim_id"] for s in accepted_submits(system, member)] == [again["id"]]
    assert [s["accepted"] for s in system.submissions(member) if s["kind"] == "submit"] == [
        False, True]


def test_resubmission_refused_when_the_payer_says_not_to(system, coordinator):
    member = unique_member("SIM-NORESUBMIT")
    order = post_order(coordinator, order_body(member))
    case_id = settle(coordinator, order["id"], "needs_attention")["cases"][0]["id"]
    assert case_view(coordinator, case_id)["last_error"]["followup"] == "N"
    status, _, body = coordinator.request("POST", f"/v1/cases/{case_id}/resubmit")
    assert status == 409 and body["current_state"] == "rejected"
    assert accepted_submits(system, member) == []


def test_contact_payer_then_the_phone_decision_reaches_the_feed(system, coordinator, billing):
    member = unique_member("SIM-CONTACT")
    order = post_order(coordinator, order_body(member))
    waiting = settle(coordinator, order["id"], "needs_attention")
    case_id = waiting["cases"][0]["id"]
    assert waiting["needs_attention"]["reason"] == "contact_payer"
    view = case_view(coordinator, case_id)
    assert view["state"] == "contact_payer"
    assert view["needs_attention"]["reason"] == "contact_payer"
    decision = view["lines"][0]["decision"]
    assert decision["review_action"] == "CT" and decision["outcome"] == "contact_payer"
    assert decision["denial_reason"]["code"] == "0V"
    assert "1-800-555-0199" in decision["denial_reason"]["text"]
    status, _, page = coordinator.request("GET", "/v1/cases?needs_attention=true&limit=200")
    assert case_id in [c["id"] for c in page["items"]]
    assert outcomes_for(billing, order["id"]) == []
    status, _, body = coordinator.request("POST", f"/v1/cases/{case_id}/decision", {
        "reference": "UM line, ref 55-1234", "received_via": "phone",
        "lines": [{"sequence": 1, "outcome": "approved", "auth_number": "PHONE-55-1234",
                   "valid_from": "2026-12-01", "valid_to": "2026-12-31"}]})
    assert status == 200, body
    final = settle(coordinator, order["id"], "approved")
    assert final["needs_attention"] is None
    recorded = [e for e in final["timeline"] if e["event"] == "decision_recorded"]
    assert recorded and recorded[0]["detail"]["received_via"] == "phone"
    feed = outcomes_for(billing, order["id"])
    assert [(o["version"], o["outcome"], o["auth_number"], o["authorized_quantity"])
            for o in feed] == [(1, "approved", "PHONE-55-1234", 1)]
    assert len(accepted_submits(system, member)) == 1


def test_reconcile_finds_nothing_lost_or_duplicated(system, started_at):
    """Runs last in this module: after every scenario above, `authsvc reconcile` checks the
    database and the payer's ledger (reliability.md I2–I7) and finds no violation."""
    out = subprocess.run(
        [sys.executable, "-m", "authsvc.cli", "reconcile", "--since", started_at,
         "--sim-url", system.sim, "--settle-seconds", "5"],
        env=system.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 violation(s)" in out.stdout
