"""F16 on real processes: the payer's clock is minutes off ours (the simulator's clock is
skewed through `POST /sim/clock`, no libfaketime needed). Signed notifications are accepted at
±4 minutes and refused at ±6 minutes in both directions (Standard Webhooks' 5-minute window);
a refused one changes nothing and the `$inquire` fallback settles the case. Deadlines run from
when *we* received the payer's answer, whatever time the payer's documents state."""

from __future__ import annotations

import datetime as dt

import pytest

from authsvc.domain import clock
from tests.conftest import order_body
from tests.e2e.harness import Http, System, wait_for
from tests.e2e.test_spine import outcomes_for, post_order, settle, unique_member

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def system(database_url, redis_url, tmp_path_factory):
    sysm = System(database_url, redis_url, tmp_path_factory.mktemp("skew"))
    try:
        yield sysm.up()
    finally:
        sysm.stop()


def skew_payer(system: System, seconds: int) -> None:
    status, _, body = Http(system.sim).request("POST", "/sim/clock", {"offset_seconds": seconds})
    assert status == 200 and body["offset_seconds"] == seconds


def notifications(system: System, case_id: str) -> list[dict]:
    _, _, body = Http(system.sim).request("GET", f"/sim/notifications?claim_id={case_id}")
    return body["items"]


def parse(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def pended_order(http: Http, member: str) -> tuple[dict, dt.datetime, str]:
    before = clock.now()
    order = post_order(http, order_body(member))

    def case_id():  # type: ignore[no-untyped-def]
        _, _, o = http.request("GET", f"/v1/orders/{order['id']}")
        return o["cases"][0]["id"] if o["cases"] else None

    return order, before, wait_for(case_id, 30)


def test_payer_clock_skew(system):
    http = Http(system.api, system.token("skew-clinic", "coordinator"))
    billing = Http(system.api, system.token("skew-clinic", "billing"))
    try:
        accepted = []
        for seconds in (240, -240):  # within the window: the notification decides the case
            skew_payer(system, seconds)
            order, before, case_id = pended_order(http, unique_member("SIM-PEND"))
            settle(http, order["id"], "approved", timeout=30)  # long before the 60 s poll
            sent = notifications(system, case_id)
            assert [n["http_status"] for n in sent] == [200]
            assert abs(sent[0]["webhook_timestamp"] - clock.now().timestamp() - seconds) < 30
            accepted.append((order, before, case_id))
        refused = []
        for seconds in (360, -360):  # outside it, either way: 401, nothing applied
            skew_payer(system, seconds)
            order, before, case_id = pended_order(http, unique_member("SIM-PEND"))
            sent = wait_for(lambda c=case_id: (lambda n: n if len(n) == 3 else None)(
                notifications(system, c)), 30)
            assert [n["http_status"] for n in sent] == [401, 401, 401]
            _, _, o = http.request("GET", f"/v1/orders/{order['id']}")
            assert o["status"] == "in_review" and o["cases"][0]["state"] == "pended"
            refused.append((order, before, case_id))
    finally:
        skew_payer(system, 0)
    for order, _, _ in refused:  # the sparse $inquire fallback (60 s) settles them
        settle(http, order["id"], "approved", timeout=120)
    for order, before, case_id in accepted + refused:
        _, _, view = http.request("GET", f"/v1/cases/{case_id}")
        received = parse(view["payer_received_at"])
        assert before <= received <= clock.now()  # our clock, not the payer's
        assert parse(view["decision_due_at"]) == received + dt.timedelta(hours=168)
        assert view["overdue"] is False and view["at_risk"] is False
        feed = outcomes_for(billing, order["id"])
        assert [(o["outcome"], o["version"]) for o in feed] == [("approved", 1)]
        assert feed[0]["valid_to"] >= "2026-12-31"  # the payer's period, not shortened

