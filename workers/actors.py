"""Actors: thin adapters that take one id and call the service layer.

Retries are bounded here (transport hiccups); the payer retry budget and backoff live in the
database with the case, so a flushed Redis or a dead worker loses nothing.
"""

from __future__ import annotations

import dramatiq

import workers
from authsvc.service_layer import payer_work

OPTIONS = {"max_retries": 5, "min_backoff": 1_000, "max_backoff": 60_000,
           "time_limit": 120_000}


@dramatiq.actor(actor_name="run_eligibility", **OPTIONS)
def run_eligibility(check_id: str) -> None:
    payer_work.run_eligibility(workers.services(), check_id)


@dramatiq.actor(actor_name="submit_case", **OPTIONS)
def submit_case(case_id: str) -> None:
    payer_work.submit_case(workers.services(), case_id)


@dramatiq.actor(actor_name="poll_case", **OPTIONS)
def poll_case(case_id: str) -> None:
    payer_work.poll_case(workers.services(), case_id)


@dramatiq.actor(actor_name="cancel_case", **OPTIONS)
def cancel_case(case_id: str) -> None:
    payer_work.cancel_at_payer(workers.services(), case_id)


@dramatiq.actor(actor_name="noop", max_retries=0)
def noop(entity_id: str) -> None:
    """Does nothing: `bench/pipeline.py` measures the broker's drain rate with it."""
