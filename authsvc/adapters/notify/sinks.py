"""Local sinks for `make run` and the tests: a real SMTP server (aiosmtpd) and a tiny
Twilio-shaped HTTP SMS gateway. They keep what they receive in memory (and, when given a
folder, append it to `mail.mbox` / `sms.jsonl`) so a person or a test can read it back.

The SMS sink honours the idempotency key (`I-Twilio-Idempotency-Token` or `Idempotency-Key`)
like a real gateway: a repeat answers with the first message's sid and sends nothing. Given an
`inbound_url` and an `auth_token`, it also plays a phone replying: `POST /reply` (form From,
Body) is signed like Twilio signs (`X-Twilio-Signature`) and forwarded to authsvc's inbound
webhook, e.g. `curl --data-urlencode From=+15555550101 -d Body=STOP http://127.0.0.1:8092/reply`.
"""

from __future__ import annotations

import base64
import email
import email.policy
import json
import threading
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

#: numbers the SMS sink refuses with 400 (Twilio's test number for "invalid"), for tests
INVALID_NUMBERS = frozenset({"+15005550001"})


class SmtpSink:
    """An SMTP server on `host:port` that accepts every message (start/stop at will)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8025, folder: Path | None = None):
        self.host, self.port, self.folder = host, port, folder
        self.messages: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._controller: Any = None

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    def start(self) -> SmtpSink:
        from aiosmtpd.controller import Controller

        sink = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]  # noqa: N802
                sink._store(envelope.mail_from, list(envelope.rcpt_tos), envelope.content)
                return "250 Message accepted for delivery"

        self._controller = Controller(Handler(), hostname=self.host, port=self.port,
                                      ready_timeout=10)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def _store(self, sender: str, recipients: list[str], content: bytes) -> None:
        msg = email.message_from_bytes(content, policy=email.policy.default)
        body = msg.get_body(preferencelist=("plain",))
        html = msg.get_body(preferencelist=("html",))
        item = {"from": sender, "to": recipients, "subject": str(msg["Subject"] or ""),
                "message_id": str(msg["Message-ID"] or ""),
                "list_unsubscribe": str(msg["List-Unsubscribe"] or ""),
                "list_unsubscribe_post": str(msg["List-Unsubscribe-Post"] or ""),
                "text": body.get_content() if body is not None else "",
                "html": html.get_content() if html is not None else ""}
        with self._lock:
            self.messages.append(item)
            if self.folder is not None:
                self.folder.mkdir(parents=True, exist_ok=True)
                with open(self.folder / "mail.mbox", "ab") as fh:
                    fh.write(f"From {sender or 'MAILER-DAEMON'}\n".encode() + content + b"\n")

    def received(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.messages)


class SmsSink:
    """`POST …/Messages.json` (form To/From/Body) → `{"sid", "status"}`; `GET /messages`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8092, folder: Path | None = None,
                 username: str | None = None, password: str | None = None,
                 inbound_url: str | None = None, auth_token: str | None = None):
        self.host, self.port, self.folder = host, port, folder
        self.username, self.password = username, password
        self.inbound_url, self.auth_token = inbound_url, auth_token
        self.messages: list[dict[str, Any]] = []
        self.duplicates = 0
        self._by_key: dict[str, str] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        cred = f"{self.username}:{self.password}@" if self.username else ""
        return f"http://{cred}{self.host}:{self.port}/2010-04-01/Accounts/ACsink"

    def start(self) -> SmsSink:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # no phone numbers in logs
                return None

            def _json(self, status: int, body: Any) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self) -> None:  # noqa: N802
                if self.path.split("?", 1)[0] == "/messages":
                    self._json(200, {"items": sink.received(), "duplicates": sink.duplicates})
                else:
                    self._json(404, {"message": "not found"})

            def do_POST(self) -> None:  # noqa: N802
                if self.path.split("?", 1)[0] == "/reply":
                    length = int(self.headers.get("Content-Length") or 0)
                    form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                    sender = form.get("From", "")
                    if sender.startswith(" "):  # `curl -d From=+1…`: the + arrived as a space
                        sender = "+" + sender.strip()
                    status, answer = sink.reply(sender, form.get("Body", ""))
                    self._json(status, {"forwarded_status": status, "answer": answer})
                    return
                if not self.path.split("?", 1)[0].rstrip("/").endswith(("/Messages",
                                                                          "/Messages.json")):
                    self._json(404, {"message": "not found"})
                    return
                if sink.username and not sink._authorized(self.headers.get("Authorization")):
                    self._json(401, {"message": "authenticate"})
                    return
                length = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                to, body = (form.get("To") or [""])[0], (form.get("Body") or [""])[0]
                if (not to.startswith("+") or not to[1:].isdigit() or not body
                        or to in INVALID_NUMBERS):
                    self._json(400, {"code": 21211, "message": "invalid To or Body"})
                    return
                key = (self.headers.get("I-Twilio-Idempotency-Token")
                       or self.headers.get("Idempotency-Key"))
                sid = sink._store(to, (form.get("From") or [""])[0], body, key)
                self._json(201, {"sid": sid, "status": "queued"})

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="sms-sink",
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _authorized(self, header: str | None) -> bool:
        expected = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return header == f"Basic {expected}"

    def _store(self, to: str, sender: str, body: str, key: str | None) -> str:
        with self._lock:
            if key and key in self._by_key:
                self.duplicates += 1
                return self._by_key[key]
            sid = "SM" + uuid.uuid4().hex
            if key:
                self._by_key[key] = sid
            item = {"sid": sid, "to": to, "from": sender, "body": body, "idempotency_key": key}
            self.messages.append(item)
            if self.folder is not None:
                self.folder.mkdir(parents=True, exist_ok=True)
                with open(self.folder / "sms.jsonl", "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(item) + "\n")
            return sid

    def reply(self, sender: str, body: str) -> tuple[int, str]:
        """A text from `sender` to our number, signed and forwarded like Twilio does."""
        import urllib.error
        import urllib.request

        from authsvc.adapters.notify import optout

        if not self.inbound_url or not self.auth_token:
            return 501, "the sink has no inbound_url/auth_token"
        params = [("From", sender), ("To", "+15550100000"), ("Body", body),
                  ("MessageSid", "SM" + uuid.uuid4().hex), ("AccountSid", "ACsink")]
        data = urllib.parse.urlencode(params).encode()
        req = urllib.request.Request(self.inbound_url, data=data, method="POST", headers={  # noqa: S310
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": optout.twilio_signature(self.auth_token, self.inbound_url,
                                                          params)})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - our own URL
                return resp.status, resp.read().decode()[:500]
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()[:500]
        except OSError as exc:
            return 502, type(exc).__name__

    def received(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.messages)
