"""S10 (brute force / enumeration → 429 + Retry-After, audited, alert bookkeeping), L5's
per-organization isolation, and S11 (safe configuration, headers, generic 500s)."""

from __future__ import annotations

import os
import uuid

import pytest
import sqlalchemy as sa

from authsvc.adapters.db import tables as t
from tests.conftest import auth, order_body
from tests.security.conftest import assert_problem, audit_rows, canary_body, fresh_addr

pytestmark = pytest.mark.integration


@pytest.fixture()
def limited_app(settings, services):
    """An app of its own with small limits (the session app keeps generous defaults)."""
    from authsvc.api import create_app

    app = create_app(settings, services)
    app.config.update(AUTHSVC_RATE_LIMIT_TOKEN_WRITE="5/minute",
                      AUTHSVC_RATE_LIMIT_ORG="12/minute", AUTHSVC_RATE_LIMIT_TOKEN="100/minute",
                      AUTHSVC_RATE_LIMIT_AUTH_FAILURES="20/minute")
    return app


def new_token(services, org: str, role: str = "clinician") -> tuple[str, str]:
    from authsvc.api.auth import create_token

    with services.engine.begin() as conn:
        return create_token(conn, org, role)


def test_S10_order_enumeration_from_one_token_is_throttled_and_audited(limited_app, services):
    client = limited_app.test_client()
    token_id, token = new_token(services, f"org-rl-{uuid.uuid4().hex[:6]}")
    statuses, rids = [], []
    for _ in range(8):
        rid = uuid.uuid4().hex
        rids.append(rid)
        member = f"SIM-APPROVE-{uuid.uuid4().hex[:8].upper()}"
        resp = client.post("/v1/orders", json=canary_body(coverage={
            "payer_id": "demo", "member_id": member}), headers=auth(
            token, **{"Idempotency-Key": uuid.uuid4().hex, "X-Request-Id": rid}))
        statuses.append(resp.status_code)
        if resp.status_code == 429:
            assert_problem(resp, 429)
            assert int(resp.headers["Retry-After"]) >= 1
    assert statuses == [201] * 5 + [429] * 3
    with services.engine.connect() as conn:
        orders = conn.execute(sa.select(sa.func.count()).select_from(t.orders).where(
            t.orders.c.org_id == conn.execute(sa.select(t.api_tokens.c.org_id).where(
                t.api_tokens.c.id == token_id)).scalar())).scalar()
        events = conn.execute(sa.select(sa.func.count()).select_from(t.rate_limit_events)
                              .where(t.rate_limit_events.c.token_id == token_id)).scalar()
    assert orders == 5 and events == 3  # nothing written for 429'd requests; alert rows
    row = audit_rows(services, rids[-1])[0]
    assert row["outcome"] == "denied" and row["reason"] == "rate_limited:token_write"
    metrics = limited_app.test_client().get("/metrics").get_data(as_text=True)
    assert 'authsvc_rate_limited_total{scope="token_write"}' in metrics


def test_L5_one_organization_over_quota_leaves_another_untouched(limited_app, services):
    client = limited_app.test_client()
    org_a, org_b = f"org-rla-{uuid.uuid4().hex[:6]}", f"org-rlb-{uuid.uuid4().hex[:6]}"
    a_tokens = [new_token(services, org_a)[1] for _ in range(3)]
    _, b_token = new_token(services, org_b)
    got = [client.get("/v1/orders", headers=auth(a_tokens[i % 3])).status_code
           for i in range(15)]
    assert got[:12] == [200] * 12 and set(got[12:]) == {429}
    assert all(client.get("/v1/orders", headers=auth(b_token)).status_code == 200
               for _ in range(5))


def test_S10_wrong_tokens_from_one_address_are_throttled(limited_app):
    client = limited_app.test_client()
    addr, other = fresh_addr(), fresh_addr()
    codes = [client.get("/v1/orders", headers=auth(f"asv_wrong{i}"),
                        environ_base={"REMOTE_ADDR": addr}).status_code for i in range(50)]
    assert codes[:20] == [401] * 20 and set(codes[20:]) == {429}
    assert client.get("/v1/orders", headers=auth("asv_wrong"),
                      environ_base={"REMOTE_ADDR": other}).status_code == 401


def test_S10_rate_limits_fail_open_when_redis_is_down(limited_app, services, monkeypatch):
    from redis.exceptions import ConnectionError as RedisDown

    def down(*_a, **_k):
        raise RedisDown("down")

    # every limit goes through one Redis script call: make that call fail
    monkeypatch.setitem(limited_app.extensions, "authsvc_limits_script", down)
    _, token = new_token(services, "org-a")
    assert limited_app.test_client().get("/v1/orders", headers=auth(token)).status_code == 200


# ------------------------------------------------------------------ S11


def _prod_settings(settings, **changes):
    return settings.replace(production=True, **changes)


def test_S11_production_refuses_unsafe_configuration(settings, services, monkeypatch):
    from authsvc.api import create_app
    from authsvc.api.security import UnsafeConfiguration, production_problems

    monkeypatch.setenv("AUTHSVC_CORS_ORIGINS", "*")
    monkeypatch.setenv("AUTHSVC_TLS_VERIFY", "0")
    monkeypatch.setenv("FLASK_DEBUG", "1")
    monkeypatch.delenv("AUTHSVC_PAYER_DEMO_SECRET")
    with pytest.raises(UnsafeConfiguration) as err:
        create_app(_prod_settings(settings), services)
    text = " | ".join(err.value.problems)
    for needle in ("DEBUG", "CORS", "TLS verification", "payer demo: callback secret",
                   "https", "AUTHSVC_PROVIDER_WEBHOOK_SECRET", "AUTHSVC_NOTIFY_SECRET"):
        assert needle in text, text
    from flask import Flask

    app = Flask("x")
    app.debug = True
    assert "DEBUG is on" in production_problems(app, _prod_settings(settings), services, {})


def test_S11_a_safe_production_configuration_starts(settings, services, monkeypatch):
    from authsvc.api import create_app

    for name in ("AUTHSVC_CORS_ORIGINS", "AUTHSVC_TLS_VERIFY", "FLASK_DEBUG", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    db = settings.database_url if settings.database_url.startswith("postgresql") else \
        "postgresql+psycopg://app@127.0.0.1:5432/authsvc"
    prod = _prod_settings(settings, public_url="https://authsvc.example",
                          redis_url=settings.redis_url or "redis://127.0.0.1:6379/0",
                          database_url=db, provider_webhook_secret="m" * 48,
                          notify_secret="n" * 48)
    if not (prod.redis_url or "").startswith(("redis://127.", "unix:")):
        pytest.skip("test Redis is not on loopback")
    app = create_app(prod, services)
    assert app.debug is False and app.testing is False


@pytest.mark.parametrize("command", ["worker", "scheduler"])
def test_S11_worker_and_scheduler_refuse_development_secrets_in_production(command, tmp_path):
    """The background processes check the secrets too: a worker hashing opt-outs under the
    public default key (or another key than the API's) would ignore every STOP."""
    import subprocess
    import sys

    env = {**os.environ, "AUTHSVC_ENV": "production", "AUTHSVC_VAR_DIR": str(tmp_path),
           "AUTHSVC_PROVIDER_WEBHOOK_SECRET": "p" * 40}
    env.pop("AUTHSVC_NOTIFY_SECRET", None)
    done = subprocess.run([sys.executable, "-m", "authsvc.cli", command], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "AUTHSVC_NOTIFY_SECRET" in done.stderr
    assert "AUTHSVC_PROVIDER_WEBHOOK_SECRET" not in done.stderr


def test_S11_forced_500_is_generic_problem_json(settings, services, caplog):
    import logging

    from authsvc.api import create_app
    from authsvc.logs import JsonFormatter

    caplog.set_level(logging.INFO)
    app = create_app(settings, services)

    @app.get("/v1/boom")
    def boom():  # type: ignore[no-untyped-def]
        raise ValueError("ZZCANARY Testperson 1901-02-03 CANARYMBR000123")

    resp = app.test_client().get("/v1/boom")
    body = assert_problem(resp, 500)
    assert body["detail"] == "Something went wrong on our side; it has been logged."
    # "it has been logged": as the exception type, without its message (argument values)
    lines = [JsonFormatter().format(r) for r in caplog.records]
    assert any("ValueError" in line for line in lines), lines
    assert not [line for line in lines if any(c in line for c in (
        "ZZCANARY", "Testperson", "1901-02-03", "CANARYMBR000123"))]


def test_S11_headers_cors_server_trace_and_options(app, tokens):
    client = app.test_client()
    token = tokens["org-a"]["clinician"]
    responses = [
        client.get("/healthz"), client.get("/v1/orders", headers=auth(token)),
        client.get("/v1/orders", headers={"Origin": "https://evil.example"}),
        client.get("/nope"), client.open("/v1/orders", method="TRACE"),
        client.options("/v1/orders", headers={"Origin": "https://evil.example"}),
        client.delete("/v1/orders", headers=auth(token)),
    ]
    for resp in responses:
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
        assert resp.headers["Cache-Control"] == "no-store"
        assert resp.headers["Server"] == "authsvc"
        assert "X-Powered-By" not in resp.headers
        assert "Access-Control-Allow-Origin" not in resp.headers
        assert resp.status_code < 500
    assert responses[4].status_code == 405  # TRACE
    assert responses[5].status_code in (200, 204) and responses[5].get_data() == b""


def test_S11_requests_always_verify_tls():
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[2] / "authsvc"
    offenders = [str(p) for p in root.rglob("*.py")
                 if re.search(r"verify\s*=\s*False|CERT_NONE|_create_unverified_context",
                              p.read_text())]
    assert offenders == []


def test_S11_post_order_without_debug_leaks_nothing_on_validation(app, tokens):
    resp = app.test_client().post("/v1/orders", json=canary_body(lines="x"), headers=auth(
        tokens["org-a"]["clinician"], **{"Idempotency-Key": uuid.uuid4().hex}))
    assert_problem(resp, 422)
    assert app.debug is False
    assert order_body()  # the canary body differs only in PHI
