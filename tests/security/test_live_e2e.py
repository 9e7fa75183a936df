"""On real processes (tests/e2e/harness.py): S8, the canary PHI scan over a scripted session,
and B14, a bounded schemathesis run against the live `/openapi.json` with a token.

The S8 session carries the canary patient through: PHI writes and reads, a short concurrent
burst (L1, with B13's same-key races), hostile and failing requests (B1-B9, B12, B13), S1 (no,
garbage, revoked, expired and query-string tokens; an `alg:none` CDS Hooks JWT), S2 (wrong
roles), S3 (another organization on the canary's ids), and payer faults F10-F12 (503, 500,
429 with Retry-After, text/html, a truncated and a 50 MB body, a 302 towards a port nothing
may reach) with the simulator restarted per mode. S7 runs here too: hostile subscription URLs
refused by gunicorn, and the worker's send-time re-check.

`bench/fuzz.sh` runs the same schemathesis driver for ≥ 10,000 requests.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import socket
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from authsvc.adapters import webhooks
from authsvc.adapters.db import tables as t
from tests.conftest import DEMO_SECRET
from tests.e2e.harness import Http, System, wait_for
from tests.security.conftest import canary_body
from tests.security.fuzzrun import FUZZ_ENV, KNOWN, junit_failures, run_schemathesis

pytestmark = pytest.mark.e2e
CANARY_RE = re.compile(rb"ZZCANARY|CANARYMBR000123|1901-02-03|Testperson")
PG_LOG = Path("/var/log/postgresql/postgresql-15-main.log")
# Tables that must hold identifiers only (reliability.md S8: "0 hits outside the PHI tables").
ID_ONLY_TABLES = ("audit_events", "outbox", "timeline_events", "outcomes", "callback_events",
                  "rate_limit_events", "api_tokens", "case_lines")
# Columns of PHI tables that hold reasons and addresses only (payer_exchanges keeps the PAS
# bodies themselves, by design; its error and URL must not quote them).
ID_ONLY_COLUMNS = {"payer_exchanges": ("error", "url", "kind"),
                   "eligibility_checks": ("errors", "plan_name")}


@pytest.fixture(scope="module")
def live(database_url, redis_url, tmp_path_factory):
    pg_offset = PG_LOG.stat().st_size if PG_LOG.exists() else None
    system = System(database_url, redis_url, tmp_path_factory.mktemp("security-live"),
                    extra_env=FUZZ_ENV)
    try:
        yield system.up(), pg_offset
    finally:
        system.stop()


def _raw(api: str, method: str, path: str, data: bytes | None, headers: dict[str, str]):
    req = urllib.request.Request(api + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _redis_dump(redis_url: str) -> bytes:
    import redis

    client = redis.Redis.from_url(redis_url)
    out = bytearray()
    try:
        for key in client.scan_iter(count=500):
            out += key + b"\n"
            kind = client.type(key)
            if kind == b"string":
                out += client.get(key) or b""
            elif kind == b"hash":
                for k, v in client.hgetall(key).items():
                    out += k + b"=" + v + b"\n"
            elif kind == b"list":
                out += b"\n".join(client.lrange(key, 0, -1))
            elif kind == b"set":
                out += b"\n".join(client.smembers(key))
            elif kind == b"zset":
                out += b"\n".join(client.zrange(key, 0, -1))
            elif kind == b"stream":
                out += repr(client.xrange(key)).encode()
            out += b"\n"
    finally:
        client.close()
    return bytes(out)


def test_S8_canary_phi_appears_nowhere_outside_the_phi_tables(live, redis_url, services):
    system, pg_offset = live
    clin = Http(system.api, system.token("canary-org", "clinician"))
    billing = Http(system.api, system.token("canary-org", "billing"))
    other = Http(system.api, system.token("canary-other", "clinician"))
    token = clin.token
    error_bodies: list[bytes] = []
    # PHI writes and reads
    session_order = canary_body(diagnoses=["M54.50", "J45.50"])
    # 1234567893 holds a gold card for this code; another requester sends it to the payer
    session_order["requester"]["npi"] = "1003000126"
    session_order["performer"]["npi"] = "1234567893"
    status, _, order = clin.request("POST", "/v1/orders", session_order,
                                    {"Idempotency-Key": uuid.uuid4().hex})
    assert status == 201, order

    def decided():  # type: ignore[no-untyped-def]
        _, _, o = clin.request("GET", f"/v1/orders/{order['id']}")
        return o if o["status"] not in ("received", "checking_eligibility", "in_review") else None

    final = wait_for(decided, timeout=60)
    assert final["status"] == "approved", final["status"]
    assert clin.request("GET", "/v1/orders?mrn=MRN-CANARY-1")[0] == 200
    assert billing.request("GET", "/v1/outcomes")[0] == 200
    # Hostile and failing requests, each carrying the canary
    body = json.dumps(canary_body()).encode()
    bad_npi = canary_body()
    bad_npi["requester"]["npi"] = "1234567890"
    auth = {"Authorization": f"Bearer {token}"}
    attempts = [
        ("POST", "/v1/orders", json.dumps(bad_npi).encode(), {"Content-Type": "application/json"}),
        ("POST", "/v1/orders", body[:-7], {"Content-Type": "application/json"}),
        ("POST", "/v1/orders", body, {"Content-Type": "text/plain"}),
        ("POST", "/v1/orders", body.replace(b'"mrn"', b'"mrn": "x", "mrn"'),
         {"Content-Type": "application/json"}),
        ("POST", "/v1/orders", body + b" " * 300_000, {"Content-Type": "application/json"}),
        ("GET", "/v1/orders?mrn=ZZCANARY&status=ZZCANARY", None, {}),
        ("GET", f"/v1/orders/{order['id']}", None, {"Authorization": f"Bearer {other.token}"}),
        ("GET", "/v1/orders/ZZCANARY-1901-02-03", None, {}),
    ]
    as_json = {"Content-Type": "application/json"}

    def variant(**changes: object) -> bytes:
        doc = canary_body()
        for dotted, value in changes.items():
            *parents, leaf = dotted.split("__")
            target = doc
            for key in parents:
                target = target[key]
            target[leaf] = value
        return json.dumps(doc).encode()

    attempts += [(  # B3, B5, B6, B7, B9, B12 carrying the canary
        "POST", "/v1/orders", data, as_json) for data in (
        variant(patient__birth_date=19010203), variant(diagnoses="J45.50"),
        variant(patient__given_name=["ZZCANARY"]),
        b'{"patient": ' + b"[" * 5000 + b'"ZZCANARY"' + b"]" * 5000 + b"}",
        body.replace(b'"quantity": 1', b'"quantity": NaN'),
        body.replace(b'"ZZCANARY"', b'"ZZCANARY\\u0000"'),
        body.replace(b'"ZZCANARY"', b'"ZZCANARY\\ud800"'),
        variant(diagnoses=["Q99.99"]), variant(diagnoses=["J45"]), variant(diagnoses=["j45.50"]),
        variant(status="ZZCANARY", org_id="CANARYMBR000123", created_by="1901-02-03"))]
    for method, path, data, headers in attempts:
        hdrs = {**auth, "Idempotency-Key": uuid.uuid4().hex, **headers}
        status, raw = _raw(system.api, method, path, data, hdrs)
        assert 400 <= status < 500, (path, status)
        error_bodies.append(raw)
    key = uuid.uuid4().hex  # B13: the same key with another body
    first = canary_body(external_id="EHR-CANARY-B13")
    first["requester"]["npi"] = "1003000126"
    assert _raw(system.api, "POST", "/v1/orders", json.dumps(first).encode(),
                {**auth, **as_json, "Idempotency-Key": key})[0] == 201
    first["patient"]["given_name"] = "ZZCANARY-Other"
    status, raw = _raw(system.api, "POST", "/v1/orders", json.dumps(first).encode(),
                       {**auth, **as_json, "Idempotency-Key": key})
    assert status == 422, raw[:300]
    error_bodies.append(raw)
    status, raw = _raw(system.api, "GET", "/v1/orders?access_token=ZZCANARY", None, {})
    assert status == 401
    error_bodies.append(raw)
    garbage = json.dumps({"resourceType": "Patient", "name": [{"family": "ZZCANARY"}],
                          "birthDate": "1901-02-03"}).encode()
    hdrs = {**webhooks.headers(DEMO_SECRET, f"msg_{uuid.uuid4().hex}", garbage),
            "Content-Type": "application/fhir+json"}
    status, raw = _raw(system.api, "POST", "/v1/payer-callbacks/demo", garbage, hdrs)
    assert status == 400
    error_bodies.append(raw)
    # A failing INSERT with canary values: PostgreSQL must not echo them into its log.
    if services.engine.dialect.name == "postgresql":
        with pytest.raises(sa.exc.IntegrityError), services.engine.begin() as conn:
            conn.execute(t.patients.insert().values(
                id="pat_canary_dup", org_id="no-such-org", mrn="ZZCANARY", given_name="ZZCANARY",
                family_name="Testperson", birth_date="1901-02-03", sex="female", contacts=[],
                updated_at=sa.func.now()))
    with services.engine.connect() as conn:  # S3: org B names org A's patient in a body
        final["patient_id"] = conn.execute(sa.select(t.orders.c.patient_id).where(
            t.orders.c.id == final["id"])).scalar()
    error_bodies += _s1_to_s3_traffic(system, final, token, other.token)
    error_bodies += _short_load(system, token)
    # the burst's orders settle first: still in flight when the payer starts failing, their
    # retries and inquiries would open the circuit breaker and hold the probes back
    wait_for(lambda: _in_flight(services) == 0, timeout=120)
    error_bodies += _payer_fault_traffic(system, services)
    px = t.payer_exchanges
    with services.engine.connect() as conn:  # F12: each fault is a failure with a typed reason
        reasons = {r.error for r in conn.execute(sa.select(px.c.error).where(
            px.c.org_id == "canary-org", px.c.kind == "submit"))}
    assert {"http 503", "http 500", "http 429", "unexpected content type", "unparseable body",
            "redirect 302 not followed"} <= reasons, reasons
    assert len(reasons - {None}) >= 7, reasons  # and the 50 MB body was cut at the cap
    time.sleep(1.5)  # let the workers' and scheduler's last lines reach their files
    with urllib.request.urlopen(f"{system.api}/metrics", timeout=10) as resp:  # noqa: S310
        metrics = resp.read()
    hits: dict[str, list[str]] = {}
    for path in sorted(system.logdir.glob("*.log")):
        found = CANARY_RE.findall(path.read_bytes())
        if found:
            hits[path.name] = sorted({f.decode() for f in found})
    for i, raw in enumerate(error_bodies):
        if CANARY_RE.search(raw):
            hits[f"error body {i}"] = [raw[:200].decode(errors="replace")]
    if CANARY_RE.search(metrics):
        hits["/metrics"] = ["canary in metrics"]
    redis_text = _redis_dump(redis_url)
    if CANARY_RE.search(redis_text):
        hits["redis"] = sorted({f.decode() for f in CANARY_RE.findall(redis_text)})
    with services.engine.connect() as conn:
        for name in ID_ONLY_TABLES:
            rows = conn.execute(sa.select(t.metadata.tables[name])).all()
            if CANARY_RE.search(repr(rows).encode()):
                hits[f"table {name}"] = ["canary"]
        for name, columns in ID_ONLY_COLUMNS.items():
            table = t.metadata.tables[name]
            rows = conn.execute(sa.select(*(table.c[c] for c in columns))).all()
            if CANARY_RE.search(repr(rows).encode()):
                hits[f"table {name} {columns}"] = ["canary"]
    if pg_offset is not None and services.engine.dialect.name == "postgresql":
        with PG_LOG.open("rb") as fh:
            fh.seek(pg_offset)
            pg_text = fh.read()
        if CANARY_RE.search(pg_text):
            hits["postgresql log"] = ["statement echo"]
    assert hits == {}
    _assert_messages_hold_ids_only(redis_url)
    # S9/I8 across processes: API workers, actors and the scheduler all appended to one
    # chain (advisory lock on PostgreSQL, BEGIN IMMEDIATE on SQLite); it still verifies.
    assert "audit chain ok" in system.cli("audit", "verify")


def _expect(system, method: str, path: str, data: object, headers: dict[str, str],
            status: int) -> bytes:
    body = data if isinstance(data, bytes) or data is None else json.dumps(data).encode()
    hdrs = {"Content-Type": "application/json", "Idempotency-Key": uuid.uuid4().hex,
            **headers}
    got, raw = _raw(system.api, method, path, body, hdrs)
    assert got == status, (method, path, got, raw[:300])
    return raw


def _s1_to_s3_traffic(system, order: dict, token: str, other_token: str) -> list[bytes]:
    """S1, S2 and S3 requests carrying the canary; returns their (error) bodies."""
    bodies: list[bytes] = []
    canary = canary_body()
    case_id = order["cases"][0]["id"] if order.get("cases") else None
    created = system.cli("tokens", "create", "--org", "canary-org", "--role", "clinician")
    revoked_id = created.split()[1]
    revoked = created.strip().splitlines()[-1]
    system.cli("tokens", "revoke", revoked_id)
    yesterday = (dt.date.today() - dt.timedelta(days=2)).isoformat()
    expired = system.cli("tokens", "create", "--org", "canary-org", "--role", "clinician",
                         "--expires", yesterday).strip().splitlines()[-1]
    # S1: every kind of bad credential, the canary in the body or the URL
    for hdrs in ({}, {"Authorization": "Bearer ZZCANARY-1901-02-03"},
                 {"Authorization": "Basic " + base64.b64encode(b"ZZCANARY:x").decode()},
                 {"Authorization": "Bearer asv_" + "0" * 43},
                 {"Authorization": f"Bearer {revoked}"}, {"Authorization": f"Bearer {expired}"}):
        bodies.append(_expect(system, "POST", "/v1/orders", canary, hdrs, 401))
        bodies.append(_expect(system, "GET", "/v1/orders?mrn=MRN-CANARY-1&q=ZZCANARY", None,
                              hdrs, 401))
    bodies.append(_expect(system, "GET", f"/v1/orders?access_token={token}&mrn=ZZCANARY",
                          None, {}, 401))
    jwt_none = ".".join(base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=")
                        .decode() for part in ({"alg": "none", "typ": "JWT"},
                                               {"iss": "ZZCANARY", "sub": "1901-02-03"})) + "."
    hook = {"hook": "order-select", "hookInstance": str(uuid.uuid4()), "context": {
        "patientId": "ZZCANARY", "draftOrders": {"resourceType": "Bundle", "entry": []}},
        "prefetch": {"patient": {"resourceType": "Patient", "birthDate": "1901-02-03",
                                 "name": [{"family": "Testperson", "given": ["ZZCANARY"]}]},
                     "coverage": {"resourceType": "Coverage",
                                  "subscriberId": "CANARYMBR000123"}}}
    bodies.append(_expect(system, "POST", "/cds-services/order-select", hook,
                          {"Authorization": f"Bearer {jwt_none}"}, 401))
    # S2: roles that may not do it
    billing = system.token("canary-org", "billing")
    bodies.append(_expect(system, "POST", "/v1/orders", canary,
                          {"Authorization": f"Bearer {billing}"}, 403))
    bodies.append(_expect(system, "GET", "/v1/cases?q=ZZCANARY", None,
                          {"Authorization": f"Bearer {billing}"}, 403))
    if case_id:
        bodies.append(_expect(system, "POST", f"/v1/cases/{case_id}/decision", {
            "reference": "ZZCANARY", "received_via": "phone", "lines": [
                {"sequence": 1, "outcome": "approved", "auth_number": "CANARYMBR000123"}]},
            {"Authorization": f"Bearer {token}"}, 403))
    # S3: another organization on the canary's ids and data
    other_coord = system.token("canary-other", "coordinator")
    for hdr in ({"Authorization": f"Bearer {other_token}"},
                {"Authorization": f"Bearer {other_coord}"}):
        bodies.append(_expect(system, "GET", f"/v1/orders/{order['id']}", None, hdr, 404))
        bodies.append(_expect(system, "POST", f"/v1/orders/{order['id']}/cancel",
                              {"reason": "ZZCANARY 1901-02-03"}, hdr, 404))
    coord = {"Authorization": f"Bearer {other_coord}"}
    bodies.append(_expect(system, "POST", f"/v1/orders/{order['id']}/coverage",
                          {"member_id": "CANARYMBR000123"}, coord, 404))
    if case_id:
        bodies.append(_expect(system, "GET", f"/v1/cases/{case_id}", None, coord, 404))
        bodies.append(_expect(system, "POST", f"/v1/cases/{case_id}/notes",
                              {"text": "ZZCANARY Testperson 1901-02-03"}, coord, 404))
        bodies.append(_expect(system, "POST", f"/v1/cases/{case_id}/assign",
                              {"assignee": "ZZCANARY"}, coord, 404))
    listed = _expect(system, "GET", "/v1/orders?mrn=MRN-CANARY-1", None, coord, 200)
    assert json.loads(listed)["items"] == []
    bodies.append(listed)
    with_patient = {**canary, "patient_id": order["patient_id"]}
    bodies.append(_expect(system, "POST", "/v1/orders", with_patient,
                          {"Authorization": f"Bearer {other_coord}"}, 422))
    return bodies


def _short_load(system, token: str) -> list[bytes]:
    """L1, short: 24 canary orders from 6 threads at once, each key sent twice at the same
    moment (B13's in-flight answer, 409, or a replay); returns the non-2xx bodies."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> tuple[int, bytes]:
        body = canary_body(external_id=f"EHR-CANARY-L1-{i // 2}")
        body["requester"]["npi"] = "1003000126"
        return _raw(system.api, "POST", "/v1/orders", json.dumps(body).encode(), {
            "Authorization": f"Bearer {token}", "Content-Type": "application/json",
            "Idempotency-Key": f"canary-l1-{i // 2}-{system.api_port}"})

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(48)))
    assert {code for code, _ in results} <= {201, 409}, [c for c, _ in results]
    assert sum(code == 201 for code, _ in results) >= 24
    return [raw for code, raw in results if code != 201]


# F10-F12: (AUTHSVC_SIM_FAULT, the status the simulator's ledger lists for the faulted call)
FAULTS = [("503", 503), ("500", 500), ("429", 429), ("html", 200), ("truncated", 200),
          ("huge", 200), ("redirect=http://127.0.0.1:{victim}/steal", 302)]


def _in_flight(services) -> int:
    """canary-org orders or cases still on their way to the payer."""
    o, c = t.orders, t.cases
    with services.engine.connect() as conn:
        orders = conn.execute(sa.select(sa.func.count()).select_from(o).where(
            o.c.org_id == "canary-org",
            o.c.status.in_(["received", "checking_eligibility"]))).scalar()
        cases = conn.execute(sa.select(sa.func.count()).select_from(c).where(
            c.c.org_id == "canary-org",
            c.c.state.in_(["ready_to_submit", "submitting"]))).scalar()
    return orders + cases


def _failed_exchanges(services, case_id: str) -> int:
    px = t.payer_exchanges
    with services.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(px).where(
            px.c.org_id == "canary-org", px.c.case_id == case_id, px.c.kind == "submit",
            px.c.error.is_not(None))).scalar()


def _payer_fault_traffic(system, services) -> list[bytes]:
    """Canary orders while the payer misbehaves, one mode at a time (the simulator restarts
    with each; so does the worker, whose circuit breaker would otherwise stop calling after
    five failures). Waits until the payer listed a faulted call for the canary member."""
    clin = Http(system.api, system.token("canary-org", "clinician"))
    victim = socket.socket()
    victim.bind(("127.0.0.1", 0))
    victim.listen(1)
    victim.settimeout(0.2)
    try:
        for mode, status in FAULTS:
            mode = mode.format(victim=victim.getsockname()[1])
            system.kill("payer-sim")
            system.kill("worker")
            system.start("payer-sim", "payer-sim", env={"AUTHSVC_SIM_FAULT": mode})
            system.wait_http(f"{system.sim}/sim/submissions")
            system.start("worker", "worker", "--threads", "4")
            body = canary_body(diagnoses=["M54.50"])  # the canary NPI holds a gold card:
            body["requester"]["npi"] = "1003000126"   # another requester sends it to the payer
            body["performer"]["npi"] = "1234567893"
            code, _, order = clin.request("POST", "/v1/orders", body,
                                          {"Idempotency-Key": uuid.uuid4().hex})
            assert code == 201
            # this mode's probe is followed by its case id: earlier probes still retrying
            # call the same faulty payer with the same member id
            case_id = wait_for(lambda: next(iter(
                clin.request("GET", f"/v1/orders/{order['id']}")[2]["cases"]), {}).get("id"))

            def faulted(status=status, case_id=case_id):  # type: ignore[no-untyped-def]
                return [e for e in system.submissions("CANARYMBR000123")
                        if e["claim_id"] == case_id and not e["accepted"]
                        and e["http_status"] == status]

            try:
                wait_for(faulted, timeout=60)
            except TimeoutError:
                raise AssertionError((mode, system.submissions("CANARYMBR000123"))) from None
            # the worker has read (up to its cap), logged and recorded the faulted answer
            # before the next mode kills it
            wait_for(lambda case_id=case_id: _failed_exchanges(services, case_id), timeout=60)
        with pytest.raises(TimeoutError):  # the 302 was not followed
            victim.accept()
    finally:
        victim.close()
        system.kill("payer-sim")
        system.start("payer-sim", "payer-sim")
        system.wait_http(f"{system.sim}/sim/submissions")
    return []


def _assert_messages_hold_ids_only(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter(match="dramatiq:*.msgs", count=500):
            for raw in client.hgetall(key).values():
                message = json.loads(raw)
                assert all(isinstance(a, str) and re.fullmatch(r"[a-z]+_[0-9a-z]+", a)
                           for a in message.get("args", [])), message.get("actor_name")
                assert not message.get("kwargs")
    finally:
        client.close()


def test_B14_schemathesis_bounded_run_finds_nothing_new(live, tmp_path):
    system, _ = live
    token = system.token("fuzz-ci", "admin")
    seed = 20261126
    code, out = run_schemathesis(system.api, token, examples=4, seed=seed, workers=2,
                                 report_dir=tmp_path, max_time=60)
    (tmp_path / "schemathesis.txt").write_text(out)
    tested, found = junit_failures(tmp_path)
    assert tested >= 10, out[-3000:]
    new = sorted(f for f in found if f not in KNOWN)
    assert new == [], f"seed {seed}; report in {tmp_path}\n" + out[-4000:]


def test_S7_live_registration_refused_and_send_time_recheck_by_the_worker(live, services):
    """S7 on the real processes: gunicorn refuses hostile subscription URLs (422, nothing
    stored); a subscription stored earlier for a loopback URL (say, under an older allowlist)
    is refused again when the worker sends the outcome webhook, and its target sees no
    connection."""
    from authsvc.adapters.db import repo_cases as rc
    from authsvc.domain import ids
    from tests.conftest import order_body
    from tests.security.test_ssrf_tls import HOSTILE

    system, _ = live
    billing = Http(system.api, system.token("ssrf-live", "billing"))
    for url in HOSTILE[:10]:
        status, _, body = billing.request("POST", "/v1/subscriptions", {
            "url": url, "events": ["outcome.created"]}, {"Idempotency-Key": uuid.uuid4().hex})
        assert status == 422 and body["errors"][0]["field"] == "url", (url, status, body)
    victim = socket.socket()
    victim.bind(("127.0.0.1", 0))
    victim.listen(4)
    victim.settimeout(0.5)
    sub_id = ids.new_id("sub")
    try:
        with services.engine.begin() as conn:
            rc.insert_subscription(conn, {
                "id": sub_id, "org_id": "ssrf-live", "events": ["outcome.created"],
                "url": f"http://127.0.0.1:{victim.getsockname()[1]}/hook",
                "secret": "whsec_" + "QUFB" * 8, "created_at": dt.datetime.now(dt.UTC)})
        clin = Http(system.api, system.token("ssrf-live", "clinician"))
        status, _, order = clin.request("POST", "/v1/orders", order_body(
            f"SIM-APPROVE-{uuid.uuid4().hex[:8].upper()}"), {"Idempotency-Key": uuid.uuid4().hex})
        assert status == 201, order
        d = t.webhook_deliveries

        def refused():  # type: ignore[no-untyped-def]
            with services.engine.connect() as conn:
                return conn.execute(sa.select(d.c.last_error).where(
                    d.c.subscription_id == sub_id, d.c.last_error.is_not(None))).scalar()

        assert wait_for(refused, timeout=60).startswith("refused")
        with pytest.raises(TimeoutError):
            victim.accept()
        with services.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(
                t.webhook_subscriptions).where(t.webhook_subscriptions.c.org_id ==
                                                "ssrf-live")).scalar() == 1
    finally:
        victim.close()
