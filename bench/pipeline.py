"""Pipeline benchmark: N orders through the real API, workers (2 processes), scheduler and
payer simulator on PostgreSQL + Redis, to a terminal state.

    .venv/bin/python -m bench.pipeline [--orders 10000] [--chaos]

Prints one JSON line: orders/s to a terminal state, p50/p95 time to terminal, worker
messages/s, `lost` and `duplicate_submissions`, and the Dramatiq drain rate of no-op
messages measured in the same run with the same worker processes and threads.
`--chaos` (what `bench/chaos.py` runs) adds random SIGKILLs of workers, the scheduler and
the API, and one Redis flush, while the orders flow.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from typing import Any

import redis
import sqlalchemy as sa

from bench.intake import (
    Cleanup,
    create_database,
    free_port,
    log,
    run_cli,
    start,
    wait_http,
)

TERMINAL = ("approved", "denied", "partially_approved", "modified", "no_auth_required",
            "coverage_problem", "cancelled", "needs_attention")
MIX = [("SIM-APPROVE", "72148", 55), ("SIM-DENY", "72148", 10), ("SIM-APPROVE", "99213", 15),
       ("SIM-PEND", "72148", 5), ("SIM-PARTIAL", "72148", 5), ("SIM-INACTIVE", "72148", 5),
       ("SIM-MODIFY", "97530", 5)]


def order(i: int) -> dict[str, Any]:
    prefix, code = random.choices([(p, c) for p, c, _ in MIX], [w for _, _, w in MIX])[0]
    return {
        "external_id": f"BENCH-{i}", "urgency": random.choice(["standard", "expedited"]),
        "patient": {"mrn": f"MRN-{i % 5000:05d}", "given_name": "Pat", "family_name": "Bench",
                    "birth_date": "1970-05-05", "sex": "female"},
        "coverage": {"payer_id": "demo", "member_id": f"{prefix}-{i:07d}"},
        "requester": {"npi": "1003000126"}, "performer": {"npi": "1245319599"},
        "place_of_service": "22", "diagnoses": ["M54.50"],
        "lines": [{"sequence": 1, "code_system": "CPT", "code": code,
                   "quantity": 4 if code == "97530" else 1, "service_start": "2026-12-01",
                   "service_end": "2026-12-31"}],
    }


def post_all(port: int, token: str, n: int, threads: int = 8, offset: int = 0) -> int:
    """POST n orders; 5xx and connection errors are retried with the same key."""
    counter = iter(range(offset, offset + n))
    lock = threading.Lock()
    failures = Counter()

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            body = json.dumps(order(i)).encode()
            key = uuid.uuid4().hex
            for _attempt in range(60):
                try:
                    conn.request("POST", "/v1/orders", body, {
                        "Authorization": f"Bearer {token}", "Content-Type": "application/json",
                        "Idempotency-Key": key})
                    resp = conn.getresponse()
                    resp.read()
                    if resp.status == 201:
                        break
                    failures[resp.status] += 1
                except (OSError, http.client.HTTPException):
                    failures["conn"] += 1
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                time.sleep(0.5)
        conn.close()

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    if failures:
        log(f"intake retries: {dict(failures)}")
    return n


def drain_rate(redis_url: str, namespace: str, n: int = 5000) -> float:
    """No-op messages per second through the same worker processes."""
    from dramatiq import Message
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=redis_url, namespace=namespace)
    r = redis.Redis.from_url(redis_url)
    started = time.monotonic()
    for i in range(n):
        broker.enqueue(Message(queue_name="default", actor_name="noop", args=(f"n{i}",),
                               kwargs={}, options={}))
    while r.hlen(f"{namespace}:default.msgs") > 0 and time.monotonic() - started < 300:
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    broker.close()
    r.close()
    return n / elapsed


def chaos_monkey(cleanup: Cleanup, procs: dict, env: dict, redis_url: str, namespace: str,
                 stop: threading.Event, kills: Counter) -> None:
    """Random SIGKILLs of workers, scheduler and API, and one Redis flush."""
    flushed = False
    while not stop.wait(random.uniform(4, 8)):
        victim = random.choice(["worker-1", "worker-2", "scheduler", "api"])
        proc = procs[victim]
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
        kills[victim] += 1
        time.sleep(1)
        procs[victim] = start(cleanup, victim, *command_for(victim, env))
        if not flushed and kills.total() >= 2:
            r = redis.Redis.from_url(redis_url)
            for key in r.scan_iter(f"{namespace}:*"):
                r.delete(key)
            r.close()
            kills["redis_flush"] += 1
            flushed = True


def command_for(name: str, env: dict) -> tuple[list[str], dict]:
    exe = [sys.executable, "-m", "authsvc.cli"]
    if name.startswith("worker"):
        return [*exe, "worker", "--threads", "4"], env
    if name == "scheduler":
        return [*exe, "scheduler"], env
    if name == "api":
        return [*exe, "serve", "--workers", "2"], env
    return [*exe, "payer-sim"], env


def backlog_phase(cleanup: Cleanup, procs: dict, env: dict, engine: sa.Engine, api_port: int,
                  token: str, args: argparse.Namespace) -> dict[str, Any]:
    """Worker throughput on a queued backlog: orders posted while the workers are stopped,
    then the workers start and every message they complete is counted until all are done."""
    n = max(200, args.orders // 5)
    for name in ("worker-1", "worker-2"):
        cleanup.stop_proc(procs[name])
    sql_published = "SELECT coalesce(sum(publish_count), 0) FROM outbox"
    with engine.connect() as conn:
        before = int(conn.execute(sa.text(sql_published)).scalar())
    post_all(api_port, token, n, offset=args.orders)
    while True:
        with engine.connect() as conn:
            waiting = conn.execute(sa.text(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL")).scalar()
        if not waiting:
            break
        time.sleep(0.2)
    for name in ("worker-1", "worker-2"):
        procs[name] = start(cleanup, name, *command_for(name, env))
    # The clock starts when the first message is done (the queue shrinks), not at process
    # start: a worker's boot (imports, connections: 1-2 s) is not message throughput, and
    # the no-op drain rate it is compared with is measured on running workers.
    r = redis.Redis.from_url(os.environ.get("AUTHSVC_BENCH_REDIS_URL",
                                            "redis://127.0.0.1:6379/0"))
    queued = f"{env['AUTHSVC_BROKER_NAMESPACE']}:default.msgs"
    depth = r.hlen(queued)
    boot_deadline = time.monotonic() + 60
    while r.hlen(queued) >= depth and time.monotonic() < boot_deadline:
        time.sleep(0.01)
    r.close()
    started = time.monotonic()
    while time.monotonic() - started < args.settle:
        with engine.connect() as conn:
            left = conn.execute(sa.text(
                "SELECT count(*) FROM orders WHERE NOT status = ANY(:s)"),
                {"s": list(TERMINAL)}).scalar()
        if not left:
            break
        time.sleep(0.2)
    elapsed = time.monotonic() - started
    with engine.connect() as conn:
        after = int(conn.execute(sa.text(sql_published)).scalar())
    return {"orders": n, "seconds": round(elapsed, 1), "messages": after - before,
            "messages_per_s": round((after - before) / elapsed, 1),
            "orders_per_s": round(n / elapsed, 1)}


def run(args: argparse.Namespace, cleanup: Cleanup) -> dict[str, Any]:
    admin = os.environ.get("AUTHSVC_BENCH_DATABASE_URL",
                           "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    redis_url = os.environ.get("AUTHSVC_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    db_name, db_url = create_database(admin)
    cleanup.drop_db = (admin, db_name)
    api_port, sim_port = free_port(), free_port()
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "AUTHSVC_DATABASE_URL": db_url, "AUTHSVC_REDIS_URL": redis_url,
           "AUTHSVC_VAR_DIR": str(cleanup.tmp / "var"),
           "AUTHSVC_PORT": str(api_port), "AUTHSVC_PUBLIC_URL": f"http://127.0.0.1:{api_port}",
           "AUTHSVC_SIM_PORT": str(sim_port), "AUTHSVC_SIM_URL": f"http://127.0.0.1:{sim_port}",
           "AUTHSVC_SIM_PEND_SECONDS": "2", "AUTHSVC_BROKER_NAMESPACE": namespace,
           "AUTHSVC_SIM_VALIDATE": "0",  # the payer stands in for another machine
           "AUTHSVC_LEASE_SECONDS": "20", "AUTHSVC_SWEEP_AFTER_SECONDS": "10",
           "AUTHSVC_RATE_LIMIT_TOKEN": "100000000/minute",
           "AUTHSVC_RATE_LIMIT_ORG": "100000000/minute",
           "AUTHSVC_RATE_LIMIT_TOKEN_WRITE": "100000000/minute",
           "AUTHSVC_PAYER_DEMO_SECRET": "whsec_YmVuY2gtc2VjcmV0LWJlbmNoLXNlY3JldA=="}
    run_cli(env, "db", "upgrade")
    token = run_cli(env, "tokens", "create", "--org", "bench", "--role", "coordinator"
                    ).strip().splitlines()[-1]
    procs: dict[str, Any] = {}
    for name in ("payer-sim", "api", "worker-1", "worker-2", "scheduler"):
        procs[name] = start(cleanup, name, *command_for(name, env))
    wait_http(procs["payer-sim"], f"http://127.0.0.1:{sim_port}/sim/submissions", "payer-sim",
              cleanup)
    wait_http(procs["api"], f"http://127.0.0.1:{api_port}/readyz", "api", cleanup)
    time.sleep(2)

    drain_before = drain_rate(redis_url, namespace)
    log(f"no-op drain rate: {drain_before:.0f} msg/s")
    engine = sa.create_engine(db_url)
    stop, kills = threading.Event(), Counter()
    monkey = None
    if args.chaos:
        monkey = threading.Thread(target=chaos_monkey, args=(
            cleanup, procs, env, redis_url, namespace, stop, kills), daemon=True)
        monkey.start()
    started = time.monotonic()
    post_all(api_port, token, args.orders)
    posted = time.monotonic() - started
    log(f"posted {args.orders} orders in {posted:.1f} s")
    deadline = time.monotonic() + args.settle
    terminal = 0
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            terminal = conn.execute(sa.text(
                "SELECT count(*) FROM orders WHERE status = ANY(:s)"), {"s": list(TERMINAL)}
            ).scalar()
        if terminal >= args.orders:
            break
        if args.chaos and time.monotonic() - started > posted + 20:
            stop.set()  # let the system settle once intake is over
        time.sleep(1)
    stop.set()
    finished = time.monotonic() - started
    if monkey is not None:
        monkey.join(30)
        time.sleep(2)
    backlog = None
    if not args.chaos:
        backlog = backlog_phase(cleanup, procs, env, engine, api_port, token, args)
    drain_after = drain_rate(redis_url, namespace) if not args.chaos else None
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT status, EXTRACT(EPOCH FROM updated_at - created_at) FROM orders "
            "WHERE external_id LIKE 'BENCH-%'")).all()
        statuses = Counter(r[0] for r in conn.execute(sa.text("SELECT status FROM orders")))
        lost = conn.execute(sa.text("SELECT count(*) FROM orders WHERE NOT status = ANY(:s)"),
                            {"s": list(TERMINAL)}).scalar()
        messages = conn.execute(sa.text(
            "SELECT coalesce(sum(publish_count), 0) FROM outbox")).scalar()
        cases_sent = {r[0] for r in conn.execute(sa.text(
            "SELECT id FROM cases WHERE payer_received_at IS NOT NULL"))}
    engine.dispose()
    conn_sim = http.client.HTTPConnection("127.0.0.1", sim_port, timeout=60)
    conn_sim.request("GET", "/sim/submissions")
    ledger = json.loads(conn_sim.getresponse().read())["items"]
    accepted = Counter(x["claim_id"] for x in ledger if x["kind"] == "submit" and x["accepted"])
    done = sorted(float(t) for s, t in rows if s in TERMINAL)
    duplicates = sum(1 for n in accepted.values() if n > 1)
    unacknowledged = sum(1 for c in cases_sent if accepted.get(c, 0) != 1)
    drain = max(x for x in (drain_before, drain_after) if x)
    msg_rate = backlog["messages_per_s"] if backlog else int(messages) / finished
    return {
        "benchmark": "chaos" if args.chaos else "pipeline", "orders": args.orders,
        "orders_per_s": round(len(done) / finished, 1),
        "p50_s": round(statistics.median(done), 2) if done else None,
        "p95_s": round(done[int(len(done) * 0.95) - 1], 2) if done else None,
        "worker_messages_per_s": round(msg_rate, 1),
        "noop_drain_per_s": round(drain, 1),
        "ratio_to_drain": round(msg_rate / drain, 3),
        "lost": lost, "duplicate_submissions": duplicates,
        "cases_without_one_accepted_submission": unacknowledged,
        "statuses": dict(statuses), "backlog": backlog,
        "kills": dict(kills) if args.chaos else None,
        "targets": {"ratio_to_drain_min": 0.5, "lost": 0, "duplicate_submissions": 0},
    }


def main(argv: list[str] | None = None, chaos: bool = False) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--orders", type=int, default=10_000)
    p.add_argument("--settle", type=float, default=900, help="max seconds to wait for all")
    p.add_argument("--chaos", action="store_true", default=chaos)
    args = p.parse_args(argv)
    cleanup = Cleanup()
    try:
        result = run(args, cleanup)
    finally:
        cleanup.close()
    print(json.dumps(result), flush=True)
    return 0 if result["lost"] == 0 and result["duplicate_submissions"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
