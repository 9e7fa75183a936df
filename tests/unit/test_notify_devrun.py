"""`make run`'s notification plumbing: one emptied Prometheus multiprocess directory for every
process, and an SMS sink that plays a phone replying STOP, signed the way Twilio signs."""

from __future__ import annotations

import threading
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from authsvc import devrun
from authsvc.adapters.notify import optout
from authsvc.adapters.notify.sinks import SmsSink
from authsvc.config import Settings


def test_every_process_gets_one_emptied_metrics_directory(tmp_path):
    settings = Settings.from_env({"AUTHSVC_VAR_DIR": str(tmp_path)})
    stale = tmp_path / "metrics" / "counter_123.db"
    stale.parent.mkdir()
    stale.write_bytes(b"old run")
    env: dict[str, str] = {}
    devrun._metrics_dir(settings, env)
    assert env["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path / "metrics")
    assert not stale.exists()  # a restart starts the counters at zero
    chosen = {"PROMETHEUS_MULTIPROC_DIR": "/somewhere/else"}
    devrun._metrics_dir(settings, chosen)  # an operator's choice is kept
    assert chosen == {"PROMETHEUS_MULTIPROC_DIR": "/somewhere/else"}


def test_the_sms_sink_forwards_a_reply_signed_like_twilio():
    seen: list[tuple[str, list[tuple[str, str]]]] = []

    class Inbound(BaseHTTPRequestHandler):
        def log_message(self, *args):  # noqa: ANN002
            return None

        def do_POST(self):  # noqa: N802
            raw = self.rfile.read(int(self.headers["Content-Length"])).decode()
            seen.append((self.headers["X-Twilio-Signature"], urllib.parse.parse_qsl(raw)))
            self.send_response(200)
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Inbound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/notifications/sms-inbound"
    sink = SmsSink(port=0, inbound_url=url, auth_token="dev-token").start()  # noqa: S106
    try:
        # `curl -d From=+15555550101 -d Body=STOP`: curl does not encode the +
        req = urllib.request.Request(f"http://127.0.0.1:{sink.port}/reply",
                                     data=b"From=+15555550101&Body=STOP", method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - local sink
            assert resp.status == 200
    finally:
        sink.stop()
        server.shutdown()
        server.server_close()
    [(signature, params)] = seen
    assert dict(params)["From"] == "+15555550101" and dict(params)["Body"] == "STOP"
    assert optout.twilio_valid("dev-token", url, params, signature)
    assert not optout.twilio_valid("another-token", url, params, signature)
