"""Opt-out (SMS STOP replies, email unsubscribe links) and the address fixed at planning, on
the real database with the real SMTP and SMS sinks: an opted-out patient or caregiver gets
nothing more on that channel and the row says so (`suppressed`, reason `opted_out`); the
provider still hears; a contact edited after planning does not redirect a planned message."""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
import uuid

import pytest
import sqlalchemy as sa

from authsvc.adapters.db import tables as t
from authsvc.adapters.notify import optout
from authsvc.service_layer import notifications
from tests.conftest import auth, free_port, order_body
from tests.security.conftest import ROLES, assert_problem, operations, token_operations

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def spec(app) -> dict:
    return app.test_client().get("/openapi.json").get_json()
ORG = "org-optout"
OTHER = "org-optout-2"
OFFICE = "office@optout.example"
SMS_TOKEN = "test-sms-auth-token"  # noqa: S105 - the gateway's auth token in these tests
INBOUND = "/v1/notifications/sms-inbound"


@pytest.fixture(scope="module")
def org_tokens(services) -> dict[str, dict[str, str]]:
    from authsvc.api.auth import create_token

    out: dict[str, dict[str, str]] = {}
    with services.engine.begin() as conn:
        for org in (ORG, OTHER):
            out[org] = {role: create_token(conn, org, role)[1]
                        for role in ("coordinator", "clinician", "admin")}
            conn.execute(t.organizations.update().where(t.organizations.c.id == org).values(
                name=f"Clinic {org}", provider_email=OFFICE))
    return out


@pytest.fixture()
def svc(services, app, sinks, monkeypatch):
    """Services wired to the sinks and a gateway auth token, also behind the test app."""
    smtp, sms = sinks
    wired = dataclasses.replace(services, settings=services.settings.replace(
        smtp_url=smtp.url, sms_url=sms.url, sms_auth_token=SMS_TOKEN))
    monkeypatch.setitem(app.extensions, "authsvc", wired)
    return wired


def tag() -> str:
    return uuid.uuid4().hex[:8]


def phone() -> str:
    return "+1555" + str(uuid.uuid4().int)[:7]


def new_order(client, token: str, contacts: list[dict], mrn: str | None = None) -> dict:
    body = order_body(f"SIM-APPROVE-{tag()}")
    body["patient"] = {**body["patient"], "mrn": mrn or f"MRN-{tag()}", "contacts": contacts}
    resp = client.post("/v1/orders", json=body, headers=auth(
        token, **{"Idempotency-Key": uuid.uuid4().hex}))
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


def rows(services, order_id: str) -> list[dict]:
    n = t.notifications
    with services.engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(n).where(n.c.order_id == order_id)
                                              .order_by(n.c.created_at, n.c.id)).mappings()]


def send_all(services, order_id: str) -> dict[str, str]:
    return {r["id"]: notifications.send(services, r["id"]) for r in rows(services, order_id)
            if r["status"] == "queued"}


def cancel(services, order_id: str, org: str = ORG) -> None:
    """Another event on the order (the order is cancelled): everyone hears again."""
    from authsvc.domain import clock
    from authsvc.service_layer import timeline

    with services.engine.begin() as conn:
        timeline.record(conn, org_id=org, order_id=order_id, at=clock.now(),
                        event="order_cancelled", actor="system")


def text_in(client, services, sender: str, body: str, token: str = SMS_TOKEN,
            **extra: str):  # type: ignore[no-untyped-def]
    params = [("From", sender), ("Body", body), ("To", "+15550100000"),
              ("MessageSid", "SM" + uuid.uuid4().hex), *extra.items()]
    url = services.settings.public_url + INBOUND
    return client.post(INBOUND, data=dict(params), headers={
        "X-Twilio-Signature": optout.twilio_signature(token, url, params)})


def optout_rows(services) -> list[dict]:
    with services.engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(t.notification_optouts)).mappings()]


# ------------------------------------------------------------------ SMS STOP


def test_twilio_signature_matches_twilios_own_test_vector():
    params = {"CallSid": "CA1234567890ABCDE", "Caller": "+14158675309", "Digits": "1234",
              "From": "+14158675309", "To": "+18005551212"}
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    assert optout.twilio_signature("12345", url, params.items()) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    assert optout.twilio_valid("12345", url, params.items(), "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    assert not optout.twilio_valid("12345", url + "&x=1", params.items(),
                                   "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    assert not optout.twilio_valid(None, url, params.items(), "RSOYDt4T1cUTdK1PDd93/VVr8B8=")


def test_stop_reply_silences_texts_visibly_and_start_brings_them_back(
        svc, client, org_tokens, sinks):
    smtp, sms = sinks
    number = phone()
    contacts = [{"role": "patient", "phone": number, "channel": "sms", "language": "es"}]
    first = new_order(client, org_tokens[ORG]["coordinator"], contacts)
    assert set(send_all(svc, first["id"]).values()) == {"sent"}
    assert len([m for m in sms.received() if m["to"] == number]) == 1

    resp = text_in(client, svc, number, " Stop ")
    assert resp.status_code == 200 and resp.mimetype == "application/xml"
    [row] = [r for r in optout_rows(svc) if r["address_hash"] == optout.address_hash(
        svc.settings.notify_secret, "sms", number)]
    assert (row["org_id"], row["channel"], row["reason"]) == ("*", "sms", "sms_stop")
    assert number not in str(optout_rows(svc)) and number[1:] not in str(optout_rows(svc))
    with svc.engine.connect() as conn:  # audited, ids only
        audited = conn.execute(sa.select(t.audit_events).where(
            t.audit_events.c.action == "opt_out",
            t.audit_events.c.request_id == resp.headers["X-Request-Id"])).mappings().all()
    assert len(audited) == 1 and number not in str(dict(audited[0]))

    # the same patient's next order (any organization shares the sending number)
    for org in (ORG, OTHER):
        order = new_order(client, org_tokens[org]["coordinator"], contacts)
        assert set(send_all(svc, order["id"]).values()) == {"suppressed"}
        [got] = rows(svc, order["id"])
        assert (got["status"], got["last_error"]) == ("suppressed", "opted_out")
        view = client.get(f"/v1/orders/{order['id']}",
                          headers=auth(org_tokens[org]["clinician"])).get_json()
        shown = [e["detail"] for e in view["timeline"] if e["event"] == "notification_suppressed"]
        assert shown == [{"notification_id": got["id"], "recipient": "patient", "channel": "sms",
                          "template": got["template"], "status": "suppressed",
                          "reason": "opted_out"}]
        listed = client.get(f"/v1/admin/notifications?order_id={order['id']}",
                            headers=auth(org_tokens[org]["admin"])).get_json()["items"]
        assert [(i["status"], i["last_error"]) for i in listed] == [("suppressed", "opted_out")]
    assert len([m for m in sms.received() if m["to"] == number]) == 1  # nothing more
    # the provider is not affected by a family member's STOP
    cancel(svc, first["id"])
    send_all(svc, first["id"])
    results = {r["audience"]: r["status"] for r in rows(svc, first["id"])
               if r["event"] == "cancelled"}
    assert results == {"patient": "suppressed", "provider": "sent"}

    assert text_in(client, svc, number, "stop").status_code == 200  # again: still one row
    assert len([r for r in optout_rows(svc) if r["address_hash"] == row["address_hash"]]) == 1
    assert text_in(client, svc, number, "START").status_code == 200
    assert not [r for r in optout_rows(svc) if r["address_hash"] == row["address_hash"]]
    order = new_order(client, org_tokens[ORG]["coordinator"], contacts)
    assert set(send_all(svc, order["id"]).values()) == {"sent"}
    assert len([m for m in sms.received() if m["to"] == number]) == 2


@pytest.mark.parametrize("word", ["STOP ALL", "stopall", "Unsubscribe", "CANCEL", "end",
                                  "Quit.", "unstop", "START", "hello, is this the clinic?"])
def test_keywords(word):
    want = {"unstop": "start", "START": "start", "hello, is this the clinic?": None}
    assert optout.keyword(word) == want.get(word, "stop")


def test_other_texts_are_ignored_and_not_stored(svc, client):
    before = len(optout_rows(svc))
    resp = text_in(client, svc, phone(), "Is my MRI approved?")
    assert resp.status_code == 200 and len(optout_rows(svc)) == before


def test_inbound_texts_must_be_signed_by_the_gateway(svc, client, tokens):
    number = phone()
    before = len(optout_rows(svc))
    data = {"From": number, "Body": "STOP"}
    unsigned = client.post(INBOUND, data=data)
    assert_problem(unsigned, 401)
    forged = text_in(client, svc, number, "STOP", token="not-the-token")
    assert_problem(forged, 401)
    # an API token is no substitute for the gateway's signature
    bearer = client.post(INBOUND, data=data, headers=auth(tokens["org-a"]["admin"]))
    assert_problem(bearer, 401)
    # a signature over other values does not carry over
    url = svc.settings.public_url + INBOUND
    sig = optout.twilio_signature(SMS_TOKEN, url, [("From", number), ("Body", "hello")])
    swapped = client.post(INBOUND, data=data, headers={"X-Twilio-Signature": sig})
    assert_problem(swapped, 401)
    assert len(optout_rows(svc)) == before


def test_inbound_bad_input_is_a_problem_naming_the_field(svc, client):
    bad_from = text_in(client, svc, "not-a-phone", "STOP")
    assert [e["field"] for e in assert_problem(bad_from, 422)["errors"]] == ["From"]
    url = svc.settings.public_url + INBOUND
    params = [("From", phone())]
    no_body = client.post(INBOUND, data=dict(params), headers={
        "X-Twilio-Signature": optout.twilio_signature(SMS_TOKEN, url, params)})
    assert [e["field"] for e in assert_problem(no_body, 422)["errors"]] == ["Body"]
    as_json = client.post(INBOUND, json={"From": phone(), "Body": "STOP"})
    assert_problem(as_json, 415)
    huge = client.post(INBOUND, data={"From": phone(), "Body": "x" * 70_000})
    assert_problem(huge, 413)


def test_without_a_configured_token_every_inbound_text_is_refused(services, client):
    # the suite's default settings have neither AUTHSVC_SMS_AUTH_TOKEN nor AUTHSVC_SMS_URL
    assert notifications.sms_auth_token(services.settings) is None
    resp = text_in(client, services, phone(), "STOP", token="")
    assert_problem(resp, 401)
    assert notifications.sms_auth_token(services.settings.replace(
        sms_url="https://AC1:s%40cret@api.example/2010-04-01/Accounts/AC1")) == "s@cret"


# ------------------------------------------------------------------ email unsubscribe


def _link(message: dict) -> str:
    header = message["list_unsubscribe"]
    assert header.startswith("<") and header.endswith(">")
    return header[1:-1]


def _local(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.path}?{parts.query}"


def test_every_family_email_carries_a_one_click_unsubscribe(svc, client, org_tokens, sinks):
    smtp, _ = sinks
    mail = f"fam-{tag()}@example.org"
    contacts = [{"role": "caregiver", "email": mail, "channel": "email", "language": "es"}]
    order = new_order(client, org_tokens[ORG]["coordinator"], contacts)
    cancel(svc, order["id"])
    assert set(send_all(svc, order["id"]).values()) == {"sent"}
    family = [m for m in smtp.received() if m["to"] == [mail]]
    office = [m for m in smtp.received() if m["to"] == [OFFICE] and order["id"] in m["text"]]
    assert len(family) == 2 and len(office) == 1
    for message in family:
        link = _link(message)
        assert link.startswith(svc.settings.public_url + "/v1/notifications/unsubscribe?token=")
        assert message["list_unsubscribe_post"] == "List-Unsubscribe=One-Click"
        assert link in message["text"] and "abra este enlace" in message["text"]
        assert f'href="{link}"' in message["html"]
        assert mail not in link and ORG not in link  # the token names no one in clear
    # providers are not on a list: no unsubscribe header for them
    assert office[0]["list_unsubscribe"] == ""


@pytest.mark.parametrize("lang", ["en", "es"])
def test_the_unsubscribe_footer_is_in_every_family_email_and_stays_plain(lang):
    import textstat

    from authsvc.adapters.notify import render
    from tests.unit.test_notification_templates import CONTEXT

    url = "http://127.0.0.1:8000/v1/notifications/unsubscribe?token=" + "a" * 150 + "." + "b" * 43
    footer = {"en": "To stop these emails, open this link:",
              "es": "Para no recibir más correos, abra este enlace:"}[lang]
    for event in render.FAMILY_EVENTS:
        for audience in ("patient", "caregiver"):
            msg = render.render(event, audience, "email", lang,
                                {**CONTEXT, "unsubscribe_url": url})
            assert re.search(re.escape(footer) + r"\s+" + re.escape(url), msg.text), msg.template
            assert f'<a href="{url}">{url}</a>' in msg.html
            text = f"{msg.subject}. {msg.text}".replace(url, "")  # a link is not read aloud
            textstat.set_lang(lang)
            if lang == "en":
                assert textstat.flesch_kincaid_grade(text) <= 8, msg.template
            else:
                assert textstat.fernandez_huerta(text) >= 60, msg.template
                assert textstat.szigriszt_pazos(text) >= 55, msg.template
            # without a link (e.g. rendering for a preview) the old advice stays
            plain = render.render(event, audience, "email", lang, CONTEXT)
            assert "unsubscribe" not in plain.text and footer not in plain.text


def test_unsubscribe_link_confirms_on_get_and_applies_on_post(svc, client, org_tokens, sinks):
    smtp, sms = sinks
    mail = f"care-{tag()}@example.org"
    number = phone()
    contacts = [{"role": "caregiver", "email": mail, "channel": "email", "language": "en"},
                {"role": "patient", "phone": number, "channel": "sms", "language": "en"}]
    order = new_order(client, org_tokens[ORG]["coordinator"], contacts)
    send_all(svc, order["id"])
    [message] = [m for m in smtp.received() if m["to"] == [mail]]
    path = _local(_link(message))

    page = client.get(path)  # a mail scanner following the link changes nothing
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "Stop emails from Clinic org-optout?" in html and 'method="post"' in html
    assert mail not in html
    hashed = optout.address_hash(svc.settings.notify_secret, "email", mail)
    assert not [r for r in optout_rows(svc) if r["address_hash"] == hashed]

    # RFC 8058: the mail client POSTs `List-Unsubscribe=One-Click` to the URI
    done = client.post(path, data={"List-Unsubscribe": "One-Click"})
    assert done.status_code == 200 and "Done" in done.get_data(as_text=True)
    with svc.engine.connect() as conn:  # audited: the organization and the message, no address
        [audited] = conn.execute(sa.select(t.audit_events).where(
            t.audit_events.c.request_id == done.headers["X-Request-Id"])).mappings().all()
    assert (audited["action"], audited["org_id"], audited["outcome"]) == (
        "opt_out", ORG, "success")
    assert audited["entity_id"].startswith("ntf_") and mail not in str(dict(audited))
    again = client.post(path, data={"List-Unsubscribe": "One-Click"})
    assert again.status_code == 200
    [row] = [r for r in optout_rows(svc) if r["address_hash"] == hashed]
    assert (row["org_id"], row["channel"], row["reason"]) == (ORG, "email", "email_unsubscribe")
    assert row["notification_id"] == next(  # the message whose link was used
        r["id"] for r in rows(svc, order["id"]) if r["channel"] == "email")
    assert mail not in str(row)

    cancel(svc, order["id"])
    results = send_all(svc, order["id"])
    by_audience = {r["audience"]: (r["channel"], results[r["id"]])
                   for r in rows(svc, order["id"]) if r["id"] in results}
    assert by_audience == {"caregiver": ("email", "suppressed"),  # this address, this org
                           "patient": ("sms", "sent"),  # the other channel still works
                           "provider": ("email", "sent")}  # the office is not affected
    assert len([m for m in smtp.received() if m["to"] == [mail]]) == 1
    # another organization's emails to the same address are its own list
    other = new_order(client, org_tokens[OTHER]["coordinator"], contacts[:1])
    assert set(send_all(svc, other["id"]).values()) == {"sent"}


def test_bad_unsubscribe_tokens_are_problems_naming_the_token(svc, client):
    good = optout.make_token(svc.settings.notify_secret, org_id=ORG, channel="email",
                             hashed="0" * 64, notification_id="ntf_x", language="en")
    forged = optout.make_token("another key", org_id=ORG, channel="email", hashed="0" * 64,
                               notification_id="ntf_x", language="en")
    payload, mac = good.split(".")
    tampered = optout.make_token(svc.settings.notify_secret, org_id=OTHER, channel="email",
                                 hashed="0" * 64, notification_id="ntf_x",
                                 language="en").split(".")[0] + "." + mac
    sms_token = optout.make_token(svc.settings.notify_secret, org_id=ORG, channel="sms",
                                  hashed="0" * 64, notification_id="ntf_x", language="en")
    for method in ("GET", "POST"):
        for value in (forged, tampered, sms_token, "x", "é" * 10, payload, good + "A"):
            resp = client.open("/v1/notifications/unsubscribe?" + urllib.parse.urlencode(
                {"token": value}), method=method)
            errors = assert_problem(resp, 422)["errors"]
            assert [(e["field"], e["code"]) for e in errors] == [("token", "invalid")]
        missing = client.open("/v1/notifications/unsubscribe", method=method)
        assert [(e["field"], e["code"]) for e in assert_problem(missing, 422)["errors"]] == [
            ("token", "required")]
    assert client.get("/v1/notifications/unsubscribe?token=" + good).status_code == 200
    spanish = optout.make_token(svc.settings.notify_secret, org_id=ORG, channel="email",
                                hashed="0" * 64, notification_id="ntf_x", language="es")
    page = client.get("/v1/notifications/unsubscribe?token=" + spanish).get_data(as_text=True)
    assert '<html lang="es">' in page and "Sí, dejar de recibir correos" in page


# ------------------------------------------------------------------ address snapshot


def test_a_contact_edited_after_planning_does_not_redirect_the_planned_message(
        svc, client, org_tokens, sinks):
    smtp, sms = sinks
    mrn = f"MRN-{tag()}"
    old_phone, new_phone = phone(), phone()
    old_mail, new_mail = f"old-{tag()}@example.org", f"new-{tag()}@example.org"
    first = new_order(client, org_tokens[ORG]["coordinator"], [
        {"role": "patient", "phone": old_phone, "channel": "sms", "language": "en"},
        {"role": "caregiver", "email": old_mail, "channel": "email", "language": "en"}], mrn)
    # before anything is sent the patient's contacts change (a later order updates them):
    # the order of the contacts is swapped and both addresses are new
    second = new_order(client, org_tokens[ORG]["coordinator"], [
        {"role": "caregiver", "email": new_mail, "channel": "email", "language": "en"},
        {"role": "patient", "phone": new_phone, "channel": "sms", "language": "en"}], mrn)
    with svc.engine.connect() as conn:
        contacts = conn.execute(sa.select(t.patients.c.contacts).where(
            t.patients.c.org_id == ORG, t.patients.c.mrn == mrn)).scalar()
    assert contacts[0]["email"] == new_mail  # the patient record did change
    # the first order's family messages go neither to the new addresses (not planned for
    # them) nor to the corrected old ones (suppressed: address_changed)
    assert set(send_all(svc, first["id"]).values()) == {"suppressed"}
    assert set(send_all(svc, second["id"]).values()) == {"sent"}
    assert [m["to"] for m in sms.received() if m["to"] in (old_phone, new_phone)] == [
        new_phone]
    assert [m["to"] for m in smtp.received() if m["to"][0] in (old_mail, new_mail)] == [
        [new_mail]]
    assert {r["address"] for r in rows(svc, first["id"])} == {old_phone, old_mail}
    assert {(r["status"], r["last_error"]) for r in rows(svc, first["id"])
            if r["address"] in (old_phone, old_mail)} == {("suppressed", "address_changed")}
    # the admin list never shows the address
    listed = client.get(f"/v1/admin/notifications?order_id={first['id']}",
                        headers=auth(org_tokens[ORG]["admin"])).get_data(as_text=True)
    assert old_phone not in listed and old_mail not in listed


def test_a_contact_that_now_says_channel_none_is_not_texted_a_planned_message(
        svc, client, org_tokens, sinks):
    _, sms = sinks
    mrn, number = f"MRN-{tag()}", phone()
    first = new_order(client, org_tokens[ORG]["coordinator"], [
        {"role": "patient", "phone": number, "channel": "sms", "language": "en"}], mrn)
    new_order(client, org_tokens[ORG]["coordinator"], [  # the patient asks for no messages
        {"role": "patient", "phone": number, "channel": "none", "language": "en"}], mrn)
    assert set(send_all(svc, first["id"]).values()) == {"suppressed"}
    [row] = rows(svc, first["id"])
    assert (row["status"], row["last_error"]) == ("suppressed", "channel_none")
    assert not [m for m in sms.received() if m["to"] == number]


def test_rows_planned_before_the_snapshot_still_find_their_contact(svc, client, org_tokens,
                                                                   sinks):
    _, sms = sinks
    number = phone()
    order = new_order(client, org_tokens[ORG]["coordinator"], [
        {"role": "patient", "phone": number, "channel": "sms", "language": "en"}])
    with svc.engine.begin() as conn:  # as migration 0005 leaves older rows
        conn.execute(t.notifications.update().where(
            t.notifications.c.order_id == order["id"]).values(address=None))
    assert set(send_all(svc, order["id"]).values()) == {"sent"}
    assert [m["to"] for m in sms.received() if m["to"] == number] == [number]


# ------------------------------------------------------------------ route classification


def test_public_routes_are_classified_as_signed_not_token_routes(spec):
    public = {("POST", INBOUND): ["sms-signature"],
              ("GET", "/v1/notifications/unsubscribe"): ["unsubscribe-token"],
              ("POST", "/v1/notifications/unsubscribe"): ["unsubscribe-token"]}
    ops = {(op["method"], op["path"]): op for op in operations(spec)}
    for key, roles in public.items():
        assert ops[key]["roles"] == roles
        assert spec["paths"][key[1]][key[0].lower()]["security"] == []
    tokened = {(op["method"], op["path"]) for op in token_operations(spec)}
    assert not tokened & set(public)  # S1-S3 of test_authz do not expect a bearer token
    assert ("GET", "/v1/admin/notifications") in tokened
    assert ops[("GET", "/v1/admin/notifications")]["roles"] == ["admin"]
    # every operation is either a token route or names how else it is authenticated
    known = {"public", "payer-signature", "cds-jwt", "sms-signature", "unsubscribe-token"}
    for key, op in ops.items():
        assert op["roles"], key
        assert set(op["roles"]) <= set(ROLES) or set(op["roles"]) <= known, key


# ------------------------------------------------------------------ review fixes


def test_a_stop_that_arrives_while_the_text_is_being_prepared_stops_it(
        svc, client, org_tokens, sinks, monkeypatch):
    """STOP lands after the worker claimed the message (its check already passed) but before
    it went out: the text is not sent and the row says `opted_out`."""
    from authsvc.adapters.notify import render

    _, sms = sinks
    number = phone()
    order = new_order(client, org_tokens[ORG]["coordinator"], [
        {"role": "patient", "phone": number, "channel": "sms", "language": "en"}])
    real_render = render.render

    def stop_meanwhile(*args, **kwargs):  # type: ignore[no-untyped-def]
        assert text_in(client, svc, number, "STOP").status_code == 200
        return real_render(*args, **kwargs)

    monkeypatch.setattr(render, "render", stop_meanwhile)
    assert set(send_all(svc, order["id"]).values()) == {"suppressed"}
    [row] = rows(svc, order["id"])
    assert (row["status"], row["last_error"], row["claimed_until"]) == (
        "suppressed", "opted_out", None)
    assert not [m for m in sms.received() if m["to"] == number]
    assert text_in(client, svc, number, "START").status_code == 200


def test_a_retrying_text_to_a_corrected_number_is_not_sent_to_the_old_one(
        svc, client, org_tokens, sinks, monkeypatch):
    """The gateway was down at the first attempt; meanwhile the patient's number was
    corrected: the retry does not text the old number (suppressed, `address_changed`)."""
    _, sms = sinks
    mrn, wrong, right = f"MRN-{tag()}", phone(), phone()
    first = new_order(client, org_tokens[ORG]["coordinator"], [
        {"role": "patient", "phone": wrong, "channel": "sms", "language": "en"}], mrn)
    down = dataclasses.replace(svc, settings=svc.settings.replace(
        sms_url=f"http://127.0.0.1:{free_port()}/sms"))
    assert set(send_all(down, first["id"]).values()) == {"retry"}
    new_order(client, org_tokens[ORG]["coordinator"], [  # the number is corrected
        {"role": "patient", "phone": right, "channel": "sms", "language": "en"}], mrn)
    with svc.engine.begin() as conn:  # the retry is due
        conn.execute(t.notifications.update().where(
            t.notifications.c.order_id == first["id"]).values(next_attempt_at=None))
    assert set(send_all(svc, first["id"]).values()) == {"suppressed"}
    [row] = rows(svc, first["id"])
    assert (row["status"], row["last_error"]) == ("suppressed", "address_changed")
    assert not [m for m in sms.received() if m["to"] == wrong]


def test_the_public_routes_are_rate_limited_per_source_address(svc, client, app, monkeypatch):
    """Over the per-address limit an address gets 429 problem+json with Retry-After on the
    inbound-text and unsubscribe routes; another address is still served."""
    from tests.security.conftest import fresh_addr

    monkeypatch.setitem(app.config, "AUTHSVC_RATE_LIMIT_TOKEN", "4/minute")
    addr, other = fresh_addr(), fresh_addr()
    url = svc.settings.public_url + INBOUND
    number = phone()

    def text(sender_addr: str):  # type: ignore[no-untyped-def]
        params = [("From", number), ("Body", "hello"), ("To", "+15550100000")]
        return client.post(INBOUND, data=dict(params), environ_base={"REMOTE_ADDR": sender_addr},
                           headers={"X-Twilio-Signature": optout.twilio_signature(
                               SMS_TOKEN, url, params)})

    def page(sender_addr: str):  # type: ignore[no-untyped-def]
        return client.get("/v1/notifications/unsubscribe", query_string={"token": "x.y"},
                          environ_base={"REMOTE_ADDR": sender_addr})

    assert [text(addr).status_code for _ in range(2)] == [200, 200]
    assert [page(addr).status_code for _ in range(2)] == [422, 422]
    for refused in (text(addr), page(addr), client.post(
            "/v1/notifications/unsubscribe", query_string={"token": "x.y"},
            environ_base={"REMOTE_ADDR": addr})):
        assert refused.status_code == 429, refused.get_data()
        assert refused.mimetype == "application/problem+json"
        assert int(refused.headers["Retry-After"]) > 0
    assert text(other).status_code == 200 and page(other).status_code == 422


def test_an_address_forging_unsubscribe_links_is_throttled(svc, client, app, monkeypatch):
    from tests.security.conftest import fresh_addr

    monkeypatch.setitem(app.config, "AUTHSVC_RATE_LIMIT_AUTH_FAILURES", "3/minute")
    addr = fresh_addr()
    codes = [client.post("/v1/notifications/unsubscribe", query_string={"token": f"a.{i}"},
                         environ_base={"REMOTE_ADDR": addr}).status_code for i in range(5)]
    assert codes == [422, 422, 422, 429, 429]
    assert client.post("/v1/notifications/unsubscribe", query_string={"token": "a.b"},
                       environ_base={"REMOTE_ADDR": fresh_addr()}).status_code == 422
