"""Notification channels (email over SMTP, SMS over an HTTP gateway, provider webhooks) and
the templates they send. Adapters raise `Transient` (try again later) or `Permanent` (record
and stop); they never log addresses or message text."""

from __future__ import annotations


class SendError(Exception):
    """A send that did not succeed; `str(exc)` is a short reason without PHI."""


class Transient(SendError):
    """The channel may accept the same message later (connection refused, 5xx, 429)."""


class Permanent(SendError):
    """The channel will never accept this message (bad address, 4xx, not configured)."""
