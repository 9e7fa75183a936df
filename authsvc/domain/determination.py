"""Per-line determinations in the CRD coverage-information vocabulary (domain.md §1).

A determination is the rules' explanation of one order line: whether it is covered, whether
prior authorization is needed, which documentation helps, and why.
"""

from __future__ import annotations

import dataclasses
from typing import Any

COVERED = ("covered", "not-covered", "conditional", "indeterminate")
PA_NEEDED = ("no-auth", "auth-needed", "satisfied", "performpa", "conditional", "indeterminate")
DOC_NEEDED = ("clinical", "admin", "patient", "conditional", "indeterminate")
INFO_NEEDED = (
    "performer", "location", "timeframe", "contract-window", "detail-code", "clinical", "admin",
    "OTH",
)
#: pa_needed values that are sent to the payer in a case (api.md › PAS details).
SENT_PA = ("auth-needed", "conditional")
#: pa_needed values the service does not send and raises `not_sent` for.
NOT_SENT_PA = ("performpa", "indeterminate")
#: restrictiveness order used to combine several policies (most restrictive wins).
PA_RANK = {"no-auth": 0, "conditional": 1, "auth-needed": 2}


class InvalidDetermination(ValueError):
    """A determination breaks a CRD invariant (q2, q3, q5, q9)."""


@dataclasses.dataclass(frozen=True)
class Reason:
    code: str
    text: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "text": self.text}


@dataclasses.dataclass(frozen=True)
class Determination:
    """The rules' answer for one line; every key of api.md is always present."""

    covered: str
    pa_needed: str | None
    doc_needed: tuple[str, ...] = ()
    info_needed: tuple[str, ...] = ()
    eligibility_check: bool = False
    reasons: tuple[Reason, ...] = ()
    rules: tuple[str, ...] = ()
    policy_links: tuple[str, ...] = ()
    satisfied_pa_id: str | None = None
    expiry_date: str | None = None
    hold_for_documentation: bool = False

    def __post_init__(self) -> None:
        check_invariants(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "covered": self.covered,
            "pa_needed": self.pa_needed,
            "doc_needed": list(self.doc_needed),
            "info_needed": list(self.info_needed) or None,
            "eligibility_check": self.eligibility_check,
            "reasons": [r.to_dict() for r in self.reasons],
            "rules": list(self.rules),
            "policy_links": list(self.policy_links),
            "satisfied_pa_id": self.satisfied_pa_id,
            "expiry_date": self.expiry_date,
        }

    def to_record(self) -> dict[str, Any]:
        """What is stored: the API form plus the internal hold flag."""
        return {**self.to_dict(), "hold_for_documentation": self.hold_for_documentation}

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Determination:
        return cls(
            covered=data["covered"],
            pa_needed=data.get("pa_needed"),
            doc_needed=tuple(data.get("doc_needed") or ()),
            info_needed=tuple(data.get("info_needed") or ()),
            eligibility_check=bool(data.get("eligibility_check")),
            reasons=tuple(Reason(r["code"], r["text"]) for r in data.get("reasons") or ()),
            rules=tuple(data.get("rules") or ()),
            policy_links=tuple(data.get("policy_links") or ()),
            satisfied_pa_id=data.get("satisfied_pa_id"),
            expiry_date=data.get("expiry_date"),
            hold_for_documentation=bool(data.get("hold_for_documentation")),
        )

    @property
    def sent_to_payer(self) -> bool:
        return self.pa_needed in SENT_PA

    @property
    def needs_no_auth(self) -> bool:
        """A line that produces a `no_auth_required` outcome once eligibility allows."""
        return self.pa_needed in ("no-auth", "satisfied")


def check_invariants(d: Determination) -> None:
    """Enforce the CRD invariants the model must never break."""
    if d.covered not in COVERED:
        raise InvalidDetermination(f"covered={d.covered!r}")
    if d.pa_needed is not None and d.pa_needed not in PA_NEEDED:
        raise InvalidDetermination(f"pa_needed={d.pa_needed!r}")
    if d.covered == "not-covered" and d.pa_needed is not None:
        raise InvalidDetermination("crd-ci-q2: not-covered must have no pa_needed")
    if "conditional" in (d.covered, d.pa_needed) and not d.info_needed:
        raise InvalidDetermination("crd-ci-q3: conditional needs info_needed")
    if (d.pa_needed == "satisfied") != (d.satisfied_pa_id is not None):
        raise InvalidDetermination("crd-ci-q5: satisfied_pa_id exactly when satisfied")
    if "indeterminate" in (d.covered, d.pa_needed) and not d.reasons:
        raise InvalidDetermination("crd-ci-q9: indeterminate needs a reason")
    for value in d.doc_needed:
        if value not in DOC_NEEDED:
            raise InvalidDetermination(f"doc_needed={value!r}")
    for value in d.info_needed:
        if value not in INFO_NEEDED:
            raise InvalidDetermination(f"info_needed={value!r}")


def for_inactive_coverage(d: Determination) -> Determination:
    """Scenario 2: inactive coverage re-determines the line as not covered, no pa_needed."""
    return dataclasses.replace(
        d,
        covered="not-covered",
        pa_needed=None,
        info_needed=(),
        satisfied_pa_id=None,
        expiry_date=None,
        reasons=(Reason("no-active-coverage", "Coverage is not active on the date of service"),),
    )


def for_member_not_found(d: Determination) -> Determination:
    """Scenario 3: the payer does not know the member; the answer is indeterminate."""
    return dataclasses.replace(
        d,
        covered="indeterminate",
        pa_needed=None,
        info_needed=(),
        satisfied_pa_id=None,
        expiry_date=None,
        reasons=(Reason("no-member-found", "The payer could not find this member"),),
    )


#: Eligibility answers that re-determine every line of the order (scenarios 2 and 3).
REDETERMINING = {"inactive": for_inactive_coverage, "member_not_found": for_member_not_found}


def after_eligibility(d: Determination, status: str) -> Determination:
    """A line's determination once the payer answered eligibility for the date of service.

    Inactive coverage and an unknown member replace the rules' answer; `active` (whatever
    the payer's "auth required" flag says: a payer rule overrides that signal, pitfalls)
    and `error` (the order waits for a coordinator) leave it as the rules gave it.
    """
    redo = REDETERMINING.get(status)
    return redo(d) if redo else d
