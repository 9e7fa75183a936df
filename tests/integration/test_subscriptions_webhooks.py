"""Webhook subscriptions: registration with the SSRF guard, signed deliveries to a real HTTP
receiver that checks them with the `standardwebhooks` verifier, retries after a 500, automatic
disable, redelivery, the delivery log, deletion, roles and tenancy."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import socket
import threading
import uuid

import pytest
import sqlalchemy as sa
from standardwebhooks import Webhook

from authsvc.adapters import ssrf
from authsvc.adapters.db import tables as t
from authsvc.domain import clock
from authsvc.service_layer import webhooks_out
from tests.conftest import auth
from tests.integration.test_cases_factory import insert_case, new_order

pytestmark = pytest.mark.integration


class Receiver:
    """A real HTTP server on 127.0.0.1 that answers from a script and verifies signatures."""

    def __init__(self) -> None:
        self.script: list[int] = []
        self.secret: str | None = None
        self.received: list[dict] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                verified = None
                try:
                    verified = Webhook(owner.secret).verify(body, dict(self.headers))
                except Exception as exc:  # noqa: BLE001 - recorded for the test to see
                    verified = f"invalid: {exc!r}"
                status = owner.script.pop(0) if owner.script else 200
                owner.received.append({"headers": dict(self.headers), "body": body,
                                       "verified": verified, "status": status,
                                       "path": self.path})
                self.send_response(status)
                if status == 302:
                    self.send_header("Location", "http://127.0.0.1:6379/")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/authsvc"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receiver(monkeypatch, services):
    rec = Receiver()
    monkeypatch.setattr(services, "settings", services.settings.replace(
        webhook_allowlist=(f"127.0.0.1:{rec.port}",)))
    yield rec
    rec.close()
    with services.engine.begin() as conn:  # later tests' outcomes need not queue deliveries
        s = t.webhook_subscriptions
        conn.execute(s.update().where(s.c.deleted_at.is_(None)).values(deleted_at=clock.now()))


def subscribe(client, token, url, events=("outcome.created",), key=None):
    return client.post("/v1/subscriptions", json={"url": url, "events": list(events)},
                       headers=auth(token, **{"Idempotency-Key": key or uuid.uuid4().hex}))


def record_approval(client, coord, services, tag) -> dict:
    """An outcome through a real use case (a decision recorded by a coordinator)."""
    order = new_order(client, coord, f"WH-{tag}")
    case_id = insert_case(services, order["id"], "pended", received=clock.now())
    resp = client.post(f"/v1/cases/{case_id}/decision", json={
        "received_via": "fax", "lines": [{"sequence": 1, "outcome": "approved",
                                          "auth_number": f"AUTH-{tag}"}]},
        headers=auth(coord))
    assert resp.status_code == 200, resp.get_json()
    return order


def deliveries_of(services, sub_id) -> list[dict]:
    d = t.webhook_deliveries
    with services.engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(d).where(d.c.subscription_id == sub_id)
                                              .order_by(d.c.created_at)).mappings()]


def make_due(services, delivery_id) -> None:
    d = t.webhook_deliveries
    with services.engine.begin() as conn:
        conn.execute(d.update().where(d.c.id == delivery_id).values(
            next_attempt_at=clock.now() - dt.timedelta(seconds=1)))


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/hook", "http://127.0.0.1:5432/", "http://10.0.0.1/hook",
    "http://169.254.169.254/latest/meta-data/", "http://localhost/hook",
    "http://localhost./hook", "http://[::1]:6380/", "http://0x7f000001/", "http://2130706433/",
    "http://rebind.example.test/hook", "file:///etc/passwd", "gopher://127.0.0.1:6380/_FLUSHALL",
    "http://user:pw@example.org/", "ftp://example.org/",
])
def test_ssrf_targets_are_refused_at_registration(client, tokens, services, monkeypatch, url):
    real = socket.getaddrinfo

    def fake(host, *args, **kwargs):  # a name that resolves to loopback (DNS rebinding)
        if host == "rebind.example.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    resp = subscribe(client, tokens["org-a"]["billing"], url)
    assert resp.status_code == 422, resp.get_json()
    assert resp.get_json()["errors"][0]["field"] == "url"
    with services.engine.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).select_from(t.webhook_subscriptions)
                         .where(t.webhook_subscriptions.c.url == url)).scalar()
    assert n == 0


def test_allowlist_is_host_and_port_specific():
    assert ssrf.check_url("http://127.0.0.1:9100/x", ["127.0.0.1:9100"]).ip == "127.0.0.1"
    assert ssrf.check_url("http://10.1.2.3/x", ["10.0.0.0/8"]).ip == "10.1.2.3"
    for url, allow in (("http://127.0.0.1:9101/x", ["127.0.0.1:9100"]),
                       ("http://10.1.2.3/x", ["10.0.0.0/16"]),
                       ("http://127.0.0.1/x", ["localhost"])):
        with pytest.raises(ssrf.Refused):
            ssrf.check_url(url, allow)


def test_registration_rules_roles_and_tenancy(client, tokens, receiver):
    billing = tokens["org-a"]["billing"]
    missing_key = client.post("/v1/subscriptions", json={"url": receiver.url,
                                                         "events": ["outcome.created"]},
                              headers=auth(billing))
    assert missing_key.status_code == 400
    for body, field in (({"url": receiver.url, "events": ["order.eaten"]}, "events[0]"),
                        ({"url": receiver.url, "events": []}, "events"),
                        ({"events": ["outcome.created"]}, "url"),
                        ({"url": receiver.url, "events": ["outcome.created"], "x": 1}, "x")):
        resp = client.post("/v1/subscriptions", json=body,
                           headers=auth(billing, **{"Idempotency-Key": uuid.uuid4().hex}))
        assert resp.status_code == 422 and resp.get_json()["errors"][0]["field"] == field
    for role in ("clinician", "coordinator"):
        assert subscribe(client, tokens["org-a"][role], receiver.url).status_code == 403
        assert client.get("/v1/subscriptions",
                          headers=auth(tokens["org-a"][role])).status_code == 403
    key = uuid.uuid4().hex
    resp = subscribe(client, billing, receiver.url, key=key)
    assert resp.status_code == 201
    sub = resp.get_json()
    assert sub["secret"].startswith("whsec_") and sub["status"] == "active"
    assert resp.headers["Location"] == f"/v1/subscriptions/{sub['id']}"
    replay = subscribe(client, billing, receiver.url, key=key)
    assert replay.get_json()["id"] == sub["id"] and replay.headers["Idempotent-Replayed"]
    shown = client.get(f"/v1/subscriptions/{sub['id']}", headers=auth(billing)).get_json()
    assert "secret" not in shown
    listed = client.get("/v1/subscriptions", headers=auth(tokens["org-a"]["admin"])).get_json()
    assert sub["id"] in {s["id"] for s in listed["items"]}
    assert all("secret" not in s for s in listed["items"])
    other = tokens["org-b"]["billing"]
    for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/deliveries"),
                         ("POST", "/redeliver")):
        resp = client.open(f"/v1/subscriptions/{sub['id']}{path}", method=method,
                           headers=auth(other))
        assert resp.status_code == 404, (method, path)
    assert sub["id"] not in {s["id"] for s in client.get(
        "/v1/subscriptions", headers=auth(other)).get_json()["items"]}
    assert client.delete(f"/v1/subscriptions/{sub['id']}",
                         headers=auth(billing)).status_code == 204
    assert client.get(f"/v1/subscriptions/{sub['id']}",
                      headers=auth(billing)).status_code == 404


def test_signed_delivery_retried_after_a_500(client, tokens, services, receiver):
    sub = subscribe(client, tokens["org-a"]["billing"], receiver.url).get_json()
    receiver.secret = sub["secret"]
    tag = uuid.uuid4().hex[:8]
    order = record_approval(client, tokens["org-a"]["coordinator"], services, tag)
    [delivery] = deliveries_of(services, sub["id"])
    with services.engine.connect() as conn:
        outbox = conn.execute(sa.select(t.outbox.c.actor).where(
            t.outbox.c.entity_id == delivery["id"])).scalars().all()
    assert outbox == ["deliver_webhook"]  # written with the outcome, same transaction
    receiver.script = [500]
    assert webhooks_out.deliver(services, delivery["id"]) == "retry"
    [row] = deliveries_of(services, sub["id"])
    assert row["status"] == "pending" and row["attempts"] == 1 and row["last_status_code"] == 500
    wait = row["next_attempt_at"] - clock.now()
    assert dt.timedelta(seconds=3) < wait <= dt.timedelta(seconds=5)
    assert webhooks_out.deliver(services, delivery["id"]) == "skipped"  # not due yet
    make_due(services, delivery["id"])
    assert webhooks_out.deliver(services, delivery["id"]) == "delivered"
    assert webhooks_out.deliver(services, delivery["id"]) == "skipped"
    assert len(receiver.received) == 2
    first, second = receiver.received
    assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"]
    assert second["verified"] == first["verified"]
    payload = second["verified"]
    assert isinstance(payload, dict), payload
    assert payload["type"] == "outcome.created"
    assert payload["data"]["order_id"] == order["id"]
    assert payload["data"]["auth_number"] == f"AUTH-{tag}"
    assert payload["data"]["cursor"] and payload["data"]["version"] == 1
    assert second["path"] == "/hooks/authsvc"
    log = client.get(f"/v1/subscriptions/{sub['id']}/deliveries",
                     headers=auth(tokens["org-a"]["billing"])).get_json()
    assert log["items"][0]["status"] == "delivered" and log["items"][0]["attempts"] == 2


def test_retry_schedule_spans_more_than_a_day():
    assert sum(webhooks_out.RETRY_SCHEDULE) >= 24 * 3600
    assert webhooks_out.RETRY_SCHEDULE == sorted(webhooks_out.RETRY_SCHEDULE)


def test_repeated_failure_disables_with_a_reason_and_redeliver_recovers(
        client, tokens, services, receiver, monkeypatch):
    monkeypatch.setattr(webhooks_out, "RETRY_SCHEDULE", [0])
    monkeypatch.setattr(webhooks_out, "DISABLE_AFTER_FAILURES", 2)
    billing = tokens["org-a"]["billing"]
    sub = subscribe(client, billing, receiver.url).get_json()
    receiver.secret = sub["secret"]
    record_approval(client, tokens["org-a"]["coordinator"], services, uuid.uuid4().hex[:8])
    [delivery] = deliveries_of(services, sub["id"])
    receiver.script = [500, 302]
    assert webhooks_out.deliver(services, delivery["id"]) == "retry"
    make_due(services, delivery["id"])
    assert webhooks_out.deliver(services, delivery["id"]) == "failed"
    assert [r["status"] for r in receiver.received] == [500, 302]  # the redirect not followed
    shown = client.get(f"/v1/subscriptions/{sub['id']}", headers=auth(billing)).get_json()
    assert shown["status"] == "disabled"
    assert "2 consecutive failed attempts" in shown["disabled_reason"]
    assert "HTTP 302" in shown["disabled_reason"]
    log = client.get(f"/v1/subscriptions/{sub['id']}/deliveries", headers=auth(billing))
    assert log.get_json()["items"][0]["status"] == "failed"
    # A disabled subscription gets no new deliveries.
    record_approval(client, tokens["org-a"]["coordinator"], services, uuid.uuid4().hex[:8])
    assert len(deliveries_of(services, sub["id"])) == 1
    resp = client.post(f"/v1/subscriptions/{sub['id']}/redeliver", headers=auth(billing))
    assert resp.status_code == 202 and resp.get_json()["queued"] == [delivery["id"]]
    assert resp.get_json()["subscription"]["status"] == "active"
    assert webhooks_out.deliver(services, delivery["id"]) == "delivered"
    assert isinstance(receiver.received[-1]["verified"], dict)


def test_send_time_check_refuses_a_target_no_longer_allowed(client, tokens, services, receiver,
                                                           monkeypatch):
    sub = subscribe(client, tokens["org-a"]["billing"], receiver.url).get_json()
    record_approval(client, tokens["org-a"]["coordinator"], services, uuid.uuid4().hex[:8])
    [delivery] = deliveries_of(services, sub["id"])
    monkeypatch.setattr(services, "settings", services.settings.replace(webhook_allowlist=()))
    assert webhooks_out.deliver(services, delivery["id"]) == "retry"
    [row] = deliveries_of(services, sub["id"])
    assert row["last_error"].startswith("refused") and row["last_status_code"] is None
    assert receiver.received == []


def test_pinned_address_ignores_a_later_dns_answer(receiver, monkeypatch):
    """The address checked is the one connected to: a rebind after the check cannot win."""
    calls = []
    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):
        calls.append(host)
        if host == "hooks.example.test":  # first answer allowed, any later one a trap
            ip = "127.0.0.1" if calls.count(host) == 1 else "192.0.2.1"
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    allow = ["hooks.example.test"]
    body = json.dumps({"ping": 1}).encode()
    receiver.secret = webhooks_out.new_secret()
    from authsvc.adapters import webhooks

    status = ssrf.post(f"http://hooks.example.test:{receiver.port}/x", body,
                       webhooks.headers(receiver.secret, "msg_1", body), allow)
    assert status == 200 and calls.count("hooks.example.test") == 1
    assert receiver.received[0]["headers"]["Host"] == f"hooks.example.test:{receiver.port}"
    assert receiver.received[0]["verified"] == {"ping": 1}


def test_sweep_re_enqueues_due_deliveries_after_a_redis_flush(client, tokens, services,
                                                                settings, receiver, redis_url):
    """The message is gone (flushed Redis); the database row brings it back."""
    import redis

    from authsvc.adapters.broker import make_broker
    from workers.scheduler import Scheduler

    sub = subscribe(client, tokens["org-a"]["billing"], receiver.url).get_json()
    record_approval(client, tokens["org-a"]["coordinator"], services, uuid.uuid4().hex[:8])
    [delivery] = deliveries_of(services, sub["id"])
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    broker = make_broker(settings, namespace=namespace)
    broker.declare_queue("default")
    try:
        scheduler = Scheduler(services, broker)
        scheduler.sweep_once()

        def queued() -> list[list]:
            r = redis.Redis.from_url(redis_url)
            try:
                return [json.loads(m)["args"] for m in
                        r.hgetall(f"{namespace}:default.msgs").values()
                        if json.loads(m)["actor_name"] == "deliver_webhook"]
            finally:
                r.close()

        assert [delivery["id"]] not in queued()  # just due: the relay's outbox row covers it
        d = t.webhook_deliveries
        with services.engine.begin() as conn:
            conn.execute(d.update().where(d.c.id == delivery["id"]).values(
                next_attempt_at=clock.now() - dt.timedelta(minutes=5)))
        scheduler.sweep_once()
        assert [delivery["id"]] in queued()
        with services.engine.begin() as conn:  # a leased delivery is being worked on
            conn.execute(d.update().where(d.c.id == delivery["id"]).values(
                claimed_until=clock.now() + dt.timedelta(minutes=1)))
        fresh = Scheduler(services, broker)
        r = redis.Redis.from_url(redis_url)
        r.delete(f"{namespace}:default.msgs")
        r.close()
        fresh.sweep_once()
        assert [delivery["id"]] not in queued()
    finally:
        broker.close()


def test_redeliver_while_a_worker_is_sending_does_not_post_the_event_twice(
        client, tokens, services, receiver, monkeypatch):
    """"Redeliver" pressed while a worker holds the delivery's lease: the receiver gets the
    event once (the in-flight send is not reset for a second worker to send again)."""
    billing = tokens["org-a"]["billing"]
    sub = subscribe(client, billing, receiver.url).get_json()
    receiver.secret = sub["secret"]
    record_approval(client, tokens["org-a"]["coordinator"], services, uuid.uuid4().hex[:8])
    [delivery] = deliveries_of(services, sub["id"])
    sending, release = threading.Event(), threading.Event()
    real_send = webhooks_out._send

    def slow_send(*args, **kwargs):  # type: ignore[no-untyped-def]
        sending.set()
        release.wait(10)
        return real_send(*args, **kwargs)

    monkeypatch.setattr(webhooks_out, "_send", slow_send)
    results: list[str] = []
    worker = threading.Thread(target=lambda: results.append(
        webhooks_out.deliver(services, delivery["id"])))
    worker.start()
    assert sending.wait(10)
    resp = client.post(f"/v1/subscriptions/{sub['id']}/redeliver", headers=auth(billing),
                       json={"delivery_ids": [delivery["id"]]})
    assert resp.status_code == 202 and resp.get_json()["queued"] == []
    second: list[str] = []
    other = threading.Thread(target=lambda: second.append(
        webhooks_out.deliver(services, delivery["id"])))
    other.start()
    other.join(2)
    release.set()
    worker.join(10)
    other.join(10)
    assert results == ["delivered"] and second == ["skipped"]
    assert len(receiver.received) == 1


def test_two_workers_failing_at_once_both_count_towards_disabling(
        client, tokens, services, receiver, monkeypatch):
    """Two deliveries of one subscription fail at the same moment: two consecutive
    failures, not one (the count is incremented in the database)."""
    monkeypatch.setattr(webhooks_out, "RETRY_SCHEDULE", [60])
    sub = subscribe(client, tokens["org-a"]["billing"], receiver.url).get_json()
    receiver.secret = sub["secret"]
    for _ in range(2):
        record_approval(client, tokens["org-a"]["coordinator"], services,
                        uuid.uuid4().hex[:8])
    deliveries = [d["id"] for d in deliveries_of(services, sub["id"])]
    assert len(deliveries) == 2
    receiver.script = [500, 500]
    both = threading.Barrier(2)
    real_update = webhooks_out.rc.update_delivery

    def update_together(*args, **kwargs):  # type: ignore[no-untyped-def]
        try:  # both workers past their failure count before either commits
            both.wait(1)
        except threading.BrokenBarrierError:
            pass  # the other one waits for this one's row lock: fine
        return real_update(*args, **kwargs)

    monkeypatch.setattr(webhooks_out.rc, "update_delivery", update_together)
    results: list[str] = []
    workers = [threading.Thread(target=lambda i=i: results.append(
        webhooks_out.deliver(services, i))) for i in deliveries]
    for w in workers:
        w.start()
    for w in workers:
        w.join(20)
    assert results == ["retry", "retry"]
    with services.engine.connect() as conn:
        assert conn.execute(sa.select(t.webhook_subscriptions.c.consecutive_failures).where(
            t.webhook_subscriptions.c.id == sub["id"])).scalar() == 2
