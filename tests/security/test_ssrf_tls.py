"""S7 (SSRF through webhook URLs) on the guard that exists (authsvc/adapters/ssrf.py) and S13
(unsafe consumption: a payer with a self-signed certificate is refused, a pinned CA accepted)."""

from __future__ import annotations

import http.server
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

from authsvc.adapters import ssrf
from tests.conftest import free_port

pytestmark = pytest.mark.integration

HOSTILE = ["http://127.0.0.1:5432/", "http://[::1]:6380/", "http://169.254.169.254/latest/meta-data/",
           "http://0x7f000001/", "http://2130706433/", "http://localhost./", "file:///etc/passwd",
           "gopher://127.0.0.1:6380/_FLUSHALL", "http://10.0.0.1/", "http://192.168.1.1/",
           "http://[::ffff:127.0.0.1]/", "http://user:pw@127.0.0.1:9100/", "http://0.0.0.0/",
           "https://127.0.0.1:9100\\@evil.example/", "http://127.1/",
           # octal and padded dotted quads, IPv6 forms that embed or mean IPv4 loopback
           # (NAT64, IPv4-compatible, 6to4, Teredo), unique-local, link-local with a zone,
           # carrier-grade NAT and the benchmarking range
           "http://0177.0.0.1/", "http://127.000.000.001/", "http://[64:ff9b::7f00:1]/",
           "http://[::7f00:1]/", "http://[2002:7f00:1::]/",
           "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", "http://[fc00::1]/",
           "http://[fe80::1%25eth0]/", "http://100.64.0.1/", "http://198.18.0.1/"]


@pytest.mark.parametrize("url", HOSTILE)
def test_S7_hostile_webhook_urls_are_refused(url):
    with pytest.raises(ssrf.Refused):
        ssrf.check_url(url, ["127.0.0.1:9100"])


def test_S7_the_allowlisted_receiver_is_allowed_and_pinned():
    target = ssrf.check_url("http://127.0.0.1:9100/hook?x=1", ["127.0.0.1:9100"])
    assert (target.ip, target.port, target.path) == ("127.0.0.1", 9100, "/hook?x=1")
    with pytest.raises(ssrf.Refused):  # the same host on another port is not listed
        ssrf.check_url("http://127.0.0.1:6380/", ["127.0.0.1:9100"])


class _Redirector(http.server.BaseHTTPRequestHandler):
    target = ""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(302)
        self.send_header("Location", self.target)
        self.end_headers()

    def log_message(self, *args):  # quiet
        pass


def test_S7_redirects_are_not_followed_and_the_victim_gets_no_connection():
    victim = socket.socket()
    victim.bind(("127.0.0.1", 0))
    victim.listen(1)
    victim.settimeout(0.5)
    victim_port = victim.getsockname()[1]
    port = free_port()
    _Redirector.target = f"http://127.0.0.1:{victim_port}/_FLUSHALL"
    server = http.server.HTTPServer(("127.0.0.1", port), _Redirector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        status = ssrf.post(f"http://127.0.0.1:{port}/hook", b"{}", {}, [f"127.0.0.1:{port}"],
                           timeout=3)
        assert status == 302
        with pytest.raises(TimeoutError):
            victim.accept()
    finally:
        server.shutdown()
        server.server_close()
        victim.close()


def test_S7_send_time_recheck_refuses_a_url_no_longer_allowed():
    with pytest.raises(ssrf.Refused):
        ssrf.post("http://127.0.0.1:9100/hook", b"{}", {}, [], timeout=1)


# ------------------------------------------------------------------ S13


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    key, cert = d / "key.pem", d / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return key, cert


class _Unavailable(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture()
def tls_payer(self_signed):
    key, cert = self_signed
    port = free_port()
    server = http.server.HTTPServer(("127.0.0.1", port), _Unavailable)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{port}/fhir", cert
    server.shutdown()
    server.server_close()


def _call(base_url: str):
    from authsvc.adapters.payers.registry import PayerConfig, build_adapter
    from authsvc.domain.payer import PayerFailure

    records = []
    config = PayerConfig(id="tlstest", name="TLS test", protocol="pas-fhir", base_url=base_url,
                         timeout_seconds=5)
    adapter = build_adapter(config, records.append)
    with pytest.raises(PayerFailure):
        adapter.register_subscription("https://authsvc.example/v1/payer-callbacks/tlstest")
    return records


def test_S13_self_signed_payer_certificate_is_refused(tls_payer, monkeypatch, caplog):
    from authsvc.adapters.payers.pas_fhir import TLS_ALERTS

    base, _ = tls_payer
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    before = TLS_ALERTS.labels("tlstest")._value.get()
    records = _call(base)
    assert records and records[-1].error == "TLS error" and records[-1].http_status is None
    # ... and it is an alert: a counter for the dashboards and a log event
    assert TLS_ALERTS.labels("tlstest")._value.get() > before
    assert any(getattr(r, "event", "") == "alert:payer_tls_error" for r in caplog.records)


def test_S13_the_same_payer_is_accepted_with_its_ca_pinned(tls_payer, monkeypatch):
    base, cert = tls_payer
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    records = _call(base)
    assert records and records[-1].http_status == 503 and records[-1].error != "TLS error"


def test_S7_hostile_urls_are_refused_at_subscription_registration(app, tokens, services):
    import uuid

    import sqlalchemy as sa

    from tests.conftest import auth
    from tests.security.conftest import assert_problem

    client = app.test_client()
    from authsvc.adapters.db import tables as t

    table = t.webhook_subscriptions
    with services.engine.connect() as conn:
        before = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()
    for url in HOSTILE:
        resp = client.post("/v1/subscriptions", json={"url": url, "events": ["outcome.created"]},
                           headers=auth(tokens["org-a"]["billing"],
                                        **{"Idempotency-Key": uuid.uuid4().hex}))
        body = assert_problem(resp, 422)
        assert any(e["field"] == "url" for e in body.get("errors", [])), (url, body)
    with services.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() == before


@pytest.mark.parametrize("url", ["http://127.0.0.1:6380/", "http://169.254.169.254/",
                                 "gopher://127.0.0.1:6380/_FLUSHALL"])
def test_S7_hostile_urls_are_refused_for_provider_contacts(settings, monkeypatch, capsys, url):
    from authsvc import cli
    monkeypatch.setenv("AUTHSVC_DATABASE_URL", settings.database_url)
    monkeypatch.delenv("AUTHSVC_WEBHOOK_ALLOWLIST", raising=False)
    assert cli.main(["orgs", "contact", "--org", "org-a", "--webhook-url", url]) != 0
    assert "refused" in capsys.readouterr().err
