"""F16 on real processes: a worker whose clock is ten minutes ahead or behind runs beside a
punctual one (skewed with AUTHSVC_TEST_CLOCK_OFFSET_SECONDS under AUTHSVC_TESTING=1, as
`faketime '+10m'` would skew it, without libfaketime). Leases and due times are taken and
checked by the database's clock, so neither worker takes over a live lease and the payer
receives each request once; the payer's receipt is dated by the database, not the worker.

Its own module: a system left running by another module's fixture on the same database would
sweep this one's work into its own queue."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time

import pytest

from authsvc.domain import clock
from tests.conftest import order_body
from tests.e2e.harness import Http, System, wait_for
from tests.e2e.test_spine import post_order, settle, unique_member

pytestmark = pytest.mark.e2e


def parse(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def duplicate_submit(system: System, redis_url: str, case_id: str, copies: int) -> None:
    """Publish `submit_case` again for a case (a relay double-publish, F17/F20)."""
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=redis_url, namespace=system.namespace)
    try:
        for _ in range(copies):
            broker.enqueue(dramatiq.Message(queue_name="default", actor_name="submit_case",
                                            args=(case_id,), kwargs={}, options={}))
    finally:
        broker.close()


def submitting_case(http: Http, order_id: str) -> str:
    def case_id():  # type: ignore[no-untyped-def]
        _, _, o = http.request("GET", f"/v1/orders/{order_id}")
        cases = o["cases"]
        return cases[0]["id"] if cases and cases[0]["state"] == "submitting" else None

    return wait_for(case_id, 30, interval=0.1)


@pytest.mark.parametrize("skew", [600, -600])
def test_worker_clock_skew_steals_no_lease(database_url, redis_url, tmp_path, skew):
    """A worker ten minutes ahead (or behind) runs beside a punctual one. While a slow payer
    holds a submission, duplicate messages for it reach both: the lease, taken and checked by
    the database's clock, stops them all, so the payer receives the request exactly once.
    Behind, the skewed worker is the one holding the lease (its lease must not look expired
    to the punctual one); ahead, it is the one receiving the duplicates."""
    system = System(database_url, redis_url, tmp_path, extra_env={
        "AUTHSVC_TESTING": "1", "AUTHSVC_SIM_SLOW_SECONDS": "10", "AUTHSVC_LEASE_SECONDS": "30"})
    skewed_env = {"AUTHSVC_TEST_CLOCK_OFFSET_SECONDS": str(skew)}
    try:
        system.start("payer-sim", "payer-sim")
        system.start("api", "serve", "--workers", "2")
        system.start("scheduler", "scheduler")
        first, second = ("worker", "skewed") if skew > 0 else ("skewed", "worker")
        system.start(first, "worker", "--threads", "4",
                     env=skewed_env if first == "skewed" else None)
        system.wait_http(f"{system.sim}/sim/submissions")
        system.wait_http(f"{system.api}/readyz")
        since = clock.isoformat(clock.now())
        http = Http(system.api, system.token("skew-clinic", "coordinator"))
        member = unique_member("SIM-SLOW")
        order = post_order(http, order_body(member))
        case_id = submitting_case(http, order["id"])  # the first worker holds its lease
        system.start(second, "worker", "--threads", "4",
                     env=skewed_env if second == "skewed" else None)
        time.sleep(2)  # the second worker is consuming
        duplicate_submit(system, redis_url, case_id, 12)
        final = settle(http, order["id"], "approved", timeout=60)
        ledger = system.submissions(member)
        submits = [s for s in ledger if s["kind"] == "submit"]
        assert [(s["claim_id"], s["accepted"]) for s in submits] == [(case_id, True)]
        # no lease was taken over: a worker that had would have asked the payer ($inquire)
        assert [s["kind"] for s in ledger] == ["eligibility", "submit"]
        _, _, view = http.request("GET", f"/v1/cases/{case_id}")
        received = parse(view["payer_received_at"])
        assert abs((received - clock.now()).total_seconds()) < 60  # the database's time
        assert parse(view["decision_due_at"]) == received + dt.timedelta(hours=168)
        assert [e["event"] for e in final["timeline"]].count("case_approved") == 1
        out = subprocess.run(
            [sys.executable, "-m", "authsvc.cli", "reconcile", "--since", since,
             "--sim-url", system.sim, "--settle-seconds", "5"],
            env=system.env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        system.stop()
