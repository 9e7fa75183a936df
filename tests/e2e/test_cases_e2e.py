"""Coordinators and billing on real processes: a signed `outcome.created` webhook reaches a
real receiver (delivered by the worker's `deliver_webhook` actor), the worklist shows a
decided case, and coordinator actions drive the payer simulator (appeal, cancel)."""

from __future__ import annotations

import http.server
import threading
import uuid

import pytest
from standardwebhooks import Webhook

from tests.conftest import free_port, order_body
from tests.e2e.harness import Http, System, wait_for

pytestmark = pytest.mark.e2e
RECEIVER_PORT = free_port()


class Receiver:
    def __init__(self, port: int) -> None:
        self.secret: str | None = None
        self.fail_first = 0
        self.received: list[dict] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                try:
                    payload = Webhook(owner.secret).verify(body, dict(self.headers))
                except Exception as exc:  # noqa: BLE001
                    payload = {"invalid": repr(exc)}
                status = 200
                if owner.fail_first > 0:
                    owner.fail_first -= 1
                    status = 500
                owner.received.append({"id": self.headers["webhook-id"], "payload": payload,
                                       "status": status})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver():
    rec = Receiver(RECEIVER_PORT)
    yield rec
    rec.close()


@pytest.fixture(scope="module")
def system(database_url, redis_url, tmp_path_factory, receiver):
    sysm = System(database_url, redis_url, tmp_path_factory.mktemp("e2e-cases"), extra_env={
        "AUTHSVC_TESTING": "1", "AUTHSVC_WEBHOOK_ALLOWLIST": f"127.0.0.1:{RECEIVER_PORT}"})
    try:
        yield sysm.up()
    finally:
        sysm.stop()


@pytest.fixture(scope="module")
def org() -> str:
    return f"e2e-cases-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def coordinator(system, org) -> Http:
    return Http(system.api, system.token(org, "coordinator"))


@pytest.fixture(scope="module")
def billing(system, org) -> Http:
    return Http(system.api, system.token(org, "billing"))


def post_order(http: Http, member: str) -> dict:
    status, _, order = http.request("POST", "/v1/orders", order_body(member),
                                    {"Idempotency-Key": uuid.uuid4().hex})
    assert status == 201, order
    return order


def settled(http: Http, order_id: str, want: str) -> dict:
    def done():  # type: ignore[no-untyped-def]
        _, _, order = http.request("GET", f"/v1/orders/{order_id}")
        return order if order["status"] == want else None

    return wait_for(done, 60)


def test_outcome_webhook_is_signed_and_retried(system, coordinator, billing, receiver):
    status, _, sub = billing.request("POST", "/v1/subscriptions", {
        "url": f"http://127.0.0.1:{RECEIVER_PORT}/hook", "events": ["outcome.created"]},
        {"Idempotency-Key": uuid.uuid4().hex})
    assert status == 201, sub
    receiver.secret = sub["secret"]
    receiver.fail_first = 1
    member = f"SIM-APPROVE-{uuid.uuid4().hex[:8].upper()}"
    order = post_order(coordinator, member)
    settled(coordinator, order["id"], "approved")

    def delivered():  # type: ignore[no-untyped-def]
        ok = [r for r in receiver.received if r["status"] == 200
              and r["payload"].get("data", {}).get("order_id") == order["id"]]
        return ok or None

    [ok] = wait_for(delivered, 60)
    assert ok["payload"]["type"] == "outcome.created"
    assert ok["payload"]["data"]["outcome"] == "approved"
    attempts = [r for r in receiver.received if r["id"] == ok["id"]]
    assert [r["status"] for r in attempts] == [500, 200]  # same webhook-id on the retry
    _, _, log = billing.request("GET", f"/v1/subscriptions/{sub['id']}/deliveries")
    assert log["items"][0]["status"] == "delivered" and log["items"][0]["attempts"] == 2


def test_denial_then_appeal_reaches_the_payer(system, coordinator):
    member = f"SIM-DENY-{uuid.uuid4().hex[:8].upper()}"
    order = post_order(coordinator, member)
    final = settled(coordinator, order["id"], "denied")
    case_id = final["cases"][0]["id"]
    status, _, page = coordinator.request("GET", "/v1/cases?needs_attention=true&limit=200")
    assert status == 200
    mine = [c for c in page["items"] if c["id"] == case_id]
    assert mine and mine[0]["needs_attention"]["reason"] == "denied_review"
    status, _, conflict = coordinator.request("POST", f"/v1/cases/{case_id}/cancel")
    assert status == 409 and conflict["current_state"] == "denied"
    status, _, appeal = coordinator.request("POST", f"/v1/cases/{case_id}/appeal", {
        "kind": "standard", "reason": "new imaging shows progression"})
    assert status == 201, appeal

    def answered():  # type: ignore[no-untyped-def]
        _, _, view = coordinator.request("GET", f"/v1/cases/{appeal['id']}")
        return view if view["state"] not in ("ready_to_submit", "submitting") else None

    view = wait_for(answered, 60)
    assert view["kind"] == "appeal_standard" and view["payer_received_at"]
    claims = {s["claim_id"] for s in system.submissions(member)
              if s["kind"] == "submit" and s["accepted"]}
    assert claims == {case_id, appeal["id"]}


def test_withdrawing_an_approval_tells_the_payer(system, coordinator, billing):
    member = f"SIM-APPROVE-{uuid.uuid4().hex[:8].upper()}"
    order = post_order(coordinator, member)
    final = settled(coordinator, order["id"], "approved")
    case_id = final["cases"][0]["id"]
    status, _, view = coordinator.request("POST", f"/v1/cases/{case_id}/cancel")
    assert status == 200 and view["state"] == "cancelled"
    wait_for(lambda: [s for s in system.submissions(member) if s["kind"] == "cancel"], 60)
    items, after = [], None
    while True:
        q = "/v1/outcomes?limit=200" + (f"&after={after}" if after else "")
        _, _, page = billing.request("GET", q)
        items += page["items"]
        if not page["items"]:
            break
        after = page["next_cursor"]
    mine = [(o["outcome"], o["version"]) for o in items if o["order_id"] == order["id"]]
    assert mine == [("approved", 1), ("cancelled", 2)]
