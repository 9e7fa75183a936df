"""CDS Hooks `order-sign` latency over HTTP under gunicorn (issue 10: p99 ≤ 50 ms).

Run: ``.venv/bin/python -m bench.crd [--calls 1000] [--warmup 50] [--concurrency 1]``

One run, on one fresh PostgreSQL database (created and dropped WITH (FORCE) here): migrate,
register a CDS client with a JWKS generated here (``authsvc cds-clients add --jwks-file``),
start ``authsvc serve --workers 2`` as tests/e2e/harness.py does (AUTHSVC_PUBLIC_URL = the
server's own URL, so the JWT audience is the service URL), then send ``--calls`` order-sign
requests, each with 3 draft orders (lumbar MRI, office visit, home oxygen) and full prefetch
(Patient, Coverage, PractitionerRole, Practitioner), each with its own freshly signed RS384
JWT (unique jti; tokens are signed before the clock starts). Latency is measured per call on
the client, connect to last byte. Everything but the one JSON result line goes to stderr.

Environment: ``AUTHSVC_BENCH_DATABASE_URL`` (admin URL, default
postgresql+psycopg://postgres@127.0.0.1:5432/test), ``AUTHSVC_BENCH_REDIS_URL`` (default
redis://127.0.0.1:6379/0).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
TARGET_P99_MS = 50.0
RATE_LIMIT_ENV = ("AUTHSVC_RATE_LIMIT_TOKEN", "AUTHSVC_RATE_LIMIT_ORG",
                  "AUTHSVC_RATE_LIMIT_TOKEN_WRITE")
CPT = "http://www.ama-assn.org/go/cpt"
HCPCS = "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"


def log(msg: str) -> None:
    print(f"[bench.crd {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    k = max(0, min(len(values) - 1, int(-(-pct * len(values) // 100)) - 1))
    return values[k]


def hook_body() -> dict[str, Any]:
    """order-sign with 3 draft orders and full prefetch, for the demo payer."""
    def order(rid: str, system: str, code: str, text: str) -> dict[str, Any]:
        return {"resourceType": "ServiceRequest", "id": rid, "status": "draft",
                "intent": "original-order",
                "code": {"coding": [{"system": system, "code": code}], "text": text},
                "subject": {"reference": "Patient/123"},
                "occurrenceDateTime": "2026-12-01",
                "requester": {"reference": "PractitionerRole/PR1"},
                "reasonCode": [{"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm",
                                            "code": "M54.50"}]}]}

    def bundle(*resources: dict[str, Any]) -> dict[str, Any]:
        return {"resourceType": "Bundle", "type": "searchset",
                "entry": [{"resource": r} for r in resources]}

    return {
        "hook": "order-sign", "hookInstance": "", "fhirServer": "https://ehr.example.org/fhir",
        "context": {
            "userId": "Practitioner/P1", "patientId": "123", "encounterId": "987",
            "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": [
                {"resource": order("sr-1", CPT, "72148", "MRI lumbar spine")},
                {"resource": order("sr-2", CPT, "99213", "Office visit")},
                {"resource": order("sr-3", HCPCS, "E0424", "Home oxygen concentrator")},
            ]}},
        "prefetch": {
            "patient": {"resourceType": "Patient", "id": "123", "gender": "female",
                        "birthDate": "1984-03-02", "name": [{"family": "Diaz",
                                                              "given": ["Ana"]}]},
            "coverage": bundle({"resourceType": "Coverage", "id": "cov1", "status": "active",
                                "subscriberId": "SIM-APPROVE-0001",
                                "beneficiary": {"reference": "Patient/123"},
                                "payor": [{"display": "Demo Health Plan"}]}),
            "practitionerRoles": bundle({"resourceType": "PractitionerRole", "id": "PR1",
                                         "practitioner": {"reference": "Practitioner/P1"}}),
            "practitioners": bundle({"resourceType": "Practitioner", "id": "P1", "identifier": [
                {"system": "http://hl7.org/fhir/sid/us-npi", "value": "1003000126"}]}),
        },
    }


class Run:
    """Processes and the database of one run, stopped and dropped whatever happens."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="authsvc-bench-crd-"))
        self.proc: subprocess.Popen | None = None
        self.log_file: Any = None
        self.db: tuple[str, str] | None = None
        self.failed = False

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self.log_file:
            self.log_file.close()
        if self.db is not None:
            import sqlalchemy as sa

            admin = sa.create_engine(self.db[0], isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{self.db[1]}" WITH (FORCE)'))
            admin.dispose()
        if self.failed:
            log(f"server log kept in {self.tmp}")


def run(args: argparse.Namespace, r: Run) -> dict[str, Any]:
    import jwt
    import sqlalchemy as sa
    from cryptography.hazmat.primitives.asymmetric import rsa

    admin_url = os.environ.get("AUTHSVC_BENCH_DATABASE_URL", DEFAULT_ADMIN_URL)
    redis_url = os.environ.get("AUTHSVC_BENCH_REDIS_URL", DEFAULT_REDIS_URL)
    name = f"authsvc_bench_{secrets.token_hex(4)}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    r.db = (admin_url, name)
    db_url = admin_url.rsplit("/", 1)[0] + "/" + name
    port = free_port()
    api = f"http://{HOST}:{port}"
    env = {**os.environ, "AUTHSVC_DATABASE_URL": db_url, "AUTHSVC_REDIS_URL": redis_url,
           "AUTHSVC_VAR_DIR": str(r.tmp / "var"), "AUTHSVC_PORT": str(port),
           "AUTHSVC_PUBLIC_URL": api, "PYTHONUNBUFFERED": "1",
           **{k: "100000000/minute" for k in RATE_LIMIT_ENV}}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)

    def cli(*argv: str) -> str:
        return subprocess.run([sys.executable, "-m", "authsvc.cli", *argv], env=env, cwd=ROOT,
                              check=True, capture_output=True, text=True).stdout

    cli("db", "upgrade")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())),
           "kid": "bench", "use": "sig", "alg": "RS384"}
    (r.tmp / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    iss = "https://ehr.bench.example.org"
    cli("cds-clients", "add", "--org", "bench", "--iss", iss,
        "--jwks-file", str(r.tmp / "jwks.json"))
    log(f"database {name} migrated; CDS client registered")

    r.log_file = open(r.tmp / "api.log", "ab")  # noqa: SIM115 - closed in Run.close
    r.proc = subprocess.Popen([sys.executable, "-m", "authsvc.cli", "serve", "--workers",
                               str(args.workers)], env=env, cwd=ROOT, stdout=r.log_file,
                              stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{api}/readyz", timeout=2) as resp:  # noqa: S310
                if resp.status == 200:
                    break
        except OSError:
            pass
        if r.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the API did not become ready")
        time.sleep(0.2)
    log(f"authsvc ready on :{port} ({args.workers} sync workers)")

    total = args.warmup + args.calls
    now = int(time.time())
    aud = f"{api}/cds-services/order-sign"
    tokens = [jwt.encode({"iss": iss, "sub": "bench-ehr", "aud": aud, "iat": now,
                          "exp": now + 290, "jti": uuid.uuid4().hex}, key, algorithm="RS384",
                         headers={"kid": "bench"}) for _ in range(total)]
    template = hook_body()
    bodies = []
    for _ in range(total):
        template["hookInstance"] = str(uuid.uuid4())
        bodies.append(json.dumps(template).encode())
    log(f"{total} JWTs signed; sending {args.warmup} warm-up + {args.calls} measured calls, "
        f"concurrency {args.concurrency}")

    # Context for the figures: the same server answering discovery (no database, no JWT).
    baseline: list[float] = []
    for _ in range(200):
        started = time.perf_counter()
        conn = http.client.HTTPConnection(HOST, port, timeout=10)
        conn.request("GET", "/cds-services")
        conn.getresponse().read()
        conn.close()
        baseline.append((time.perf_counter() - started) * 1000)
    baseline.sort()

    latencies: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    counter = iter(range(total))

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            started = time.perf_counter()
            try:
                conn = http.client.HTTPConnection(HOST, port, timeout=10)
                conn.request("POST", "/cds-services/order-sign", body=bodies[i], headers={
                    "Content-Type": "application/json",
                    "Authorization": f"Bearer {tokens[i]}"})
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                status = resp.status
                ok = status == 200 and len(json.loads(data)["systemActions"]) == 3
            except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                status, ok = type(exc).__name__, False
            elapsed = (time.perf_counter() - started) * 1000
            with lock:
                if not ok:
                    errors[str(status)] = errors.get(str(status), 0) + 1
                elif i >= args.warmup:
                    latencies.append(elapsed)

    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    latencies.sort()
    if not latencies:
        r.failed = True
        raise RuntimeError(f"no successful call; errors {errors}")
    p99 = percentile(latencies, 99)
    result = {
        "benchmark": "crd", "hook": "order-sign", "draft_orders": 3, "calls": len(latencies),
        "warmup": args.warmup, "concurrency": args.concurrency, "workers": args.workers,
        "p50_ms": round(percentile(latencies, 50), 2), "p99_ms": round(p99, 2),
        "max_ms": round(latencies[-1], 2), "calls_per_s": round(total / wall, 1),
        "discovery_p50_ms": round(percentile(baseline, 50), 2),
        "discovery_p99_ms": round(percentile(baseline, 99), 2),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "errors": sum(errors.values()), "targets": {"p99_ms_max": TARGET_P99_MS},
        "met": p99 <= TARGET_P99_MS and not errors,
    }
    if errors:
        log(f"errors: {errors}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    r = Run()
    try:
        result = run(args, r)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - report, clean up, exit 1
        r.failed = True
        log(f"failed: {type(exc).__name__}: {exc}")
        return 1
    finally:
        r.close()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
