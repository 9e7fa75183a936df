"""Provider webhooks signed per Standard Webhooks (`authsvc.adapters.webhooks.headers`).

The webhook-id is the notification id, the same on every attempt, so the receiver can drop a
repeat. The URL is re-checked against SSRF at send time (`authsvc.adapters.ssrf`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterable

from authsvc.adapters import ssrf, webhooks
from authsvc.adapters.notify import Permanent, Transient

TIMEOUT_SECONDS = 10.0


def org_secret(master: str, org_id: str) -> str:
    """The organization's signing secret (`whsec_…`), derived from the server's master key.

    Derived rather than stored because the schema has no column for it; `authsvc orgs
    contact --webhook-url` prints it once for the provider to configure.
    """
    digest = hmac.new(master.encode(), f"provider-webhook:{org_id}".encode(),
                      hashlib.sha256).digest()
    return "whsec_" + base64.b64encode(digest).decode()


def send(url: str, secret: str, webhook_id: str, payload: dict,
         allowlist: Iterable[str]) -> str:
    """POST the signed JSON payload; returns the webhook-id as the provider message id."""
    body = json.dumps(payload, separators=(",", ":"), default=str).encode()
    try:
        status = ssrf.post(url, body, webhooks.headers(secret, webhook_id, body), allowlist,
                           timeout=TIMEOUT_SECONDS)
    except ssrf.Refused as exc:
        raise Permanent(f"webhook URL refused: {exc}") from None
    except (OSError, ValueError) as exc:
        raise Transient(f"webhook connection failed: {type(exc).__name__}") from None
    except Exception as exc:  # noqa: BLE001 - http.client.HTTPException and friends
        raise Transient(f"webhook bad response: {type(exc).__name__}") from None
    if 200 <= status < 300:
        return webhook_id
    if status in (408, 429) or status >= 500:
        raise Transient(f"webhook HTTP {status}")
    raise Permanent(f"webhook HTTP {status}")
