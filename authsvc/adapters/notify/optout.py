"""Opt-outs without storing addresses: keyed hashes, signed unsubscribe tokens, SMS keywords
and the Twilio request signature.

- An address is matched by `address_hash`: HMAC-SHA256 under a key derived from
  `AUTHSVC_NOTIFY_SECRET` of the normalized address (lower-cased email; E.164 phone), so the
  opt-out table can say "this address said stop" without holding the address.
- An unsubscribe link carries a token: the organization, the channel, that hash, the
  notification id and the language, signed with HMAC-SHA256 under another derived key. Only
  the server can make one; it names no person.
- Inbound texts are verified like Twilio does (`X-Twilio-Signature`: base64 HMAC-SHA1, keyed
  with the account's auth token, of the URL followed by every form parameter name and value
  sorted by name).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Iterable

#: Twilio's default opt-out and opt-in keywords (a message that is only the keyword)
STOP_WORDS = frozenset({"STOP", "STOPALL", "STOP ALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT",
                        "OPTOUT", "REVOKE"})
START_WORDS = frozenset({"START", "UNSTOP"})
PHONE_RE = re.compile(r"\+[1-9][0-9]{6,14}")
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{8,800}\.[A-Za-z0-9_-]{43}")


def _key(secret: str, purpose: str) -> bytes:
    return hmac.new(secret.encode(), f"authsvc-notify:{purpose}".encode(),
                    hashlib.sha256).digest()


def normalize(channel: str, address: str) -> str:
    """The form two spellings of one address share: emails lower-cased, phones in E.164."""
    value = address.strip()
    if channel == "sms":
        return re.sub(r"[\s().-]", "", value)
    return value.lower()


def valid_phone(value: str) -> bool:
    return PHONE_RE.fullmatch(normalize("sms", value)) is not None


def address_hash(secret: str, channel: str, address: str) -> str:
    """Keyed hash of the normalized address (64 hex characters)."""
    msg = f"{channel}:{normalize(channel, address)}".encode()
    return hmac.new(_key(secret, "address"), msg, hashlib.sha256).hexdigest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_token(secret: str, *, org_id: str, channel: str, hashed: str, notification_id: str,
               language: str) -> str:
    """A signed unsubscribe token (URL-safe)."""
    payload = _b64(json.dumps({"o": org_id, "c": channel, "h": hashed, "n": notification_id,
                               "l": language}, separators=(",", ":")).encode())
    mac = hmac.new(_key(secret, "unsubscribe"), payload.encode(), hashlib.sha256).digest()
    return f"{payload}.{_b64(mac)}"


def read_token(secret: str, token: str | None) -> dict | None:
    """The token's claims when it is well formed and signed by us, else None."""
    if not token or not token.isascii() or not TOKEN_RE.fullmatch(token):
        return None
    payload, mac = token.split(".", 1)
    want = hmac.new(_key(secret, "unsubscribe"), payload.encode(), hashlib.sha256).digest()
    try:
        if not hmac.compare_digest(_unb64(mac), want):
            return None
        claims = json.loads(_unb64(payload))
    except (binascii.Error, ValueError):
        return None
    if not isinstance(claims, dict) or not all(isinstance(claims.get(k), str)
                                               for k in ("o", "c", "h", "n", "l")):
        return None
    return {"org_id": claims["o"], "channel": claims["c"], "address_hash": claims["h"],
            "notification_id": claims["n"], "language": claims["l"]}


def keyword(body: str) -> str | None:
    """`stop` or `start` when the whole text is an opt-out / opt-in keyword, else None."""
    word = " ".join(body.strip().rstrip(".!").split()).upper()
    if word in STOP_WORDS:
        return "stop"
    if word in START_WORDS:
        return "start"
    return None


def twilio_signature(auth_token: str, url: str, params: Iterable[tuple[str, str]]) -> str:
    """`X-Twilio-Signature` of a form POST: base64(HMAC-SHA1(token, url + sorted k+v))."""
    data = url + "".join(k + v for k, v in sorted(params))
    return base64.b64encode(hmac.new(auth_token.encode(), data.encode(), hashlib.sha1)
                            .digest()).decode()


def twilio_valid(auth_token: str | None, url: str, params: Iterable[tuple[str, str]],
                 signature: str | None) -> bool:
    if not auth_token or not signature:
        return False
    want = twilio_signature(auth_token, url, params)
    return hmac.compare_digest(want.encode(), signature.strip().encode())
