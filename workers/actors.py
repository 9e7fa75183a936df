"""Actors: thin adapters that take one id and call the service layer.

Retries are bounded here (transport hiccups); the payer retry budget and backoff live in the
database with the case, so a flushed Redis or a dead worker loses nothing.
"""

from __future__ import annotations

import datetime as dt
import os

import dramatiq

import workers
from authsvc.domain import clock
from authsvc.service_layer import payer_work


class SkewedClock:
    """The system clock shifted by a fixed offset: what `faketime '+10m'` does to a process."""

    def __init__(self, seconds: float):
        self.offset = dt.timedelta(seconds=seconds)

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self.offset


# reliability.md F16 runs a worker with its clock minutes off, without libfaketime: honoured
# only with AUTHSVC_TESTING=1, like the failpoints.
if os.environ.get("AUTHSVC_TESTING") == "1" and os.environ.get("AUTHSVC_TEST_CLOCK_OFFSET_SECONDS"):
    clock.install(SkewedClock(float(os.environ["AUTHSVC_TEST_CLOCK_OFFSET_SECONDS"])))

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
