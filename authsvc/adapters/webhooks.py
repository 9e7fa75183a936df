"""Standard Webhooks signatures (https://www.standardwebhooks.com), both directions.

HMAC-SHA256 over `{webhook-id}.{webhook-timestamp}.{body}`, base64, `v1,` prefix; several
space-separated signatures may be sent (key rotation). Timestamps are checked in both
directions (5 minutes), which stripe-python's verifier does not do.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping

TOLERANCE_SECONDS = 300


class WebhookVerificationError(Exception):
    """The message is not authentic or not fresh (HTTP 401)."""


def secret_bytes(secret: str) -> bytes:
    """Secrets are `whsec_<base64>` as in the spec (padding optional); other strings are used
    as their UTF-8 bytes. The one key derivation for signing and verifying, ours and payers'."""
    if secret.startswith("whsec_"):
        raw = secret[6:]
        try:
            return base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("malformed whsec_ secret") from exc
    return secret.encode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    payload = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_bytes(secret), payload, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(secret: str, msg_id: str, body: bytes, timestamp: int | None = None) -> dict:
    ts = int(time.time()) if timestamp is None else timestamp
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts),
            "webhook-signature": sign(secret, msg_id, ts, body)}


def verify(secret: str, hdrs: Mapping[str, str], body: bytes, now: float | None = None,
           tolerance: int = TOLERANCE_SECONDS) -> str:
    """Check a signed message; returns its webhook-id or raises WebhookVerificationError."""
    msg_id = hdrs.get("webhook-id")
    ts_raw = hdrs.get("webhook-timestamp")
    sig_header = hdrs.get("webhook-signature")
    if not msg_id or not ts_raw or not sig_header:
        raise WebhookVerificationError("missing webhook headers")
    if not ts_raw.isascii() or not ts_raw.isdigit() or len(ts_raw) > 12:
        raise WebhookVerificationError("bad timestamp")
    ts = int(ts_raw)
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance:
        raise WebhookVerificationError("timestamp outside the tolerance window")
    expected = sign(secret, msg_id, ts, body).split(",", 1)[1].encode()
    for candidate in sig_header.split(" "):
        version, _, value = candidate.partition(",")
        if version == "v1" and value and hmac.compare_digest(value.encode(), expected):
            return msg_id
    raise WebhookVerificationError("no matching signature")
