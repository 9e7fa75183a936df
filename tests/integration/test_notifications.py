"""Notifications on the real database with the real SMTP and SMS sinks: one row per recipient
and channel written with the event, sent once, retried after an outage, permanent failures
recorded on the timeline, duplicates absorbed, admins see status but never content."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import uuid

import pytest
import sqlalchemy as sa

from authsvc.adapters.db import repo
from authsvc.adapters.db import tables as t
from authsvc.adapters.notify.sinks import SmsSink, SmtpSink
from authsvc.domain import clock, ids
from authsvc.domain.payer import DenialReason, LineDecision, PayerAnswer
from authsvc.service_layer import notifications, payer_work
from tests.conftest import auth, free_port, order_body

pytestmark = pytest.mark.integration
ORG = "org-notify"
CONTACTS = [
    {"role": "patient", "phone": "+15555550101", "channel": "sms", "language": "es"},
    {"role": "caregiver", "name": "Luis Diaz", "relationship": "spouse",
     "email": "luis@example.org", "channel": "email", "language": "en"},
    {"role": "caregiver", "name": "Quiet Person", "email": "quiet@example.org",
     "phone": "+15555550199", "channel": "none", "language": "en"},
]


@pytest.fixture(scope="module")
def org_tokens(services) -> dict[str, str]:
    from authsvc.api.auth import create_token

    with services.engine.begin() as conn:
        out = {role: create_token(conn, ORG, role, name=f"{ORG}-{role}")[1]
               for role in ("clinician", "coordinator", "admin")}
        conn.execute(t.organizations.update().where(t.organizations.c.id == ORG).values(
            name="Valley Clinic", provider_email="office@valley.example"))
    return out


def wired(services, smtp: SmtpSink, sms: SmsSink, **extra):  # type: ignore[no-untyped-def]
    return dataclasses.replace(services, settings=services.settings.replace(
        smtp_url=smtp.url, sms_url=sms.url, **extra))


def new_order(client, org_tokens, contacts=CONTACTS, member: str | None = None) -> dict:
    body = order_body(member or f"SIM-DENY-{uuid.uuid4().hex[:6]}")
    body["patient"] = {**body["patient"], "mrn": f"MRN-{uuid.uuid4().hex[:8]}",
                       "contacts": contacts}
    resp = client.post("/v1/orders", json=body, headers=auth(
        org_tokens["coordinator"], **{"Idempotency-Key": uuid.uuid4().hex}))
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


def pended_case(services, order_id: str) -> str:
    """A case the payer pended (stored as the worker would)."""
    now = clock.now()
    case_id = ids.new_id("case")
    with services.engine.begin() as conn:
        repo.insert_case(conn, {
            "id": case_id, "org_id": ORG, "order_id": order_id, "payer_id": "demo",
            "kind": "initial", "certification_type": "I", "urgency": "standard",
            "state": "pended", "payer_received_at": now - dt.timedelta(minutes=5),
            "submitted_at": now - dt.timedelta(minutes=5), "created_at": now,
            "updated_at": now}, [{
                "sequence": 1, "code_system": "CPT", "code": "72148", "quantity": 1,
                "service_start": dt.date(2026, 12, 1), "service_end": None,
                "review_action": "A4"}])
    return case_id


def deny(case_id: str) -> PayerAnswer:
    return PayerAnswer(outcome="complete", claim_identifier=case_id, lines=(LineDecision(
        sequence=1, review_action="A3",
        denial_reason=DenialReason("0F", "Not Medically Necessary")),))


def rows(services, order_id: str, event: str | None = None) -> list[dict]:
    n = t.notifications
    q = sa.select(n).where(n.c.order_id == order_id).order_by(n.c.created_at, n.c.recipient,
                                                               n.c.channel)
    if event:
        q = q.where(n.c.event == event)
    with services.engine.connect() as conn:
        return [dict(r) for r in conn.execute(q).mappings()]


def outbox_for(services, notification_id: str) -> list[dict]:
    o = t.outbox
    with services.engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(o).where(
            o.c.entity_id == notification_id)).mappings()]


def send_all(svc, order_id: str) -> list[str]:
    return [notifications.send(svc, r["id"]) for r in rows(svc, order_id)
            if r["status"] == "queued"]


def test_each_event_writes_one_row_per_recipient_and_channel(services, client, org_tokens):
    order = new_order(client, org_tokens)
    received = rows(services, order["id"], "received")
    assert [(r["audience"], r["channel"], r["language"], r["template"]) for r in received] == [
        ("patient", "sms", "es", "received/patient/sms/es"),
        ("caregiver", "email", "en", "received/caregiver/email/en")]
    assert all(r["status"] == "queued" and r["version"] == 1 for r in received)
    assert all(outbox_for(services, r["id"])[0]["actor"] == "send_notification"
               for r in received)

    case_id = pended_case(services, order["id"])
    results = [payer_work.handle_notification(services, "demo", "wh-deny", deny(case_id))
               for _ in range(3)]  # the payer sends its callback three times
    assert results == ["applied", "duplicate", "duplicate"]
    denied = rows(services, order["id"], "denied")
    assert sorted((r["recipient"], r["channel"]) for r in denied) == [
        ("contact:0", "sms"), ("contact:1", "email"), ("provider", "email")]
    assert all(r["case_id"] == case_id for r in denied)  # contact:2 chose `none`


def test_sent_once_with_provider_ids_and_shown_on_the_timeline(services, client, org_tokens,
                                                             sinks):
    smtp, sms = sinks
    svc = wired(services, smtp, sms)
    order = new_order(client, org_tokens)
    case_id = pended_case(services, order["id"])
    payer_work.handle_notification(services, "demo", f"wh-{case_id}", deny(case_id))
    assert set(send_all(svc, order["id"])) == {"sent"}
    # a redelivered message (or a second worker) finds nothing to do
    assert {notifications.send(svc, r["id"]) for r in rows(svc, order["id"])} == {"skipped"}

    texts = [m for m in sms.received() if m["to"] == "+15555550101"]
    assert len(texts) == 2  # received + denied, one each
    denial_text = texts[1]["body"]
    assert "no es necesaria" in denial_text and "apelación" in denial_text
    assert "72148" not in denial_text and "M54" not in denial_text
    family = [m for m in smtp.received() if m["to"] == ["luis@example.org"]]
    assert [m["subject"] for m in family] == ["We got the request for the patient's care",
                                              "The health plan said no to the care request"]
    assert "does not think this care is needed" in family[1]["text"]
    assert "appeal" in family[1]["text"]
    office = [m for m in smtp.received() if m["to"] == ["office@valley.example"]]
    assert len(office) == 1 and '0F "Not Medically Necessary"' in office[0]["text"]
    assert not [m for m in smtp.received() if "quiet@example.org" in m["to"]]

    sent = rows(svc, order["id"])
    assert all(r["status"] == "sent" and r["provider_message_id"] and r["sent_at"]
               for r in sent)
    view = client.get(f"/v1/orders/{order['id']}",
                      headers=auth(org_tokens["clinician"])).get_json()
    shown = [e for e in view["timeline"] if e["event"] == "notification_sent"]
    assert len(shown) == len(sent)
    assert set(shown[0]["detail"]) == {"notification_id", "recipient", "channel", "template",
                                       "status"}
    assert "+1555" not in str(view["timeline"]) and "example.org" not in str(view["timeline"])
    with svc.engine.connect() as conn:  # each disclosure to the family is in the audit trail
        audited = conn.execute(sa.select(t.audit_events.c.entity_id).where(
            t.audit_events.c.action == "notify",
            t.audit_events.c.entity_id.in_([r["id"] for r in sent]))).scalars().all()
    assert len(audited) == len([r for r in sent if r["audience"] != "provider"]) == 4


def test_an_outage_is_retried_with_backoff_and_delivered_once(services, client, org_tokens,
                                                             sinks):
    smtp, sms = sinks
    down = SmtpSink(port=free_port())  # not started: connection refused
    svc = wired(services, down, sms, retry_base_seconds=5, retry_cap_seconds=10)
    order = new_order(client, org_tokens, contacts=[CONTACTS[1]])
    [row] = rows(svc, order["id"])
    assert notifications.send(svc, row["id"]) == "retry"
    [row] = rows(svc, order["id"])
    assert row["status"] == "queued" and row["attempts"] == 1 and row["last_error"]
    delayed = [o for o in outbox_for(svc, row["id"]) if o["available_at"] > o["created_at"]]
    assert len(delayed) == 1  # the retry waits in the outbox, not in Redis
    assert notifications.send(svc, row["id"]) == "skipped"  # not due yet
    down.start()
    try:
        with svc.engine.begin() as conn:  # time passes
            conn.execute(t.notifications.update().where(t.notifications.c.id == row["id"])
                         .values(next_attempt_at=clock.now() - dt.timedelta(seconds=1)))
        assert notifications.send(svc, row["id"]) == "sent"
        assert notifications.send(svc, row["id"]) == "skipped"
        assert len(down.received()) == 1
    finally:
        down.stop()
    [row] = rows(svc, order["id"])
    assert row["status"] == "sent" and row["attempts"] == 2 and row["last_error"] is None


def test_retries_end_in_failed_and_permanent_failures_are_not_retried(
        services, client, org_tokens, sinks, monkeypatch):
    smtp, sms = sinks
    monkeypatch.setattr(notifications, "MAX_ATTEMPTS", 2)
    svc = wired(services, SmtpSink(port=free_port()), sms, retry_base_seconds=0.01,
                retry_cap_seconds=0.01)
    order = new_order(client, org_tokens, contacts=[
        CONTACTS[1], {"role": "patient", "phone": "+15005550001", "channel": "sms",
                      "language": "en"}])  # a number the gateway refuses
    by_channel = {r["channel"]: r for r in rows(svc, order["id"])}
    email_row, sms_row = by_channel["email"], by_channel["sms"]
    assert notifications.send(svc, sms_row["id"]) == "failed"  # the gateway says 400
    assert notifications.send(svc, email_row["id"]) == "retry"
    with svc.engine.begin() as conn:
        conn.execute(t.notifications.update().where(t.notifications.c.id == email_row["id"])
                     .values(next_attempt_at=clock.now()))
    assert notifications.send(svc, email_row["id"]) == "failed"  # budget spent
    got = {r["channel"]: r for r in rows(svc, order["id"])}
    assert got["sms"]["status"] == "failed" and got["sms"]["attempts"] == 1
    assert "HTTP 400" in got["sms"]["last_error"]
    assert got["email"]["status"] == "failed" and got["email"]["attempts"] == 2
    view = client.get(f"/v1/orders/{order['id']}",
                      headers=auth(org_tokens["clinician"])).get_json()
    failed = [e["detail"] for e in view["timeline"] if e["event"] == "notification_failed"]
    assert sorted(d["channel"] for d in failed) == ["email", "sms"]


def test_a_contact_without_the_channels_address_is_recorded_as_failed(services, client,
                                                                       org_tokens):
    from authsvc.service_layer import timeline

    order = new_order(client, org_tokens, contacts=[CONTACTS[1]])
    with services.engine.begin() as conn:  # stored contacts predating validation
        patient_id = repo.order_row(conn, order["id"])["patient_id"]
        conn.execute(t.patients.update().where(t.patients.c.id == patient_id).values(
            contacts=[{"role": "patient", "channel": "email", "language": "en"}]))
        timeline.record(conn, org_id=ORG, order_id=order["id"], at=clock.now(),
                        event="order_cancelled", actor="system")
    [row] = [r for r in rows(services, order["id"], "cancelled") if r["audience"] == "patient"]
    assert row["status"] == "failed" and "no email address" in row["last_error"]
    assert outbox_for(services, row["id"]) == []


def test_unconfigured_channel_fails_visibly(services, client, org_tokens):
    svc = dataclasses.replace(services, settings=services.settings.replace(
        smtp_url=None, sms_url=None))
    order = new_order(client, org_tokens, contacts=[CONTACTS[0]])
    [row] = rows(svc, order["id"])
    assert notifications.send(svc, row["id"]) == "failed"
    assert "AUTHSVC_SMS_URL" in rows(svc, order["id"])[0]["last_error"]


def test_a_crash_between_send_and_commit_does_not_text_twice(services, client, org_tokens,
                                                            sinks, monkeypatch):
    smtp, sms = sinks
    svc = wired(services, smtp, sms)
    order = new_order(client, org_tokens, contacts=[CONTACTS[0]])
    [row] = rows(svc, order["id"])

    real_timeline = notifications._timeline

    def crash(*args, **kwargs):  # the worker dies after the gateway took the text
        raise SystemExit("killed")

    monkeypatch.setattr(notifications, "_timeline", crash)
    with pytest.raises(SystemExit):
        notifications.send(svc, row["id"])
    monkeypatch.setattr(notifications, "_timeline", real_timeline)
    [row] = rows(svc, order["id"])
    assert row["status"] == "queued" and row["claimed_until"] is not None  # lease left behind
    with svc.engine.begin() as conn:  # the lease expires
        conn.execute(t.notifications.update().where(t.notifications.c.id == row["id"])
                     .values(claimed_until=clock.now() - dt.timedelta(seconds=1)))
    assert row["id"] in notifications.due(svc, clock.now())  # the sweeper finds it
    assert notifications.send(svc, row["id"]) == "sent"
    assert len(sms.received()) == 1 and sms.duplicates == 1  # same idempotency key


def test_documentation_needed_and_overdue_reach_the_provider(services, client, org_tokens):
    from authsvc.service_layer import timeline

    order = new_order(client, org_tokens)
    now = clock.now()
    with services.engine.begin() as conn:
        timeline.record(conn, org_id=ORG, order_id=order["id"], at=now, event="case_opened",
                        actor="system", detail={"state": "needs_input", "sequences": [1]})
        timeline.record(conn, org_id=ORG, order_id=order["id"], at=now, event="case_opened",
                        actor="system", detail={"state": "ready_to_submit"})
        timeline.record(conn, org_id=ORG, order_id=order["id"], at=now,
                        event="decision_overdue", actor="system")
        timeline.record(conn, org_id=ORG, order_id=order["id"], at=now,
                        event="decision_overdue", actor="system")
    docs = rows(services, order["id"], "documentation_needed")
    assert sorted(r["audience"] for r in docs) == ["caregiver", "patient", "provider"]
    overdue = rows(services, order["id"], "overdue")
    assert sorted((r["audience"], r["version"]) for r in overdue) == [("provider", 1),
                                                               ("provider", 2)]


def test_admin_list_shows_status_never_content(services, client, org_tokens, tokens):
    order = new_order(client, org_tokens)
    url = f"/v1/admin/notifications?order_id={order['id']}"
    resp = client.get(url, headers=auth(org_tokens["admin"]))
    assert resp.status_code == 200
    items = resp.get_json()["items"]
    assert len(items) == 2 and {i["status"] for i in items} == {"queued"}
    assert set(items[0]) >= {"id", "order_id", "event", "audience", "channel", "language",
                             "template", "status", "attempts", "sent_at"}
    assert "recipient" not in items[0] and "+1555" not in resp.get_data(as_text=True)
    assert "example.org" not in resp.get_data(as_text=True)
    assert client.get(url, headers=auth(org_tokens["clinician"])).status_code == 403
    other = client.get(url, headers=auth(tokens["org-b"]["admin"]))
    assert other.status_code == 200 and other.get_json()["items"] == []
    bad = client.get("/v1/admin/notifications?order_id=%27%20OR%201=1",
                     headers=auth(org_tokens["admin"]))
    assert bad.status_code == 422
    page = client.get("/v1/admin/notifications?limit=1", headers=auth(org_tokens["admin"]))
    assert page.status_code == 200 and page.get_json()["next_cursor"]
    nxt = client.get(f"/v1/admin/notifications?limit=1&cursor={page.get_json()['next_cursor']}",
                     headers=auth(org_tokens["admin"])).get_json()
    assert nxt["items"][0]["id"] > page.get_json()["items"][0]["id"]
    assert client.get("/v1/admin/notifications?cursor=%00",
                      headers=auth(org_tokens["admin"])).status_code == 400


def test_orgs_contact_command_sets_and_checks_the_provider_contact(services, monkeypatch,
                                                                   capsys):
    from authsvc.commands import orgs

    monkeypatch.setenv("AUTHSVC_DATABASE_URL", services.settings.database_url)
    monkeypatch.setenv("AUTHSVC_WEBHOOK_ALLOWLIST", "127.0.0.1")
    ns = argparse.Namespace
    assert orgs.cmd_contact(ns(org="org-contact", email="office@x.example",
                               webhook_url="http://127.0.0.1:9100/hook")) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("whsec_")
    assert orgs.cmd_contact(ns(org="org-contact", email="not-an-email",
                               webhook_url=None)) == 2
    assert orgs.cmd_contact(ns(org="org-contact", email=None,
                               webhook_url="http://169.254.169.254/latest")) == 2
    with services.engine.connect() as conn:
        row = conn.execute(sa.select(t.organizations).where(
            t.organizations.c.id == "org-contact")).mappings().one()
    assert row["provider_email"] == "office@x.example"
    assert row["provider_webhook_url"] == "http://127.0.0.1:9100/hook"
    assert orgs.cmd_contact(ns(org="org-contact", email="", webhook_url="")) == 0
    with services.engine.connect() as conn:
        row = conn.execute(sa.select(t.organizations).where(
            t.organizations.c.id == "org-contact")).mappings().one()
    assert row["provider_email"] is None and row["provider_webhook_url"] is None


def test_provider_webhook_is_signed_and_carries_the_decision(services, client):
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from authsvc.adapters import webhooks
    from authsvc.adapters.notify import webhook
    from authsvc.api.auth import create_token

    seen: list[tuple[dict, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # noqa: ANN002
            return None

        def do_POST(self):  # noqa: N802
            seen.append(({k.lower(): v for k, v in self.headers.items()},
                         self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    org = f"org-hook-{uuid.uuid4().hex[:6]}"
    with services.engine.begin() as conn:
        token = create_token(conn, org, "coordinator")[1]
        conn.execute(t.organizations.update().where(t.organizations.c.id == org).values(
            provider_webhook_url=f"http://127.0.0.1:{server.server_address[1]}/hooks"))
    svc = dataclasses.replace(services, settings=services.settings.replace(
        webhook_allowlist=("127.0.0.1",)))
    try:
        body = order_body(f"SIM-DENY-{uuid.uuid4().hex[:6]}")
        body["patient"]["contacts"] = []
        order = client.post("/v1/orders", json=body, headers=auth(
            token, **{"Idempotency-Key": uuid.uuid4().hex})).get_json()
        case_id = pended_case(services, order["id"])
        with services.engine.begin() as conn:
            conn.execute(t.cases.update().where(t.cases.c.id == case_id).values(org_id=org))
        payer_work.handle_notification(services, "demo", f"wh-{case_id}", deny(case_id))
        [row] = rows(svc, order["id"])
        assert (row["audience"], row["channel"], row["event"]) == ("provider", "webhook",
                                                                  "denied")
        assert notifications.send(svc, row["id"]) == "sent"
    finally:
        server.shutdown()
        server.server_close()
    [(headers, raw)] = seen
    secret = webhook.org_secret(svc.settings.provider_webhook_secret, org)
    assert webhooks.verify(secret, headers, raw) == row["id"]
    payload = json.loads(raw)
    assert payload["type"] == "notification.denied"
    [line] = payload["data"]["lines"]
    assert (line["denial_code"], line["denial_text"]) == ("0F", "Not Medically Necessary")
    assert "Ana" not in raw.decode() and "SIM-DENY" not in raw.decode()  # no patient details
