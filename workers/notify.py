"""The notification sender: one attempt per message; retries and backoff live in the database.

The message carries the notification id only. A redelivered or duplicated message finds the
row already claimed, sent, failed or suppressed and does nothing (`notifications.send` returns
skipped). The send counters this process keeps reach the API's /metrics when it shares
`PROMETHEUS_MULTIPROC_DIR` with `authsvc serve` (docs/operations.md).
"""

from __future__ import annotations

import dramatiq

import workers
from authsvc.service_layer import notifications

OPTIONS = {"max_retries": 3, "min_backoff": 1_000, "max_backoff": 30_000,
           "time_limit": 60_000}


@dramatiq.actor(actor_name="send_notification", **OPTIONS)
def send_notification(notification_id: str) -> None:
    """Claim, render, send and record one notification."""
    notifications.send(workers.services(), notification_id)
