"""Orders as the rules see them, and the order-level status vocabulary."""

from __future__ import annotations

import dataclasses
import datetime as dt

ORDER_STATUSES = (
    "received", "checking_eligibility", "coverage_problem", "no_auth_required",
    "awaiting_documentation", "in_review", "approved", "partially_approved", "modified",
    "denied", "cancelled", "needs_attention",
)
DECIDED = frozenset({"approved", "partially_approved", "modified", "denied", "no_auth_required"})
ELIGIBILITY_STATUSES = (
    "pending", "active", "inactive", "member_not_found", "error", "not_required",
)
ORDER_ATTENTION = ("coverage_problem", "eligibility_error", "not_sent")


@dataclasses.dataclass(frozen=True)
class LineFacts:
    sequence: int
    code_system: str
    code: str
    quantity: int
    service_start: dt.date
    service_end: dt.date | None = None


@dataclasses.dataclass(frozen=True)
class OrderFacts:
    """Everything the rules engine may look at for one order (no names, no member id)."""

    payer_id: str
    lines: tuple[LineFacts, ...]
    diagnoses: tuple[str, ...] = ()
    place_of_service: str | None = None
    requester_npi: str | None = None
    performer_npi: str | None = None
    patient_birth_date: dt.date | None = None
    patient_sex: str | None = None
    as_of: dt.date | None = None  # the evaluation date (age); defaults to each line's start


def age_on(birth_date: dt.date, on: dt.date) -> int:
    years = on.year - birth_date.year
    if (on.month, on.day) < (birth_date.month, birth_date.day):
        years -= 1
    return years


def needs_eligibility(determinations: list) -> bool:
    """Eligibility runs when a line asks for it or may need PA (api.md › Orders)."""
    return any(
        d.eligibility_check or d.pa_needed in ("auth-needed", "conditional") for d in determinations
    )
