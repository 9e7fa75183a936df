"""F16 (reliability.md): a worker whose clock is ten minutes off. Leases, due times and the
times a step stores come from the database's clock, so a worker running ahead takes no live
lease and polls nothing early, and one running behind neither stalls due polls nor dates the
payer's receipt (hence the CMS deadline) in the past. The worker's clock is skewed with the
injectable clock, as libfaketime would skew the process."""

from __future__ import annotations

import datetime as dt
import json
import urllib.request
import uuid

import pytest

from authsvc.adapters.db import repo
from authsvc.domain import clock
from authsvc.service_layer import payer_work
from tests.integration.test_payer_work import drive, new_case, sim_factory, with_sim

pytestmark = pytest.mark.integration
__all__ = ["sim_factory"]
SKEW = dt.timedelta(minutes=10)


class OffsetClock:
    """The system clock shifted, as `faketime '+10m'` shifts a process."""

    def __init__(self, offset: dt.timedelta):
        self.offset = offset

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self.offset


@pytest.fixture()
def skewed():  # type: ignore[no-untyped-def]
    installed = []

    def skew(offset: dt.timedelta) -> None:
        installed.append(clock.install(OffsetClock(offset)))

    yield skew
    if installed:
        clock.install(installed[0])


def real_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def submissions(sim, member: str) -> list[dict]:  # type: ignore[no-untyped-def]
    with urllib.request.urlopen(f"{sim.url}/sim/submissions?member_id={member}") as resp:
        return json.load(resp)["items"]


def test_worker_ahead_takes_no_live_lease_and_polls_nothing_early(
        services, client, tokens, sim_factory, skewed):
    sim = sim_factory()
    svc = with_sim(services, sim)
    member = f"SIM-APPROVE-{uuid.uuid4().hex[:6]}"
    case_id = new_case(svc, client, tokens, member)
    held_until = real_now() + dt.timedelta(seconds=60)
    with svc.engine.begin() as conn:  # another worker is sending it right now
        repo.update_case(conn, case_id, state="submitting", claimed_until=held_until,
                         attempts=1)
    skewed(+SKEW)
    payer_work.submit_case(svc, case_id)  # by its own clock the lease ran out 9 minutes ago
    with svc.engine.connect() as conn:
        case = repo.case_row(conn, case_id)
        exchanges = repo.exchanges_of_case(conn, case_id)
    assert case["state"] == "submitting" and case["claimed_until"] == held_until
    assert case["attempts"] == 1 and exchanges == []
    assert submissions(sim, member) == []

    silent = f"SIM-SILENT-{uuid.uuid4().hex[:6]}"
    clock.install(clock.SystemClock())
    pended_id = new_case(svc, client, tokens, silent)
    pended = drive(svc, pended_id)
    assert pended["state"] == "pended" and pended["next_poll_at"] > real_now()
    skewed(+SKEW)
    payer_work.poll_case(svc, pended_id)  # due in a minute, not now: nothing is asked
    with svc.engine.connect() as conn:
        after = repo.case_row(conn, pended_id)
    assert [s["kind"] for s in submissions(sim, silent)] == ["submit"]
    assert after["next_poll_at"] == pended["next_poll_at"] and after["claimed_until"] is None


def test_worker_behind_polls_when_due_and_dates_receipt_by_the_database(
        services, client, tokens, sim_factory, skewed):
    sim = sim_factory()
    svc = with_sim(services, sim)
    silent = f"SIM-SILENT-{uuid.uuid4().hex[:6]}"
    case_id = new_case(svc, client, tokens, silent)
    skewed(-SKEW)
    before = real_now()
    case = drive(svc, case_id)
    after = real_now()
    assert case["state"] == "pended"
    # received now by the database's clock, not ten minutes ago by the worker's
    assert before - dt.timedelta(seconds=1) <= case["payer_received_at"] <= after
    assert case["decision_due_at"] == case["payer_received_at"] + dt.timedelta(hours=168)
    assert case["next_poll_at"] > after  # the first poll is ahead, not already overdue
    with svc.engine.begin() as conn:
        repo.update_case(conn, case_id, next_poll_at=real_now() - dt.timedelta(seconds=1))
    payer_work.poll_case(svc, case_id)  # due by the database's clock: it is asked now
    with svc.engine.connect() as conn:
        polled = repo.case_row(conn, case_id)
    assert [s["kind"] for s in submissions(sim, silent)] == ["submit", "inquire"]
    assert polled["claimed_until"] is None and polled["next_poll_at"] > real_now()
    assert polled["state"] == "pended"
    assert polled["payer_received_at"] == case["payer_received_at"]  # not reset by a poll


def test_work_stored_due_now_is_claimable_at_once(services):
    """The database clock keeps microseconds on both backends: a delivery stored due at
    12:00:00.123456 is due for a claim made right after (SQLite's own 'now' has only
    milliseconds and said 12:00:00.123: not yet due, so the claim was skipped)."""
    from authsvc.adapters.db import repo_cases as rc
    from authsvc.domain import ids

    with services.engine.begin() as conn:
        sub_id = ids.new_id("sub")
        rc.insert_subscription(conn, {"id": sub_id, "org_id": "org-a",
                                      "url": "https://hooks.example.org/in",
                                      "events": ["outcome.created"],
                                      "secret": "whsec_" + "QUFB" * 8,
                                      "created_at": dt.datetime.now(dt.UTC)})
    for _ in range(30):
        due = dt.datetime.now(dt.UTC)
        delivery_id = ids.new_id("dlv")
        with services.engine.begin() as conn:
            rc.insert_deliveries(conn, [{
                "id": delivery_id, "org_id": "org-a", "subscription_id": sub_id,
                "event_type": "outcome.created", "event_id": ids.new_id("msg"),
                "payload": {"type": "outcome.created"}, "status": "pending", "attempts": 0,
                "next_attempt_at": due, "created_at": due}])
        with services.engine.begin() as conn:
            now = repo.db_now(conn)
            assert now >= due
            assert rc.claim_delivery(conn, delivery_id, now, dt.timedelta(seconds=30))
