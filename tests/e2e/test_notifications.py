"""Notifications end to end on the real processes, a real SMTP server (aiosmtpd, started here)
and the HTTP SMS sink: the right people hear once, in their language, on their channel."""

from __future__ import annotations

import time
import uuid

import pytest

from authsvc.adapters.notify.sinks import SmsSink, SmtpSink
from tests.conftest import free_port, order_body
from tests.e2e.harness import Http, System, wait_for

pytestmark = pytest.mark.e2e
ORG = "e2e-notify"
OFFICE = "office@valley.example"


@pytest.fixture(scope="module")
def sinks():
    smtp = SmtpSink(port=free_port()).start()
    sms = SmsSink(port=0, username="ACe2e", password="token").start()
    yield {"smtp": smtp, "sms": sms}
    if smtp._controller is not None:
        smtp.stop()
    sms.stop()


@pytest.fixture(scope="module")
def system(database_url, redis_url, tmp_path_factory, sinks):
    sysm = System(database_url, redis_url, tmp_path_factory.mktemp("e2e-notify"), extra_env={
        "AUTHSVC_TESTING": "1", "AUTHSVC_SMTP_URL": sinks["smtp"].url,
        "AUTHSVC_SMS_URL": sinks["sms"].url})
    try:
        yield sysm.up()
    finally:
        sysm.stop()


@pytest.fixture(scope="module")
def clinician(system) -> Http:
    return Http(system.api, system.token(ORG, "clinician"))


@pytest.fixture(scope="module")
def admin(system) -> Http:
    http = Http(system.api, system.token(ORG, "admin"))
    out = system.cli("orgs", "contact", "--org", ORG, "--email", OFFICE)
    assert OFFICE in out
    return http


def submit(http: Http, member: str, contacts: list[dict], **line) -> dict:
    body = order_body(member)
    body["patient"] = {**body["patient"], "mrn": f"MRN-{uuid.uuid4().hex[:8]}",
                       "contacts": contacts}
    body["lines"][0].update(line)
    status, _, order = http.request("POST", "/v1/orders", body,
                                    {"Idempotency-Key": uuid.uuid4().hex})
    assert status == 201, order
    return order


def settled(admin: Http, order_id: str, events: set[str], timeout: float = 90) -> list[dict]:
    """The order's notifications once every one of `events` exists and none is queued."""
    def done():  # type: ignore[no-untyped-def]
        status, _, page = admin.request("GET", f"/v1/admin/notifications?order_id={order_id}")
        assert status == 200
        items = page["items"]
        if events <= {i["event"] for i in items} and all(i["status"] != "queued"
                                                          for i in items):
            return items
        return None

    return wait_for(done, timeout)


def people(tag: str) -> tuple[str, str, list[dict]]:
    phone = "+1555" + str(uuid.uuid4().int)[:7]
    mail = f"luis-{tag}@example.org"
    return phone, mail, [
        {"role": "patient", "phone": phone, "channel": "sms", "language": "es"},
        {"role": "caregiver", "name": "Luis Diaz", "relationship": "spouse", "email": mail,
         "channel": "email", "language": "en"},
        {"role": "caregiver", "name": "Quiet", "email": f"quiet-{tag}@example.org",
         "phone": "+15555550199", "channel": "none", "language": "en"},
    ]


def test_denial_reaches_patient_caregiver_and_office_once(system, clinician, admin, sinks):
    smtp, sms = sinks["smtp"], sinks["sms"]
    tag = uuid.uuid4().hex[:8]
    phone, mail, contacts = people(tag)
    order = submit(clinician, f"SIM-DENY-{tag.upper()}", contacts)
    items = settled(admin, order["id"], {"received", "denied"})
    assert {(i["event"], i["audience"], i["channel"], i["status"]) for i in items} == {
        ("received", "patient", "sms", "sent"), ("received", "caregiver", "email", "sent"),
        ("denied", "patient", "sms", "sent"), ("denied", "caregiver", "email", "sent"),
        ("denied", "provider", "email", "sent")}

    texts = [m for m in sms.received() if m["to"] == phone]
    denial = [m for m in texts if "dijo que no" in m["body"]]
    assert len(texts) == 2 and len(denial) == 1
    assert "no es necesaria" in denial[0]["body"] and "apelación" in denial[0]["body"]
    assert "72148" not in denial[0]["body"] and "M54" not in denial[0]["body"]

    family = [m for m in smtp.received() if m["to"] == [mail]]
    denied = [m for m in family if "said no" in m["subject"]]
    assert len(family) == 2 and len(denied) == 1
    assert "does not think this care is needed" in denied[0]["text"]
    assert "appeal" in denied[0]["text"] and "0F" not in denied[0]["text"]
    office = [m for m in smtp.received()
              if m["to"] == [OFFICE] and order["id"] in m["text"]]
    assert len(office) == 1 and "denied" in office[0]["subject"]
    assert "0F" in office[0]["text"] and "Not Medically Necessary" in office[0]["text"]
    assert not [m for m in smtp.received() if m["to"] == [f"quiet-{tag}@example.org"]]

    # a redelivered message for every notification sends nothing more
    from authsvc.adapters.broker import enqueue, make_broker
    from authsvc.config import Settings

    broker = make_broker(Settings.from_env({"AUTHSVC_REDIS_URL": system.env[
        "AUTHSVC_REDIS_URL"], "AUTHSVC_DATABASE_URL": system.env["AUTHSVC_DATABASE_URL"]}),
        namespace=system.namespace)
    for item in items:
        enqueue(broker, "send_notification", item["id"])
    broker.close()
    _, _, final = clinician.request("GET", f"/v1/orders/{order['id']}")
    shown = [e["detail"] for e in final["timeline"] if e["event"] == "notification_sent"]
    assert len(shown) == 5 and phone not in str(final) and mail not in str(final)
    time.sleep(3)  # give the worker time to (not) send again
    assert len([m for m in sms.received() if m["to"] == phone]) == 2
    assert len([m for m in smtp.received() if m["to"] == [mail]]) == 2


def test_modification_tells_the_quantity_change(system, clinician, admin, sinks):
    smtp = sinks["smtp"]
    tag = uuid.uuid4().hex[:8]
    _, mail, contacts = people(tag)
    order = submit(clinician, f"SIM-MODIFY-{tag.upper()}", contacts, code="97530", quantity=5)
    settled(admin, order["id"], {"modified"})
    family = [m for m in smtp.received() if m["to"] == [mail] and "less" in m["subject"]]
    assert len(family) == 1
    assert "The doctor asked for 5. The plan said yes to 2." in family[0]["text"]
    office = [m for m in smtp.received() if m["to"] == [OFFICE] and order["id"] in m["text"]]
    assert len(office) == 1 and "requested 5, authorized 2" in office[0]["text"]


def test_worker_killed_after_sending_before_commit_texts_once(system, clinician, admin,
                                                              sinks):
    """SIGKILL between the gateway's answer and our commit: the row is sent again after its
    lease expires, with the same idempotency key, and the gateway drops the repeat."""
    sms = sinks["sms"]
    system.kill("worker")
    system.start("worker", "worker", "--threads", "4",
                 env={"AUTHSVC_FP_NOTIFY_AFTER_SEND_BEFORE_COMMIT": "sleep:60"})
    phone = "+1555" + str(uuid.uuid4().int)[:7]
    order = submit(clinician, f"SIM-APPROVE-{uuid.uuid4().hex[:8].upper()}", [
        {"role": "patient", "phone": phone, "channel": "sms", "language": "en"}])
    duplicates = sms.duplicates
    wait_for(lambda: [m for m in sms.received() if m["to"] == phone], 60)
    system.kill("worker")  # the text went out; the worker dies before recording it
    system.start("worker", "worker", "--threads", "4")
    items = settled(admin, order["id"], {"received", "approved"}, timeout=120)
    assert {i["status"] for i in items} == {"sent"}
    assert any(i["attempts"] >= 2 for i in items)  # the killed attempt was redone
    texts = [m for m in sms.received() if m["to"] == phone]
    assert len(texts) == len([i for i in items if i["channel"] == "sms"]) == 2  # no repeat
    assert sms.duplicates > duplicates  # the resend carried the same key and was dropped


def test_smtp_down_for_a_while_delivers_once_after_it_returns(system, clinician, admin,
                                                             sinks):
    smtp = sinks["smtp"]
    port = smtp.port
    smtp.stop()
    tag = uuid.uuid4().hex[:8]
    mail = f"late-{tag}@example.org"
    order = submit(clinician, f"SIM-APPROVE-{tag.upper()}", [
        {"role": "caregiver", "email": mail, "channel": "email", "language": "en"}])

    def retrying():  # type: ignore[no-untyped-def]
        _, _, page = admin.request("GET", f"/v1/admin/notifications?order_id={order['id']}")
        return [i for i in page["items"] if i["event"] == "received" and i["attempts"] >= 2
                and i["status"] == "queued"]

    wait_for(retrying, 60)
    back = SmtpSink(port=port).start()
    sinks["smtp"] = back
    try:
        items = settled(admin, order["id"], {"received", "approved"})
        assert {i["status"] for i in items} == {"sent"}
        got = [m for m in back.received() if m["to"] == [mail]]
        assert sorted(m["subject"] for m in got) == [
            "Good news: the health plan said yes", "We got the request for the patient's care"]
    finally:
        back.stop()
