"""S4 for the coordinators' dashboard (reliability.md): a session cookie used after its idle
timeout is refused (sign in again), and no dashboard session cookie lives longer than the
idle window. Also what guards the session: CSRF, roles at sign-in, revocation on the next
request, tenancy and the audit of /app/ reads."""

from __future__ import annotations

import datetime as dt
import email.utils
import http.cookiejar
import io
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest
import sqlalchemy as sa

from authsvc.adapters.db import tables as t
from tests.browser.dash import csrf_of, seed_case, sign_in
from tests.security.conftest import fresh_addr

pytestmark = pytest.mark.integration
IDLE = 900  # the default AUTHSVC_DASHBOARD_IDLE_SECONDS


def _cookie_header(resp) -> str:  # type: ignore[no-untyped-def]
    cookies = [v for k, v in resp.headers.items() if k.lower() == "set-cookie"]
    assert cookies, "no Set-Cookie"
    return cookies[-1]


def _max_age(header: str) -> float:
    """Seconds from now until the cookie's Expires (Flask writes Expires, not Max-Age)."""
    match = re.search(r"Expires=([^;]+)", header)
    assert match, header
    expires = email.utils.parsedate_to_datetime(match.group(1))
    return (expires - dt.datetime.now(dt.UTC)).total_seconds()


def test_S4_session_is_refused_after_the_idle_timeout_and_sign_in_works_again(app, tokens):
    import time_machine

    client = app.test_client()
    token = tokens["org-a"]["coordinator"]
    start = dt.datetime.now(dt.UTC)
    with time_machine.travel(start, tick=False):
        resp = sign_in(client, token)
        assert resp.status_code == 303 and resp.headers["Location"].endswith("/app/")
        assert client.get("/app/").status_code == 200
    # activity just inside the window keeps the session alive (the window slides)
    with time_machine.travel(start + dt.timedelta(seconds=IDLE - 5), tick=False):
        assert client.get("/app/").status_code == 200
    # idle for longer than the window: refused, sent to sign in with the reason
    with time_machine.travel(start + dt.timedelta(seconds=2 * IDLE - 5 + 2), tick=False):
        resp = client.get("/app/")
        assert resp.status_code == 303
        assert "/app/login?notice=session_expired" in resp.headers["Location"]
        page = client.get(resp.headers["Location"]).get_data(as_text=True)
        assert "Your session ended after 15 min without activity" in page
        # and the old session stays dead: still refused, not revived
        assert client.get("/app/").status_code == 303
        assert sign_in(client, token).status_code == 303
        assert client.get("/app/").status_code == 200


def test_S4_the_auto_refresh_does_not_extend_the_session(app, tokens):
    import time_machine

    client = app.test_client()
    start = dt.datetime.now(dt.UTC)
    with time_machine.travel(start, tick=False):
        sign_in(client, tokens["org-a"]["coordinator"])
    with time_machine.travel(start + dt.timedelta(seconds=IDLE - 10), tick=False):
        poll = client.get("/app/", headers={"X-Dashboard-Poll": "1"})
        assert poll.status_code == 200 and "<table" in poll.get_data(as_text=True)
        assert not [k for k in poll.headers.keys() if k.lower() == "set-cookie"]
    with time_machine.travel(start + dt.timedelta(seconds=IDLE + 1), tick=False):
        poll = client.get("/app/", headers={"X-Dashboard-Poll": "1"})
        assert poll.status_code == 401
        assert poll.headers["X-Dashboard-Login"].endswith("/app/login?notice=session_expired")


def test_S4_the_cookie_is_httponly_samesite_strict_and_lives_no_longer_than_the_window(
        app, tokens):
    client = app.test_client()
    resp = sign_in(client, tokens["org-a"]["coordinator"])
    header = _cookie_header(resp)
    assert header.startswith("authsvc_dash=")  # http on loopback (tests): no __Host- prefix
    assert "HttpOnly" in header and "SameSite=Strict" in header and "Path=/" in header
    assert 0 < _max_age(header) <= IDLE + 1
    # every later cookie too, the pre-sign-in one included
    assert _max_age(_cookie_header(client.get("/app/"))) <= IDLE + 1
    fresh = app.test_client()
    assert _max_age(_cookie_header(fresh.get("/app/login"))) <= IDLE + 1
    # the token itself is never in the cookie
    assert tokens["org-a"]["coordinator"] not in header


def test_S4_a_secure_deployment_uses_a_secure_host_prefixed_cookie(settings, services,
                                                                    tokens, monkeypatch):
    from authsvc.api import create_app

    monkeypatch.setenv("AUTHSVC_DASHBOARD_SECURE_COOKIE", "1")
    app = create_app(settings, services)
    client = app.test_client()
    resp = sign_in(client, tokens["org-a"]["coordinator"], base_url="https://localhost",
                   headers={"Referer": "https://localhost/app/login"})
    assert resp.status_code == 303, resp.get_data(as_text=True)[:300]
    header = _cookie_header(resp)
    assert header.startswith("__Host-authsvc_dash=")
    assert "Secure" in header and "Domain" not in header and "Path=/;" in header + ";"


def test_S4_revoking_the_token_ends_the_session_on_the_next_request(app, services):
    from authsvc.api.auth import create_token

    with services.engine.begin() as conn:
        token_id, token = create_token(conn, "org-a", "coordinator", name="revokee")
    client = app.test_client()
    sign_in(client, token)
    assert client.get("/app/").status_code == 200
    with services.engine.begin() as conn:
        conn.execute(t.api_tokens.update().where(t.api_tokens.c.id == token_id)
                     .values(revoked_at=sa.func.now()))
    resp = client.get("/app/")
    assert resp.status_code == 303 and "notice=session_revoked" in resp.headers["Location"]


@pytest.mark.parametrize("role", ["clinician", "billing"])
def test_sign_in_accepts_only_coordinator_and_admin_tokens(app, tokens, role):
    client = app.test_client()
    resp = sign_in(client, tokens["org-a"][role], environ_base={"REMOTE_ADDR": fresh_addr()})
    assert resp.status_code == 403
    assert f"A {role} token cannot use the dashboard" in resp.get_data(as_text=True)
    assert client.get("/app/").status_code == 303
    assert sign_in(app.test_client(), tokens["org-a"]["admin"]).status_code == 303


def test_a_bad_token_gets_a_clear_refusal_and_is_audited(app, services):
    client = app.test_client()
    rid = uuid.uuid4().hex
    page = client.get("/app/login")
    resp = client.post("/app/login", data={"token": "asv_" + "x" * 43,
                                           "csrf_token": csrf_of(page.get_data(as_text=True))},
                       headers={"X-Request-Id": rid}, environ_base={"REMOTE_ADDR": fresh_addr()})
    assert resp.status_code == 401
    assert "That token is not valid" in resp.get_data(as_text=True)
    with services.engine.connect() as conn:
        row = conn.execute(sa.select(t.audit_events).where(
            t.audit_events.c.request_id == rid)).mappings().one()
    assert row["outcome"] == "denied" and row["reason"] == "unknown_token"
    assert "asv_" not in str(dict(row))


def test_forms_without_the_csrf_token_are_refused_with_a_400_page(app, tokens, services):
    client = app.test_client()
    client.get("/app/login")
    resp = client.post("/app/login", data={"token": tokens["org-a"]["coordinator"]})
    assert resp.status_code == 400
    assert "This form expired or did not come from this page" in resp.get_data(as_text=True)
    assert client.get("/app/").status_code == 303  # not signed in
    _, case_id = seed_case(client, services, tokens["org-a"]["clinician"], "org-a")
    sign_in(client, tokens["org-a"]["coordinator"])
    resp = client.post(f"/app/cases/{case_id}/notes", data={"text": "forged"})
    assert resp.status_code == 400
    resp = client.post(f"/app/cases/{case_id}/notes",
                       data={"text": "forged", "csrf_token": "wrong"})
    assert resp.status_code == 400
    assert "forged" not in client.get(f"/app/cases/{case_id}").get_data(as_text=True)


def test_another_organizations_case_is_a_404_page_and_the_denial_is_audited(
        app, tokens, services):
    client = app.test_client()
    _, case_b = seed_case(client, services, tokens["org-b"]["clinician"], "org-b")
    sign_in(client, tokens["org-a"]["coordinator"])
    rid = uuid.uuid4().hex
    resp = client.get(f"/app/cases/{case_b}", headers={"X-Request-Id": rid})
    assert resp.status_code == 404 and resp.mimetype == "text/html"
    text = resp.get_data(as_text=True)
    assert "belongs to another organization" in text and case_b not in text
    assert client.post(f"/app/cases/{case_b}/notes", data={
        "text": "x", "csrf_token": csrf_of(client.get("/app/").get_data(as_text=True))}
    ).status_code == 404
    with services.engine.connect() as conn:
        rows = conn.execute(sa.select(t.audit_events).where(
            t.audit_events.c.request_id == rid)).mappings().all()
    assert [(r["outcome"], r["org_id"], r["entity_id"]) for r in rows] == [
        ("denied", "org-a", case_b)]


def test_a_case_page_read_is_audited_with_the_patient_like_the_json_api(app, tokens, services):
    client = app.test_client()
    order_id, case_id = seed_case(client, services, tokens["org-a"]["clinician"], "org-a")
    sign_in(client, tokens["org-a"]["coordinator"])
    rid = uuid.uuid4().hex
    resp = client.get(f"/app/cases/{case_id}", headers={"X-Request-Id": rid})
    assert resp.status_code == 200
    with services.engine.connect() as conn:
        rows = conn.execute(sa.select(t.audit_events).where(
            t.audit_events.c.request_id == rid).order_by(t.audit_events.c.id)).mappings().all()
        patient = conn.execute(sa.select(t.orders.c.patient_id).where(
            t.orders.c.id == order_id)).scalar()
    assert {(r["action"], r["entity_type"], r["entity_id"], r["patient_id"], r["org_id"])
            for r in rows} == {("read", "case", case_id, patient, "org-a"),
                               ("read", "order", order_id, patient, "org-a")}
    # minimum necessary: no name, birth date or member id on the page
    text = resp.get_data(as_text=True)
    for phi in ("Diaz", "1984-03-02", "SIM-SILENT-0001"):
        assert phi not in text


# ------------------------------------------------------------------ real clock, real server


@pytest.fixture()
def served_short_idle(settings, services, monkeypatch):
    """The API + dashboard app served over HTTP on a free port with a 5 s idle window."""
    from werkzeug.serving import make_server

    from authsvc.api import create_app

    monkeypatch.setenv("AUTHSVC_DASHBOARD_IDLE_SECONDS", "5")
    app = create_app(settings, services)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(10)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None


def test_S4_real_clock_a_5_second_idle_window_ends_the_session(served_short_idle, tokens):
    base = served_short_idle
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), _NoRedirect)

    def fetch(path: str, data: dict | None = None):  # type: ignore[no-untyped-def]
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        try:
            with opener.open(base + path, data=body, timeout=10) as resp:
                return resp.status, resp.headers, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read().decode()

    def session_cookie(headers) -> str:  # type: ignore[no-untyped-def]
        found = [c for c in headers.get_all("Set-Cookie") or [] if c.startswith("authsvc_dash=")]
        assert found, "no session cookie"
        return found[0]

    _, _, page = fetch("/app/login")
    status, headers, _ = fetch("/app/login", {"token": tokens["org-a"]["coordinator"],
                                              "csrf_token": csrf_of(page)})
    assert status == 303
    assert _max_age(session_cookie(headers)) <= 6
    assert fetch("/app/")[0] == 200
    time.sleep(3)
    assert fetch("/app/")[0] == 200  # activity within the window
    time.sleep(3)
    status, headers, _ = fetch("/app/")  # 3 s after the last activity: still inside
    assert status == 200
    last_cookie = session_cookie(headers).split(";", 1)[0]
    time.sleep(6)
    # the browser dropped the expired cookie: the page says the session ended
    status, headers, _ = fetch("/app/")
    assert status == 303 and "notice=session_expired" in headers["Location"]
    _, _, page = fetch(headers["Location"])
    assert "Your session ended after" in page and "Sign in again" in page
    # a copy of the last cookie replayed after the window is refused by the server itself
    req = urllib.request.Request(base + "/app/", headers={"Cookie": last_cookie})
    try:
        with urllib.request.build_opener(_NoRedirect).open(req, timeout=10) as resp:
            status, location = resp.status, resp.headers.get("Location", "")
    except urllib.error.HTTPError as exc:
        status, location = exc.code, exc.headers.get("Location", "")
    assert status == 303 and "notice=session_expired" in location


def test_production_without_a_secret_key_keeps_the_api_but_not_the_dashboard(
        settings, services, monkeypatch):
    from authsvc.api.dashboard.config import DashboardConfig

    prod = settings.replace(production=True, public_url="https://authsvc.example")
    monkeypatch.delenv("AUTHSVC_SECRET_KEY", raising=False)
    assert "AUTHSVC_SECRET_KEY" in (DashboardConfig.from_env(prod).unusable or "")
    insecure = DashboardConfig.from_env(prod, {"AUTHSVC_SECRET_KEY": "k" * 40,
                                               "AUTHSVC_DASHBOARD_SECURE_COOKIE": "0"})
    assert "Secure" in (insecure.unusable or "")
    good = DashboardConfig.from_env(prod, {"AUTHSVC_SECRET_KEY": "k" * 40})
    assert good.unusable is None and good.secure_cookie and good.cookie_name.startswith("__Host-")
    # development: a generated key shared by every worker through var/, never rewritten
    first = DashboardConfig.from_env(settings, {}).secret_key
    assert len(first) >= 32 and DashboardConfig.from_env(settings, {}).secret_key == first
    assert (settings.var_dir / "dashboard-secret-key").stat().st_mode & 0o077 == 0


def test_the_dashboard_answers_503_when_it_may_not_run_safely():
    from authsvc.api.dashboard import _unavailable

    client = _unavailable("test").test_client()
    resp = client.get("/cases/x")
    assert resp.status_code == 503 and "not configured" in resp.get_data(as_text=True)


def test_S4_a_form_sent_after_the_idle_timeout_asks_to_sign_in_again_and_does_nothing(
        app, tokens, services):
    import time_machine

    client = app.test_client()
    _, case_id = seed_case(client, services, tokens["org-a"]["clinician"], "org-a")
    start = dt.datetime.now(dt.UTC)
    with time_machine.travel(start, tick=False):
        sign_in(client, tokens["org-a"]["coordinator"])
        form = csrf_of(client.get(f"/app/cases/{case_id}").get_data(as_text=True))
    with time_machine.travel(start + dt.timedelta(seconds=IDLE + 30), tick=False):
        resp = client.post(f"/app/cases/{case_id}/notes",
                           data={"text": "typed before lunch", "csrf_token": form})
        assert resp.status_code == 303
        assert "notice=session_expired" in resp.headers["Location"]
    sign_in(client, tokens["org-a"]["coordinator"])
    assert "typed before lunch" not in client.get(f"/app/cases/{case_id}").get_data(
        as_text=True)


# ------------------------------------------------------------------ the server's session record


def _session_count(services, case_id: str, text: str) -> int:  # type: ignore[no-untyped-def]
    with services.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(t.case_notes).where(
            t.case_notes.c.case_id == case_id, t.case_notes.c.text == text)).scalar()


def test_signing_out_ends_the_session_for_every_copy_of_the_cookie(app, tokens, services):
    client = app.test_client()
    _, case_id = seed_case(client, services, tokens["org-a"]["clinician"], "org-a")
    sign_in(client, tokens["org-a"]["coordinator"], environ_base={"REMOTE_ADDR": fresh_addr()})
    copied = client.get_cookie("authsvc_dash").value  # e.g. taken from a shared computer
    form = csrf_of(client.get(f"/app/cases/{case_id}").get_data(as_text=True))
    resp = client.post("/app/logout", data={"csrf_token": form})
    assert resp.status_code == 303 and "notice=signed_out" in resp.headers["Location"]
    thief = app.test_client()
    thief.set_cookie("authsvc_dash", copied)
    resp = thief.get("/app/")
    assert resp.status_code == 303 and "/app/login?notice=session_ended" in resp.headers[
        "Location"]
    thief.set_cookie("authsvc_dash", copied)
    resp = thief.post(f"/app/cases/{case_id}/notes",
                      data={"csrf_token": form, "text": "after sign-out"})
    assert resp.status_code == 303 and "/app/login" in resp.headers["Location"]
    assert _session_count(services, case_id, "after sign-out") == 0
    page = thief.get("/app/login?notice=session_ended").get_data(as_text=True)
    assert "Your session has ended. Sign in again." in page


def test_signing_in_again_ends_the_earlier_session(app, tokens):
    client = app.test_client()
    sign_in(client, tokens["org-a"]["coordinator"], environ_base={"REMOTE_ADDR": fresh_addr()})
    first = client.get_cookie("authsvc_dash").value
    sign_in(client, tokens["org-a"]["coordinator"], environ_base={"REMOTE_ADDR": fresh_addr()})
    assert client.get("/app/").status_code == 200
    old = app.test_client()
    old.set_cookie("authsvc_dash", first)
    assert old.get("/app/").status_code == 303


@pytest.fixture()
def short_max_app(settings, services, monkeypatch):
    from authsvc.api import create_app

    monkeypatch.setenv("AUTHSVC_DASHBOARD_MAX_SECONDS", "1800")
    return create_app(settings, services)


def test_a_session_ends_at_its_maximum_length_however_active(short_max_app, tokens):
    import time_machine

    client = short_max_app.test_client()
    start = dt.datetime.now(dt.UTC)
    with time_machine.travel(start, tick=False):
        sign_in(client, tokens["org-a"]["coordinator"],
                environ_base={"REMOTE_ADDR": fresh_addr()})
    for minutes in (10, 20, 29):  # busy all along, never idle
        with time_machine.travel(start + dt.timedelta(minutes=minutes), tick=False):
            assert client.get("/app/").status_code == 200
    with time_machine.travel(start + dt.timedelta(minutes=30, seconds=5), tick=False):
        resp = client.get("/app/")
        assert resp.status_code == 303
        assert "/app/login?notice=session_too_long" in resp.headers["Location"]
        page = client.get(resp.headers["Location"]).get_data(as_text=True)
        assert "Your session reached its maximum length of 0.5 h. Sign in again." in page
        assert client.get("/app/").status_code == 303  # not revived
        sign_in(client, tokens["org-a"]["coordinator"],
                environ_base={"REMOTE_ADDR": fresh_addr()})
        assert client.get("/app/").status_code == 200


def test_the_maximum_length_setting_is_checked(settings):
    from authsvc.api.dashboard.config import DashboardConfig, DashboardConfigError

    assert DashboardConfig.from_env(settings, {}).max_seconds == 12 * 3600
    assert DashboardConfig.from_env(settings, {"AUTHSVC_DASHBOARD_MAX_SECONDS": "600"}
                                    ).max_seconds == 600
    for bad in ("0", "-5", "\u0661\u0662", "1e3", "604801"):
        with pytest.raises(DashboardConfigError):
            DashboardConfig.from_env(settings, {"AUTHSVC_DASHBOARD_MAX_SECONDS": bad})


def test_the_server_record_lives_for_the_idle_window_and_a_poll_does_not_extend_it(
        app, tokens):
    from authsvc.api.dashboard import views

    client = app.test_client()
    sign_in(client, tokens["org-a"]["coordinator"], environ_base={"REMOTE_ADDR": fresh_addr()})
    dash = app.extensions["authsvc_dashboard"]
    cookie = dash.session_interface.get_signing_serializer(dash).loads(
        client.get_cookie("authsvc_dash").value)
    assert set(cookie) >= {"sid", "tid"}  # an id of the record, never the token itself
    key = views._record_key(cookie["sid"])
    redis_client = app.extensions["authsvc_redis"]
    assert IDLE - 30 < redis_client.ttl(key) <= IDLE
    redis_client.expire(key, 100)  # as if 800 s had passed
    assert client.get("/app/", headers={"X-Dashboard-Poll": "1"}).status_code == 200
    assert redis_client.ttl(key) <= 100  # the auto-refresh did not extend it
    assert client.get("/app/").status_code == 200  # a person's request does
    assert IDLE - 30 < redis_client.ttl(key) <= IDLE
    redis_client.delete(key)  # the record gone (e.g. Redis restarted): sign in again
    assert client.get("/app/").status_code == 303


def test_without_redis_the_dashboard_refuses_with_a_503_page(settings, services, tokens):
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from authsvc.api import create_app
    from tests.conftest import free_port

    app = create_app(settings, services)
    dash = app.extensions["authsvc_dashboard"]
    client = app.test_client()
    _, case_id = seed_case(client, services, tokens["org-a"]["clinician"], "org-a")
    sign_in(client, tokens["org-a"]["coordinator"], environ_base={"REMOTE_ADDR": fresh_addr()})
    form = csrf_of(client.get(f"/app/cases/{case_id}").get_data(as_text=True))
    working = dash.extensions["authsvc_redis"]
    dash.extensions["authsvc_redis"] = redis.Redis(  # nothing listens there
        host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5,
        retry=Retry(NoBackoff(), 0))
    try:
        for resp in (client.get("/app/"), client.get(f"/app/cases/{case_id}"),
                     client.post(f"/app/cases/{case_id}/notes",
                                 data={"csrf_token": form, "text": "while redis is down"})):
            assert resp.status_code == 503, resp.status_code
            assert resp.headers["Retry-After"] == "30"
            text = resp.get_data(as_text=True)
            assert "Sign-in sessions cannot be checked right now" in text
        assert _session_count(services, case_id, "while redis is down") == 0
        fresh = app.test_client()
        resp = sign_in(fresh, tokens["org-a"]["coordinator"],
                       environ_base={"REMOTE_ADDR": fresh_addr()})
        assert resp.status_code == 503  # no session is started that could not be ended
        assert fresh.get("/app/").status_code == 303
    finally:
        dash.extensions["authsvc_redis"] = working
    assert client.get("/app/").status_code == 200  # a blip does not sign anyone out


class _Tracked(io.BytesIO):
    """A request body that counts what the server read of it."""

    consumed = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.consumed += len(data)
        return data

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        n = super().readinto(buffer)
        self.consumed += n
        return n

    def readline(self, size: int | None = -1) -> bytes:
        data = super().readline(size)
        self.consumed += len(data)
        return data


def test_a_form_post_without_a_session_is_refused_before_its_body_is_read(
        app, tokens, services):
    _, case_id = seed_case(app.test_client(), services, tokens["org-a"]["clinician"], "org-a")
    boundary = "xyz"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"a.pdf\"\r\nContent-Type: application/pdf\r\n\r\n").encode() + (
        b"%PDF-" + b"0" * (2 * 1024 * 1024)) + f"\r\n--{boundary}--\r\n".encode()
    stream = _Tracked(body)
    resp = app.test_client().post(
        f"/app/cases/{case_id}/attachments", input_stream=stream, content_length=len(body),
        content_type=f"multipart/form-data; boundary={boundary}")
    assert resp.status_code == 303 and "/app/login" in resp.headers["Location"]
    assert stream.consumed == 0
    # over the size limit: sent to sign in, not a 413 that says the body was looked at
    big = app.test_client().post(
        f"/app/cases/{case_id}/notes", data={"text": "x" * (12 * 1024 * 1024)})
    assert big.status_code == 303 and "/app/login" in big.headers["Location"]
