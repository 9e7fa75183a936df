"""S10 at the row's scale (reliability.md §3.4): member-id enumeration from one token (200
orders, or 200 `POST /v1/orders/{id}/coverage` calls, with random member ids within a minute)
is throttled with 429 + Retry-After and raises an alert (a PHI-free log line, a metric, a
`rate_limit_events` row, an audited denial); 50 requests with wrong tokens from one address
are throttled and every one of them is audited.

These run on the default limits (`AUTHSVC_RATE_LIMIT_MEMBER_IDS` 120/minute), each with a
token of its own organization, so nothing else in the session is throttled.
"""

from __future__ import annotations

import logging
import uuid

import pytest
import sqlalchemy as sa

from authsvc.adapters.db import tables as t
from tests.conftest import auth
from tests.security.conftest import CANARY, assert_problem, audit_rows, canary_body, fresh_addr

pytestmark = pytest.mark.integration
DEFAULT_DISTINCT = 120


def _token(services, org: str, role: str) -> tuple[str, str]:
    from authsvc.api.auth import create_token

    with services.engine.begin() as conn:
        return create_token(conn, org, role)


def _random_member() -> str:
    return f"SIM-APPROVE-{uuid.uuid4().hex[:10].upper()}"


def _limit_rows(services, token_id: str) -> list[dict]:
    r = t.rate_limit_events
    with services.engine.connect() as conn:
        return [dict(x) for x in conn.execute(sa.select(r).where(r.c.token_id == token_id))
                .mappings()]


def _metric(app, name: str, label: str) -> float:
    text = app.test_client().get("/metrics").get_data(as_text=True)
    for line in text.splitlines():
        if line.startswith(f"{name}{{{label}}}"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _assert_alert_logged(caplog, token_id: str, members: list[str]) -> None:
    from authsvc.logs import JsonFormatter

    alerts = [r for r in caplog.records if getattr(r, "event", "") ==
              "alert:member_id_enumeration"]
    assert alerts, "no alert log line"
    line = JsonFormatter().format(alerts[0])
    assert token_id in line and "enumeration" in line
    everything = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    for value in (*CANARY, *members):
        assert value not in everything, f"{value} in the logs"


def test_S10_200_orders_with_random_member_ids_are_throttled_and_alerted(app, services,
                                                                         redis_url, caplog):
    caplog.set_level(logging.WARNING)
    client = app.test_client()
    org = f"org-enum-{uuid.uuid4().hex[:6]}"
    token_id, token = _token(services, org, "clinician")
    alerts_before = _metric(app, "authsvc_security_alerts_total",
                            'kind="member_id_enumeration"')
    members, statuses, rids = [], [], []
    for _ in range(200):
        member = _random_member()
        rid = uuid.uuid4().hex
        members.append(member)
        rids.append(rid)
        resp = client.post("/v1/orders", json=canary_body(coverage={
            "payer_id": "demo", "member_id": member}), headers=auth(
            token, **{"Idempotency-Key": uuid.uuid4().hex, "X-Request-Id": rid}))
        statuses.append(resp.status_code)
        if resp.status_code == 429:
            assert_problem(resp, 429)
            assert 1 <= int(resp.headers["Retry-After"]) <= 60
    assert statuses == [201] * DEFAULT_DISTINCT + [429] * (200 - DEFAULT_DISTINCT)
    # A member id this token already named is not enumeration: still accepted.
    again = client.post("/v1/orders", json=canary_body(coverage={
        "payer_id": "demo", "member_id": members[3]}), headers=auth(
        token, **{"Idempotency-Key": uuid.uuid4().hex}))
    assert again.status_code == 201
    # Another token of another organization is untouched.
    _, other = _token(services, f"org-enum-{uuid.uuid4().hex[:6]}", "clinician")
    assert client.post("/v1/orders", json=canary_body(coverage={
        "payer_id": "demo", "member_id": _random_member()}), headers=auth(
        other, **{"Idempotency-Key": uuid.uuid4().hex})).status_code == 201
    with services.engine.connect() as conn:
        written = conn.execute(sa.select(sa.func.count()).select_from(t.orders).where(
            t.orders.c.org_id == org)).scalar()
    assert written == DEFAULT_DISTINCT + 1  # nothing written for a 429
    # The alert: rows, metric, audit, log line; no member id in Redis, only pseudonyms.
    rows = _limit_rows(services, token_id)
    assert len(rows) == 200 - DEFAULT_DISTINCT and {r["org_id"] for r in rows} == {org}
    assert {r["route"] for r in rows} == {"/v1/orders"}
    assert _metric(app, "authsvc_security_alerts_total",
                   'kind="member_id_enumeration"') - alerts_before == 200 - DEFAULT_DISTINCT
    assert _metric(app, "authsvc_rate_limited_total", 'scope="member_ids"') >= 80
    audit = audit_rows(services, rids[-1])
    assert [(a["outcome"], a["reason"], a["token_id"]) for a in audit] == [
        ("denied", "rate_limited:member_ids", token_id)]
    _assert_alert_logged(caplog, token_id, members)
    import redis

    client_r = redis.Redis.from_url(redis_url)
    try:
        [key] = client_r.keys(f"authsvc-rl:member_ids:*:{token_id}")
        stored = client_r.zrange(key, 0, -1)
    finally:
        client_r.close()
    assert len(stored) == DEFAULT_DISTINCT
    assert not any(m.encode() in b"".join(stored) for m in members)


def test_S10_200_coverage_fixes_with_random_member_ids_are_throttled(app, services, caplog):
    """The coordinator's "fix the member id" loop: each answer tells whether a member id is
    covered, so it counts towards the same distinct-member-id limit."""
    caplog.set_level(logging.WARNING)
    client = app.test_client()
    org = f"org-enum-{uuid.uuid4().hex[:6]}"
    _, clin = _token(services, org, "clinician")
    token_id, coord = _token(services, org, "coordinator")
    resp = client.post("/v1/orders", json=canary_body(), headers=auth(
        clin, **{"Idempotency-Key": uuid.uuid4().hex}))
    assert resp.status_code == 201
    order_id = resp.get_json()["id"]
    o = t.orders
    members, statuses = [], []
    for _ in range(200):
        with services.engine.begin() as conn:  # the payer said "member not found" again
            conn.execute(o.update().where(o.c.id == order_id).values(
                status="coverage_problem", eligibility_status="member_not_found"))
        member = _random_member()
        members.append(member)
        resp = client.post(f"/v1/orders/{order_id}/coverage", json={"member_id": member},
                           headers=auth(coord))
        statuses.append(resp.status_code)
        if resp.status_code == 429:
            assert_problem(resp, 429)
            assert resp.headers["Retry-After"]
    assert statuses == [200] * DEFAULT_DISTINCT + [429] * (200 - DEFAULT_DISTINCT)
    with services.engine.connect() as conn:
        stored = conn.execute(sa.select(o.c.member_id).where(o.c.id == order_id)).scalar()
    assert stored == members[DEFAULT_DISTINCT - 1]  # refused fixes changed nothing
    rows = _limit_rows(services, token_id)
    assert len(rows) == 200 - DEFAULT_DISTINCT
    assert {r["route"] for r in rows} == {"/v1/orders/<order_id>/coverage"}
    _assert_alert_logged(caplog, token_id, members)


def test_S10_the_member_id_limit_is_configurable_and_fails_open(settings, services,
                                                               monkeypatch):
    from redis.exceptions import ConnectionError as RedisDown

    from authsvc.api import create_app

    app = create_app(settings, services)
    app.config["AUTHSVC_RATE_LIMIT_MEMBER_IDS"] = "3/minute"
    client = app.test_client()
    _, token = _token(services, f"org-enum-{uuid.uuid4().hex[:6]}", "clinician")

    def post(member: str) -> int:
        return client.post("/v1/orders", json=canary_body(coverage={
            "payer_id": "demo", "member_id": member}), headers=auth(
            token, **{"Idempotency-Key": uuid.uuid4().hex})).status_code

    assert [post(_random_member()) for _ in range(4)] == [201, 201, 201, 429]
    # Bad bodies are the route's answer (400/415/422), never counted, never a 500.
    bad = client.post("/v1/orders", data=b'{"coverage": {"member_id": ', headers=auth(
        token, **{"Idempotency-Key": uuid.uuid4().hex}), content_type="application/json")
    assert_problem(bad, 400)
    odd = client.post("/v1/orders", json={"coverage": {"member_id": 12}}, headers=auth(
        token, **{"Idempotency-Key": uuid.uuid4().hex}))
    assert_problem(odd, 422)

    def down(*_a, **_k):
        raise RedisDown("down")

    monkeypatch.setitem(app.extensions, "authsvc_limits_script", down)
    assert post(_random_member()) == 201  # Redis down: intake keeps answering


def test_S10_the_benchmarks_raised_write_limit_also_raises_the_member_id_limit(
        settings, services, monkeypatch):
    from authsvc.api import create_app

    monkeypatch.setenv("AUTHSVC_RATE_LIMIT_TOKEN_WRITE", "100000000/minute")
    monkeypatch.delenv("AUTHSVC_RATE_LIMIT_MEMBER_IDS", raising=False)
    assert create_app(settings, services).config[
        "AUTHSVC_RATE_LIMIT_MEMBER_IDS"] == "100000000/minute"
    monkeypatch.setenv("AUTHSVC_RATE_LIMIT_MEMBER_IDS", "50/10 minutes")
    assert create_app(settings, services).config[
        "AUTHSVC_RATE_LIMIT_MEMBER_IDS"] == "50/10 minutes"


@pytest.mark.parametrize("limit, sent", [(None, 170), ("30/minute", 50)])
def test_S10_wrong_tokens_from_one_address_are_throttled_and_all_audited(settings, services,
                                                                        limit, sent):
    """The default (120 failures a minute per address, see docs/operations.md: a balancer's
    clients share its address) and a deployment set to 30, where the row's 50 wrong tokens
    are throttled."""
    from authsvc.api import create_app

    app = create_app(settings, services)
    if limit:
        app.config["AUTHSVC_RATE_LIMIT_AUTH_FAILURES"] = limit
    allowed = int((limit or "120/minute").split("/")[0])
    client = app.test_client()
    addr = fresh_addr()
    a = t.audit_events
    with services.engine.connect() as conn:
        before = conn.execute(sa.select(sa.func.count()).select_from(t.rate_limit_events)
                              .where(t.rate_limit_events.c.route == "/v1/orders",
                                     t.rate_limit_events.c.token_id.is_(None))).scalar()
    codes = [client.get("/v1/orders", headers=auth(f"asv_wrong{i}"),
                        environ_base={"REMOTE_ADDR": addr}).status_code for i in range(sent)]
    assert codes[:allowed] == [401] * allowed and set(codes[allowed:]) == {429}
    with services.engine.connect() as conn:
        rows = conn.execute(sa.select(a.c.outcome, a.c.reason, a.c.token_id).where(
            a.c.source_ip == addr).order_by(a.c.id)).all()
        after = conn.execute(sa.select(sa.func.count()).select_from(t.rate_limit_events)
                             .where(t.rate_limit_events.c.route == "/v1/orders",
                                    t.rate_limit_events.c.token_id.is_(None))).scalar()
    assert len(rows) == sent and {r.outcome for r in rows} == {"denied"}
    assert all(r.reason and r.reason != "rate_limited:auth_failures" for r in rows[:allowed])
    assert {r.reason for r in rows[allowed:]} == {"rate_limited:auth_failures"}
    assert after - before == sent - allowed
    # Over the limit even a valid token from that address waits; the same token elsewhere
    # is served.
    _, good = _token(services, f"org-enum-{uuid.uuid4().hex[:6]}", "clinician")
    assert client.get("/v1/orders", headers=auth(good),
                      environ_base={"REMOTE_ADDR": addr}).status_code == 429
    assert client.get("/v1/orders", headers=auth(good),
                      environ_base={"REMOTE_ADDR": fresh_addr()}).status_code == 200


def test_S10_a_route_with_its_own_authentication_can_use_the_same_limit(app, services):
    """`security.limit_member_ids` for callers that are not API tokens (e.g. a CDS Hooks
    client whose hook answer tells whether a coverage is active)."""
    from authsvc.api import security
    from authsvc.api.errors import ApiProblem

    caller = f"cdsc_{uuid.uuid4().hex[:12]}"
    before = app.config["AUTHSVC_RATE_LIMIT_MEMBER_IDS"]
    app.config["AUTHSVC_RATE_LIMIT_MEMBER_IDS"] = "2/minute"
    try:
        with app.test_request_context("/cds-services/order-select", method="POST"):
            security.limit_member_ids("org-a", caller, ["SIM-A-1", "SIM-A-2", "SIM-A-1"])
            with pytest.raises(ApiProblem) as refused:
                security.limit_member_ids("org-a", caller, ["SIM-A-3"])
    finally:
        app.config["AUTHSVC_RATE_LIMIT_MEMBER_IDS"] = before
    assert refused.value.status == 429 and int(refused.value.headers["Retry-After"]) >= 1
    assert [r["route"] for r in _limit_rows(services, caller)] == ["/cds-services/<service_id>"]
