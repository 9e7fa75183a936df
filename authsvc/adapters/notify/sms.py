"""SMS over a Twilio-shaped HTTP gateway: `POST {AUTHSVC_SMS_URL}/Messages.json` with form
fields To, From, Body and HTTP basic auth taken from the URL's credentials.

`AUTHSVC_SMS_URL` looks like `https://SID:TOKEN@api.example.com/2010-04-01/Accounts/SID?from=+15550100`;
the `from` query parameter is the sending number. Every attempt of one notification carries
the same idempotency key (`I-Twilio-Idempotency-Token` and `Idempotency-Key`), so a gateway
that honours it sends one text however often we retry.
"""

from __future__ import annotations

import urllib.parse

import requests

from authsvc.adapters.notify import Permanent, Transient

TIMEOUT = (3.0, 10.0)
DEFAULT_FROM = "+15550100000"


def _endpoint(url: str) -> tuple[str, tuple[str, str] | None, str]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Permanent("AUTHSVC_SMS_URL must be an http(s) URL")
    auth = None
    if parts.username:
        auth = (urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    base = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    sender = (urllib.parse.parse_qs(parts.query).get("from") or [DEFAULT_FROM])[0]
    return base + "/Messages.json", auth, sender


def send(url: str, to: str, body: str, idempotency_key: str) -> str:
    """Send one text; returns the gateway's message id (`sid`).

    Raises `Transient` on connection errors, 408, 429 and 5xx, `Permanent` on other 4xx
    (a bad number, a refused sender) and on an answer without a message id.
    """
    endpoint, auth, sender = _endpoint(url)
    headers = {"I-Twilio-Idempotency-Token": idempotency_key, "Idempotency-Key": idempotency_key}
    try:
        resp = requests.post(endpoint, data={"To": to, "From": sender, "Body": body},
                             auth=auth, headers=headers, timeout=TIMEOUT,
                             allow_redirects=False)
    except requests.RequestException as exc:
        raise Transient(f"SMS gateway unreachable: {type(exc).__name__}") from None
    if resp.status_code in (408, 429) or resp.status_code >= 500:
        raise Transient(f"SMS gateway HTTP {resp.status_code}")
    if not 200 <= resp.status_code < 300:
        raise Permanent(f"SMS gateway HTTP {resp.status_code}")
    try:
        sid = resp.json().get("sid")
    except ValueError:
        sid = None
    if not sid or not isinstance(sid, str):
        raise Permanent("SMS gateway answered without a message id")
    return sid[:200]
