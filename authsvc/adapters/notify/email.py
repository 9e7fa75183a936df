"""Email over SMTP with smtplib: `smtp://host:port`, `smtps://…` (TLS from the start) or
`smtp+starttls://user:pass@host:port` (STARTTLS, then AUTH when the URL has credentials).

The idempotency key is the Message-ID (`<notification-id@authsvc>`): SMTP itself has no way to
refuse a duplicate, but mail clients and most mailbox providers collapse messages that carry
the same Message-ID (see docs/operations.md › Notifications).
"""

from __future__ import annotations

import email.policy
import smtplib
import ssl
import urllib.parse
from email.message import EmailMessage
from email.utils import formatdate

from authsvc.adapters.notify import Permanent, Transient

TIMEOUT_SECONDS = 15.0
#: RFC 5322 allows 998 characters a line: a long List-Unsubscribe URL stays one plain word
#: (the default 78 would turn it into RFC 2047 encoded words, which mail clients ignore there)
POLICY = email.policy.default.clone(max_line_length=998)
DEFAULT_FROM = "authsvc <no-reply@authsvc.invalid>"


def message_id(idempotency_key: str) -> str:
    """A stable Message-ID for a notification: the same on every attempt."""
    return f"<{idempotency_key}@authsvc>"


def build(to: str, subject: str, text: str, html: str | None, idempotency_key: str,
          sender: str = DEFAULT_FROM, headers: dict[str, str] | None = None) -> EmailMessage:
    """A text email with an HTML alternative; headers carry no PHI beyond the address.
    `headers` adds e.g. `List-Unsubscribe` and `List-Unsubscribe-Post` (RFC 8058)."""
    msg = EmailMessage(policy=POLICY)
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = message_id(idempotency_key)
    msg["Auto-Submitted"] = "auto-generated"
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content(text)
    if html:
        msg.add_alternative(f"<!doctype html><html><body>{html}</body></html>", subtype="html")
    return msg


def send(url: str, to: str, subject: str, text: str, html: str | None,
         idempotency_key: str, headers: dict[str, str] | None = None) -> str:
    """Send one email; returns the provider message id (the Message-ID).

    Raises `Transient` for connection problems and 4xx SMTP replies, `Permanent` for a bad
    URL or address and 5xx replies (RFC 5321: 5yz is a permanent failure).
    """
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("smtp", "smtps", "smtp+starttls") or not parts.hostname:
        raise Permanent("AUTHSVC_SMTP_URL must be smtp://, smtps:// or smtp+starttls://")
    query = urllib.parse.parse_qs(parts.query)
    sender = (query.get("from") or [DEFAULT_FROM])[0]
    msg = build(to, subject, text, html, idempotency_key, sender, headers)
    port = parts.port or (465 if scheme == "smtps" else 25)
    try:
        client: smtplib.SMTP
        if scheme == "smtps":
            client = smtplib.SMTP_SSL(parts.hostname, port, timeout=TIMEOUT_SECONDS,
                                      context=ssl.create_default_context())
        else:
            client = smtplib.SMTP(parts.hostname, port, timeout=TIMEOUT_SECONDS)
        with client:
            if scheme == "smtp+starttls":
                client.starttls(context=ssl.create_default_context())
            if parts.username:
                client.login(urllib.parse.unquote(parts.username),
                             urllib.parse.unquote(parts.password or ""))
            refused = client.send_message(msg)
    except smtplib.SMTPRecipientsRefused as exc:
        codes = [c for c, _ in exc.recipients.values()]
        if all(400 <= c < 500 for c in codes):
            raise Transient(f"recipient deferred (SMTP {codes[0]})") from None
        raise Permanent(f"recipient refused (SMTP {codes[0] if codes else '?'})") from None
    except smtplib.SMTPResponseException as exc:
        kind = Transient if 400 <= exc.smtp_code < 500 else Permanent
        raise kind(f"SMTP {exc.smtp_code}") from None
    except (smtplib.SMTPServerDisconnected, smtplib.SMTPConnectError, OSError) as exc:
        raise Transient(f"SMTP connection failed: {type(exc).__name__}") from None
    except smtplib.SMTPException as exc:
        raise Transient(f"SMTP error: {type(exc).__name__}") from None
    if refused:
        raise Permanent("recipient refused")
    return message_id(idempotency_key)
