"""The webhook delivery actor: one attempt per message; the schedule lives in the database."""

from __future__ import annotations

import dramatiq

import workers
from authsvc.service_layer import webhooks_out

OPTIONS = {"max_retries": 3, "min_backoff": 1_000, "max_backoff": 30_000,
           "time_limit": 60_000}


@dramatiq.actor(actor_name="deliver_webhook", **OPTIONS)
def deliver_webhook(delivery_id: str) -> None:
    webhooks_out.deliver(workers.services(), delivery_id)
