"""Outbound webhooks under network faults (the in-repo fault proxy, reliability.md §4.1, in
front of a real receiver): every fault is a transient failure (retried later), none hangs a
worker thread past the deadline, and the healthy path still delivers through the proxy."""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from authsvc.adapters.notify import Transient, webhook
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.integration
SECRET = "whsec_" + "QUFB" * 8


class _Receiver(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hits = 0

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).hits += 1
        body = b'{"received": true, "padding": "' + b"x" * 2000 + b'"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def proxied():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    proxy = FaultProxy("127.0.0.1", server.server_address[1]).start()
    _Receiver.hits = 0
    try:
        yield proxy
    finally:
        proxy.stop()
        server.shutdown()
        server.server_close()


def _send(proxy: FaultProxy, timeout: float = 1.5) -> str:
    old = webhook.TIMEOUT_SECONDS
    webhook.TIMEOUT_SECONDS = timeout
    try:
        return webhook.send(f"http://127.0.0.1:{proxy.port}/hook", SECRET, "ntf_fault",
                            {"event": "case.decided"}, [f"127.0.0.1:{proxy.port}"])
    finally:
        webhook.TIMEOUT_SECONDS = old


def test_S7_webhook_through_a_healthy_proxy_is_delivered(proxied):
    assert _send(proxied) == "ntf_fault" and _Receiver.hits == 1


@pytest.mark.parametrize("mode, options", [
    ("down", {}), ("reset", {}), ("blackhole", {}),
    ("slicer", {"slice_bytes": 1, "latency_ms": 100}),  # a drip: ~2 KiB at 10 bytes/s
    ("limit_data", {"limit_bytes": 40}),  # the answer's head is cut mid-line
])
def test_S7_webhook_network_faults_are_transient_and_bounded(proxied, mode, options):
    proxied.set(mode, **options)
    started = time.monotonic()
    with pytest.raises(Transient):
        _send(proxied, timeout=1.5)
    assert time.monotonic() - started < 4, "a fault held the sender past its deadline"
    proxied.set("pass")
    assert _send(proxied) == "ntf_fault"  # and the next attempt goes through
