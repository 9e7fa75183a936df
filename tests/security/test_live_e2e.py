"""On real processes (tests/e2e/harness.py): S8, the canary PHI scan over a scripted session,
and B14, a bounded schemathesis run against the live `/openapi.json` with a token.

`bench/fuzz.sh` runs the same schemathesis driver for ≥ 10,000 requests.
"""

from __future__ import annotations

import json
import re
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
    for method, path, data, headers in attempts:
        hdrs = {**auth, "Idempotency-Key": uuid.uuid4().hex, **headers}
        status, raw = _raw(system.api, method, path, data, hdrs)
        assert 400 <= status < 500, (path, status)
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
