"""The channel adapters against real local servers: the aiosmtpd SMTP sink, the HTTP SMS
sink and a webhook receiver. Transient versus permanent failures, idempotency keys."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from authsvc.adapters import webhooks
from authsvc.adapters.notify import Permanent, Transient, email, sms, webhook
from authsvc.adapters.notify.sinks import SmsSink, SmtpSink
from authsvc.service_layer.notifications import backoff
from tests.conftest import free_port


@pytest.fixture()
def smtp_sink():
    sink = SmtpSink(port=free_port()).start()
    yield sink
    sink.stop()


@pytest.fixture()
def sms_sink():
    sink = SmsSink(port=0, username="ACsink", password="secret").start()
    yield sink
    sink.stop()


def test_email_is_delivered_with_a_stable_message_id(smtp_sink):
    got = email.send(smtp_sink.url, "luis@example.org", "Hello", "Plain text\n",
                     "<p>Plain text</p>", "ntf_1")
    assert got == "<ntf_1@authsvc>"
    [msg] = smtp_sink.received()
    assert msg["to"] == ["luis@example.org"] and msg["subject"] == "Hello"
    assert msg["message_id"] == "<ntf_1@authsvc>" and "Plain text" in msg["text"]
    assert "<p>Plain text</p>" in msg["html"]


def test_email_server_down_is_transient_and_a_bad_url_permanent():
    with pytest.raises(Transient):
        email.send(f"smtp://127.0.0.1:{free_port()}", "a@example.org", "s", "t", None, "n")
    with pytest.raises(Permanent):
        email.send("http://127.0.0.1:25", "a@example.org", "s", "t", None, "n")


def test_sms_is_sent_once_per_idempotency_key(sms_sink):
    first = sms.send(sms_sink.url, "+15555550101", "Hola", "ntf_2")
    again = sms.send(sms_sink.url, "+15555550101", "Hola", "ntf_2")
    assert first == again and first.startswith("SM")
    assert len(sms_sink.received()) == 1 and sms_sink.duplicates == 1
    assert sms_sink.received()[0]["from"] == sms.DEFAULT_FROM


def test_sms_failures_are_classified(sms_sink):
    with pytest.raises(Permanent, match="HTTP 400"):
        sms.send(sms_sink.url, "5555", "Hola", "ntf_3")  # not an E.164 number
    wrong = sms_sink.url.replace("secret", "wrong")
    with pytest.raises(Permanent, match="HTTP 401"):
        sms.send(wrong, "+15555550101", "Hola", "ntf_4")
    with pytest.raises(Transient):
        sms.send(f"http://127.0.0.1:{free_port()}/x", "+15555550101", "Hola", "ntf_5")
    assert sms_sink.received() == []


def test_provider_webhook_is_signed_with_the_notification_id():
    seen: list[tuple[dict, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # noqa: ANN002
            return None

        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((dict(self.headers), body))
            self.send_response(204 if len(seen) == 1 else 503)
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    secret = webhook.org_secret("master", "org-a")
    try:
        assert webhook.send(url, secret, "ntf_6", {"a": 1}, ["127.0.0.1"]) == "ntf_6"
        headers, body = seen[0]
        lowered = {k.lower(): v for k, v in headers.items()}
        assert webhooks.verify(secret, lowered, body) == "ntf_6"
        assert json.loads(body) == {"a": 1}
        with pytest.raises(Transient, match="503"):
            webhook.send(url, secret, "ntf_6", {"a": 1}, ["127.0.0.1"])
        with pytest.raises(Permanent, match="refused"):
            webhook.send(url, secret, "ntf_6", {"a": 1}, [])  # loopback not allowed
    finally:
        server.shutdown()
        server.server_close()
    assert webhook.org_secret("master", "org-a") != webhook.org_secret("master", "org-b")


def test_backoff_grows_is_capped_and_never_zero():
    for attempt in range(1, 12):
        step = min(300.0, 2.0 * 2 ** (attempt - 1))
        delay = backoff(attempt, 2.0, 300.0)
        assert step / 2 <= delay <= step
