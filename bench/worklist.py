"""Worklist and outcome-feed latency on a large PostgreSQL database.

Run: ``.venv/bin/python -m bench.worklist [--cases 1000000] [--orgs 50] [--requests 200]``

Creates a fresh database next to ``AUTHSVC_TEST_DATABASE_URL`` (or
``AUTHSVC_BENCH_DATABASE_URL``), migrates it, bulk-loads cases over ``--orgs`` organizations
with ``COPY`` (a realistic spread of states, deadlines and assignees, one order and one
timeline event per case) and 100,000 outcomes for one organization, starts
``authsvc serve --workers 2`` on it and measures over HTTP, one keep-alive connection:

* ``GET /v1/cases`` (default page, ``overdue=true``, ``payer_id=``, ``assignee=``) p50/p95,
  walking pages with the cursor;
* ``GET /v1/outcomes?limit=200`` paging through the 100,000 outcomes → outcomes/s
  (``--outcome-walks N`` pages through them N times: ``outcomes_per_s`` is the median walk,
  ``runs`` every walk; ``--outcomes-only`` skips the worklist phases and seeds
  ``--cases`` cases only for the tables' sake, e.g. ``--cases 10000 --outcomes-only``).

Prints ``EXPLAIN (ANALYZE, BUFFERS)`` of the default worklist query to stderr (it should be an
index scan on ``ix_cases_org_due`` that stops at the page size; migration 0004 added that
index after this benchmark showed the sort of ~18,000 rows per page). The database is dropped
at the end. Everything but the one JSON result line goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
STATES = [  # (state, weight, has payer answer)
    ("approved", 38, True), ("denied", 8, True), ("partially_approved", 2, True),
    ("modified", 1, True), ("pended", 12, True), ("submitted", 10, True),
    ("info_requested", 4, True), ("needs_input", 3, False), ("ready_to_submit", 2, False),
    ("submitting", 1, False), ("rejected", 2, False), ("error", 1, False),
    ("contact_payer", 1, True), ("cancelled", 5, True), ("expired", 5, True),
    ("superseded", 5, True),
]
FINAL = {"approved", "denied", "partially_approved", "modified", "cancelled", "expired",
         "superseded"}
ATTENTION = {"rejected": "rejected", "error": "error", "info_requested": "info_requested",
             "contact_payer": "contact_payer", "denied": "denied_review"}
PAYERS = ["demo", "acme", "bluepeak", "northwind", "summit"]


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed(url: str, n_cases: int, n_orgs: int, n_outcomes: int) -> None:
    import psycopg

    rnd = random.Random(7)
    now = dt.datetime.now(dt.UTC)
    states = [s for s, w, _ in STATES for _ in range(w)]
    answered = {s for s, _, a in STATES if a}
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    started = time.perf_counter()
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        with cur.copy("COPY organizations (id, name, created_at) FROM STDIN") as cp:
            for o in range(n_orgs):
                cp.write_row((f"bench-{o}", f"bench-{o}", now))
        with cur.copy("COPY patients (id, org_id, mrn, given_name, family_name, birth_date, "
                      "sex, contacts, updated_at) FROM STDIN") as cp:
            for o in range(n_orgs):
                for p in range(100):
                    cp.write_row((f"pat_{o}_{p}", f"bench-{o}", f"MRN-{p}", "Test", "Patient",
                                  dt.date(1980, 1, 1), "unknown", "[]", now))
        order_cols = ("id, org_id, external_id, patient_id, payer_id, member_id, "
                      "requester_npi, diagnoses, urgency, status, eligibility_status, "
                      "ruleset_version, created_at, updated_at")
        case_cols = ("id, org_id, order_id, payer_id, kind, certification_type, urgency, "
                     "state, version, attention_reason, attention_since, assignee, "
                     "submission_unknown, attempts, poll_attempts, submitted_at, "
                     "payer_received_at, decision_due_at, decided_at, update_pending, "
                     "created_at, updated_at")
        cases = []
        for i in range(n_cases):
            org = i % n_orgs
            state = rnd.choice(states)
            urgency = "expedited" if rnd.random() < 0.15 else "standard"
            created = now - dt.timedelta(seconds=rnd.uniform(0, 40 * 86400))
            received = due = decided = None
            if state in answered:
                received = created + dt.timedelta(minutes=rnd.uniform(1, 30))
                due = received + dt.timedelta(hours=72 if urgency == "expedited" else 168)
                if state in FINAL:
                    decided = received + dt.timedelta(hours=rnd.uniform(1, 150))
            reason = ATTENTION.get(state)
            if reason is None and due is not None and state not in FINAL and due < now:
                reason = "overdue"
            assignee = f"coordinator-{rnd.randrange(20)}" if rnd.random() < 0.3 else None
            cases.append((f"case_b{i:08d}", f"bench-{org}", f"ord_b{i:08d}",
                          rnd.choice(PAYERS), urgency, state, reason, assignee, received, due,
                          decided, created))
        with cur.copy(f"COPY orders ({order_cols}) FROM STDIN") as cp:
            for (_, org, oid, payer, urgency, _state, *_rest, created) in cases:
                cp.write_row((oid, org, f"EXT-{oid[5:]}", f"pat_{org[6:]}_{rnd.randrange(100)}",
                              payer, "M-1", "1003000126", '["M54.50"]', urgency, "in_review",
                              "active", "demo@bench", created, created))
        with cur.copy(f"COPY cases ({case_cols}) FROM STDIN") as cp:
            for (cid, org, oid, payer, urgency, state, reason, assignee, received, due, decided,
                 created) in cases:
                cp.write_row((cid, org, oid, payer, "initial", "I", urgency, state, 1, reason,
                              created if reason else None, assignee, False, 1, 0, received,
                              received, due, decided, False, created, decided or created))
        with cur.copy("COPY timeline_events (org_id, order_id, case_id, at, event, actor) "
                      "FROM STDIN") as cp:
            for (cid, org, oid, *_rest, created) in cases:
                cp.write_row((org, oid, cid, created, "case_opened", "system"))
        with cur.copy("COPY outcomes (id, org_id, order_id, case_id, sequence, code, outcome, "
                      "auth_number, authorized_quantity, payer_id, decided_at, version) "
                      "FROM STDIN") as cp:
            for i in range(n_outcomes):
                cid, org, oid = cases[i * n_orgs % n_cases][:3]
                cp.write_row((f"out_b{i:08d}", "bench-0", f"ord_o{i:08d}", None, 1, "72148",
                              "approved", f"AUTH{i}", 1, "demo", now, 1))
        conn.commit()
        cur.execute("ANALYZE")
    log(f"seeded {n_cases} cases, {n_outcomes} outcomes in {time.perf_counter() - started:.1f}s")


class Client:
    def __init__(self, port: int, token: str):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.headers = {"Authorization": f"Bearer {token}"}

    def get(self, path: str) -> tuple[float, dict]:
        t0 = time.perf_counter()
        self.conn.request("GET", path, headers=self.headers)
        resp = self.conn.getresponse()
        body = resp.read()
        elapsed = (time.perf_counter() - t0) * 1000
        if resp.status != 200:
            raise RuntimeError(f"{path} -> {resp.status}: {body[:200]!r}")
        return elapsed, json.loads(body)


def measure_worklist(client: Client, requests: int) -> dict:
    queries = {"default": "", "overdue": "&overdue=true", "payer_id": "&payer_id=acme",
               "assignee": "&assignee=coordinator-3"}
    out = {}
    for name, extra in queries.items():
        times, cursor = [], None
        for _ in range(requests):
            path = "/v1/cases?limit=50" + extra + (f"&cursor={cursor}" if cursor else "")
            ms, page = client.get(path)
            times.append(ms)
            cursor = page["next_cursor"] if len(times) % 10 else None  # walk 10 pages, restart
        times.sort()
        out[name] = {"p50_ms": round(statistics.median(times), 2),
                     "p95_ms": round(times[int(len(times) * 0.95) - 1], 2)}
    return out


def session_cpu_seconds(sid: int | None) -> float:
    """User + system CPU time of every process in the API's session (gunicorn arbiter and
    workers): what the API spent, whatever else the machine was doing meanwhile."""
    if sid is None:
        return 0.0
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            rest = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(rest[3]) == sid:
            ticks += int(rest[11]) + int(rest[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def walk_outcomes(client: Client, sid: int | None = None) -> tuple[int, float, float]:
    seen, after = 0, None
    cpu0 = session_cpu_seconds(sid)
    t0 = time.perf_counter()
    while True:
        _, page = client.get("/v1/outcomes?limit=200" + (f"&after={after}" if after else ""))
        if not page["items"]:
            break
        seen += len(page["items"])
        after = page["next_cursor"]
    return seen, time.perf_counter() - t0, session_cpu_seconds(sid) - cpu0


def measure_outcomes(client: Client, total: int, walks: int = 1,
                     sid: int | None = None) -> dict:
    runs = [walk_outcomes(client, sid) for _ in range(max(walks, 1))]
    rates = [round(seen / elapsed) for seen, elapsed, _ in runs if elapsed]
    seen, elapsed, _ = runs[0]
    out = {"outcomes": seen, "seconds": round(elapsed, 2),
           "outcomes_per_s": round(statistics.median(rates)) if rates else None,
           "complete": all(n == total for n, _, _ in runs)}
    if sid is not None:  # outcomes per second of API CPU: robust on a shared machine
        out["api_cpu_s"] = round(statistics.median(cpu for _, _, cpu in runs), 2)
        out["outcomes_per_api_cpu_s"] = round(statistics.median(
            n / cpu for n, _, cpu in runs if cpu)) if any(cpu for _, _, cpu in runs) else None
    if walks > 1:
        out["runs"] = rates
    return out


def explain(url: str) -> str:
    from authsvc.adapters.db import repo_cases as rc

    engine = sa.create_engine(url)
    captured: list[tuple[str, object]] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _grab(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        captured.append((statement, parameters))

    with engine.connect() as conn:
        rc.worklist(conn, "bench-7", rc.WorklistFilter(), dt.datetime.now(dt.UTC), None, 51)
        statement, params = captured[0]
        plan = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement, params).all()
    engine.dispose()
    return "\n".join(r[0] for r in plan)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=1_000_000)
    ap.add_argument("--orgs", type=int, default=50)
    ap.add_argument("--outcomes", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--outcome-walks", type=int, default=1)
    ap.add_argument("--outcomes-only", action="store_true")
    args = ap.parse_args()
    base = os.environ.get("AUTHSVC_BENCH_DATABASE_URL") or os.environ["AUTHSVC_TEST_DATABASE_URL"]
    redis_url = os.environ.get("AUTHSVC_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    name = f"authsvc_bench_{secrets.token_hex(4)}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = base.rsplit("/", 1)[0] + "/" + name
    server = None
    try:
        from authsvc.adapters.db.engine import upgrade
        from authsvc.api.auth import create_token

        upgrade(url)
        seed(url, args.cases, args.orgs, args.outcomes)
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            _, coord = create_token(conn, "bench-7", "coordinator", name="coordinator-3")
            _, billing = create_token(conn, "bench-0", "billing")
        engine.dispose()
        port = free_port()
        # One token per phase: the limiter still runs on every request (its cost is part of
        # the figure, as in bench.intake) but refuses nothing.
        limits = {f"AUTHSVC_RATE_LIMIT_{k}": "100000000/minute" for k in ("TOKEN", "ORG")}
        env = {**os.environ, "AUTHSVC_DATABASE_URL": url, "AUTHSVC_REDIS_URL": redis_url,
               "AUTHSVC_PORT": str(port), **limits}
        server = subprocess.Popen([sys.executable, "-m", "authsvc.cli", "serve", "--workers",
                                   "2"], env=env, stdout=sys.stderr, stderr=sys.stderr,
                                  start_new_session=True, cwd=ROOT)
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        client = Client(port, coord)
        for _ in range(20):  # warm both workers and the caches
            client.get("/v1/cases?limit=50")
        if args.outcomes_only:
            outcomes = measure_outcomes(Client(port, billing), args.outcomes, args.outcome_walks,
                                        server.pid)
            print(json.dumps({"cases": args.cases, "orgs": args.orgs, "outcome_paging": outcomes,
                              "target": {"outcomes_per_s": 20000}}))
            return
        log(explain(url))
        worklist = measure_worklist(client, args.requests)
        outcomes = measure_outcomes(Client(port, billing), args.outcomes, args.outcome_walks,
                                    server.pid)
        print(json.dumps({"cases": args.cases, "orgs": args.orgs, "worklist": worklist,
                          "outcome_paging": outcomes, "target": {"worklist_p95_ms": 30,
                                                                 "outcomes_per_s": 20000}}))
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(20)
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
