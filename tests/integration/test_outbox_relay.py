"""The outbox relay and the sweeper on the real database and Redis: committed work reaches
the queue, and work whose message vanished (flushed Redis) is rebuilt from the database."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest
import redis
import sqlalchemy as sa

from authsvc.adapters.broker import make_broker
from authsvc.adapters.db import repo
from authsvc.adapters.db import tables as t
from authsvc.domain import clock, ids
from tests.conftest import auth, order_body
from workers.scheduler import Scheduler

pytestmark = pytest.mark.integration


@pytest.fixture()
def namespace():
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def scheduler(services, settings, namespace):
    broker = make_broker(settings, namespace=namespace)
    broker.declare_queue("default")
    yield Scheduler(services, broker)
    broker.close()


def queued(redis_url: str, namespace: str) -> list[tuple[str, list]]:
    r = redis.Redis.from_url(redis_url)
    msgs = r.hgetall(f"{namespace}:default.msgs")
    out = []
    for raw in msgs.values():
        m = json.loads(raw)
        out.append((m["actor_name"], m["args"]))
    r.close()
    return out


def test_intake_writes_the_outbox_and_the_relay_publishes_it_once(
        client, tokens, services, scheduler, redis_url, namespace):
    order = client.post("/v1/orders", json=order_body(), headers=auth(
        tokens["org-a"]["clinician"], **{"Idempotency-Key": uuid.uuid4().hex})).get_json()
    with services.engine.connect() as conn:
        check_id = conn.execute(sa.select(t.eligibility_checks.c.id).where(
            t.eligibility_checks.c.order_id == order["id"])).scalar_one()
    assert scheduler.relay_once() >= 1
    assert ("run_eligibility", [check_id]) in queued(redis_url, namespace)
    with services.engine.connect() as conn:
        row = conn.execute(sa.select(t.outbox).where(t.outbox.c.entity_id == check_id)).first()
    assert row.published_at is not None and row.publish_count == 1
    assert scheduler.relay_once() == 0  # nothing published twice


def test_messages_carry_ids_only(client, tokens, scheduler, redis_url, namespace):
    client.post("/v1/orders", json=order_body(member_id="SIM-APPROVE-PHI9"), headers=auth(
        tokens["org-a"]["clinician"], **{"Idempotency-Key": uuid.uuid4().hex}))
    scheduler.relay_once()
    r = redis.Redis.from_url(redis_url)
    dump = b" ".join(r.hgetall(f"{namespace}:default.msgs").values())
    r.close()
    for phi in (b"Diaz", b"Ana", b"1984-03-02", b"SIM-APPROVE-PHI9", b"MRN-0001"):
        assert phi not in dump


def test_delayed_outbox_rows_wait_for_their_time(services, scheduler, redis_url, namespace):
    now = clock.now()
    entity = ids.new_id("case")
    with services.engine.begin() as conn:
        repo.add_outbox(conn, "submit_case", entity, now,
                        available_at=now + dt.timedelta(minutes=5))
    scheduler.relay_once()
    assert ("submit_case", [entity]) not in queued(redis_url, namespace)


def test_sweeper_rebuilds_work_lost_with_a_flushed_redis(
        services, scheduler, redis_url, namespace, client, tokens):
    order = client.post("/v1/orders", json=order_body(), headers=auth(
        tokens["org-a"]["clinician"], **{"Idempotency-Key": uuid.uuid4().hex})).get_json()
    scheduler.relay_once()
    r = redis.Redis.from_url(redis_url)
    for key in r.scan_iter(f"{namespace}:*"):
        r.delete(key)  # the messages are gone, as after FLUSHALL
    r.close()
    stale = clock.now() - dt.timedelta(hours=1)
    with services.engine.begin() as conn:
        conn.execute(t.eligibility_checks.update().where(
            t.eligibility_checks.c.order_id == order["id"]).values(requested_at=stale))
        check_id = conn.execute(sa.select(t.eligibility_checks.c.id).where(
            t.eligibility_checks.c.order_id == order["id"])).scalar_one()
    assert scheduler.sweep_once() >= 1
    assert ("run_eligibility", [check_id]) in queued(redis_url, namespace)
