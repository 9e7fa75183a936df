"""Notifications end to end on the real processes, a real SMTP server (aiosmtpd, started here)
and the HTTP SMS sink: the right people hear once, in their language, on their channel; a
STOP reply and an unsubscribe link silence them (visibly); the worker's counters show in the
API's /metrics (one PROMETHEUS_MULTIPROC_DIR for every process)."""

from __future__ import annotations

import re
import time
import urllib.request
import uuid

import pytest

from authsvc.adapters.notify.sinks import SmsSink, SmtpSink
from tests.conftest import free_port, order_body
from tests.e2e.harness import Http, System, wait_for

pytestmark = pytest.mark.e2e
ORG = "e2e-notify"
OFFICE = "office@valley.example"
SMS_TOKEN = "e2e-sms-auth-token"  # noqa: S105 - the gateway's auth token in this test


@pytest.fixture(scope="module")
def sinks():
    smtp = SmtpSink(port=free_port()).start()
    sms = SmsSink(port=0, username="ACe2e", password="token").start()
    yield {"smtp": smtp, "sms": sms}
    if smtp._controller is not None:
        smtp.stop()
    sms.stop()


@pytest.fixture(scope="module")
def own_database(database_url, tmp_path_factory):
    """A database of this module's own: every notification in it is sent by the system's
    worker (never by the test process), so /metrics can be compared with it exactly."""
    import secrets

    import sqlalchemy as sa

    from authsvc.adapters.db.engine import upgrade

    if not database_url.startswith("postgresql"):
        url = f"sqlite:///{tmp_path_factory.mktemp('e2e-notify-db') / 'notify.db'}"
        upgrade(url)
        yield url
        return
    name = f"authsvc_ntf_{secrets.token_hex(4)}"
    admin = sa.create_engine(database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = database_url.rsplit("/", 1)[0] + "/" + name
    upgrade(url)
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="module")
def system(own_database, redis_url, tmp_path_factory, sinks):
    logdir = tmp_path_factory.mktemp("e2e-notify")
    (logdir / "metrics").mkdir()
    sysm = System(own_database, redis_url, logdir, extra_env={
        "AUTHSVC_TESTING": "1", "AUTHSVC_SMTP_URL": sinks["smtp"].url,
        "AUTHSVC_SMS_URL": sinks["sms"].url, "AUTHSVC_SMS_AUTH_TOKEN": SMS_TOKEN,
        "PROMETHEUS_MULTIPROC_DIR": str(logdir / "metrics")})
    # the sink plays the patient's phone: its replies go to the API, signed like Twilio's
    sinks["sms"].inbound_url = f"{sysm.api}/v1/notifications/sms-inbound"
    sinks["sms"].auth_token = SMS_TOKEN
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


def live_smtp(sinks) -> SmtpSink:  # type: ignore[no-untyped-def]
    """The SMTP sink, started again on its port if an earlier test left it stopped."""
    if sinks["smtp"]._controller is None:
        sinks["smtp"] = SmtpSink(port=sinks["smtp"].port).start()
    return sinks["smtp"]


def test_stop_reply_and_unsubscribe_link_silence_the_next_messages(system, clinician, admin,
                                                                   sinks):
    """Through the real API: the phone replies STOP (signed by the gateway), the caregiver
    uses the email's one-click List-Unsubscribe; the next decision reaches the office only,
    and the family rows say `suppressed` / `opted_out` instead of vanishing."""
    smtp, sms = live_smtp(sinks), sinks["sms"]
    tag = uuid.uuid4().hex[:8]
    phone, mail, contacts = people(tag)
    first = submit(clinician, f"SIM-APPROVE-{tag.upper()}", contacts)
    settled(admin, first["id"], {"received", "approved"})
    [received] = [m for m in smtp.received() if m["to"] == [mail] and "We got" in m["subject"]]
    assert received["list_unsubscribe_post"] == "List-Unsubscribe=One-Click"
    link = received["list_unsubscribe"].strip("<>")
    assert link.startswith(f"{system.api}/v1/notifications/unsubscribe?token=")

    assert sms.reply(phone, "STOP")[0] == 200
    req = urllib.request.Request(link, data=b"List-Unsubscribe=One-Click", method="POST",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - the test's own API
        assert resp.status == 200
    texts, emails = len([m for m in sms.received() if m["to"] == phone]), len(
        [m for m in smtp.received() if m["to"] == [mail]])

    second = submit(clinician, f"SIM-DENY-{tag.upper()}", contacts)
    items = settled(admin, second["id"], {"received", "denied"})
    assert {(i["event"], i["audience"], i["channel"], i["status"]) for i in items} == {
        ("received", "patient", "sms", "suppressed"),
        ("received", "caregiver", "email", "suppressed"),
        ("denied", "patient", "sms", "suppressed"),
        ("denied", "caregiver", "email", "suppressed"),
        ("denied", "provider", "email", "sent")}
    assert {i["last_error"] for i in items if i["status"] == "suppressed"} == {"opted_out"}
    time.sleep(1)
    assert len([m for m in sms.received() if m["to"] == phone]) == texts
    assert len([m for m in smtp.received() if m["to"] == [mail]]) == emails
    _, _, view = clinician.request("GET", f"/v1/orders/{second['id']}")
    shown = [e["detail"] for e in view["timeline"] if e["event"] == "notification_suppressed"]
    assert len(shown) == 4 and {d["reason"] for d in shown} == {"opted_out"}
    assert phone not in str(view) and mail not in str(view)

    assert sms.reply(phone, "START")[0] == 200  # the phone opts back in
    third = submit(clinician, f"SIM-APPROVE-{uuid.uuid4().hex[:8].upper()}", contacts[:1])
    items = settled(admin, third["id"], {"received", "approved"})
    assert {i["status"] for i in items if i["channel"] == "sms"} == {"sent"}


METRIC_RE = re.compile(r'^(authsvc_notification\w*)\{([^}]*)\} ([0-9.e+]+)$')


def _metrics(system) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"{system.api}/metrics", timeout=10) as resp:  # noqa: S310
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        m = METRIC_RE.match(line)
        if m:
            labels = tuple(sorted(tuple(kv.split("=", 1)) for kv in m.group(2).split(",")))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def test_worker_counters_show_in_the_api_metrics(system, clinician, admin, own_database,
                                                 sinks):
    """The API never sends a notification; the worker does. Its sent/failed/suppressed counters
    reach the API's /metrics through the shared multiprocess directory, equal to what the
    database says was sent and suppressed, with labels that identify no one."""
    import sqlalchemy as sa

    from authsvc.adapters.db import tables as t

    live_smtp(sinks)
    tag = uuid.uuid4().hex[:8]
    _, _, contacts = people(tag)
    order = submit(clinician, f"SIM-APPROVE-{tag.upper()}", contacts)
    settled(admin, order["id"], {"received", "approved"})
    engine = sa.create_engine(own_database)
    n = t.notifications
    with engine.connect() as conn:
        queued = conn.execute(sa.select(sa.func.count()).where(n.c.status == "queued")).scalar()
        assert queued == 0  # every test of this module settles its orders
        counts = {(ch, st): c for ch, st, c in conn.execute(
            sa.select(n.c.channel, n.c.status, sa.func.count())
            .group_by(n.c.channel, n.c.status)).all()}
    engine.dispose()
    assert counts[("sms", "sent")] >= 2 and counts[("email", "sent")] >= 2
    metrics = _metrics(system)
    sends = {(dict(labels)["channel"].strip('"'), dict(labels)["result"].strip('"')): value
             for (name, labels), value in metrics.items() if name == "authsvc_notifications_total"}
    for channel in ("sms", "email"):
        assert sends.get((channel, "sent")) == counts.get((channel, "sent")), (channel, sends)
        assert sends.get((channel, "suppressed")) == counts.get((channel, "suppressed"))
    for (_name, labels) in metrics:  # labels name a channel, a result or an action: no ids
        assert {k for k, _ in labels} <= {"channel", "result", "action"}
        for _, value in labels:
            assert re.fullmatch(r'"[a-z_]+"', value), value
