"""CRD invariants q2, q3, q5, q9 hold for every determination the model can build."""

from __future__ import annotations

import pytest

from authsvc.domain.determination import (
    Determination,
    InvalidDetermination,
    Reason,
    for_inactive_coverage,
    for_member_not_found,
)

AUTH = Determination(covered="conditional", pa_needed="auth-needed", doc_needed=("clinical",),
                     info_needed=("OTH",), eligibility_check=True,
                     reasons=(Reason("policy", "Lumbar MRI requires prior authorization"),),
                     rules=("demo/imaging/mri-lumbar",))


def test_every_api_key_is_present() -> None:
    assert set(AUTH.to_dict()) == {
        "covered", "pa_needed", "doc_needed", "info_needed", "eligibility_check", "reasons",
        "rules", "policy_links", "satisfied_pa_id", "expiry_date"}


@pytest.mark.parametrize("kwargs", [
    {"covered": "not-covered", "pa_needed": "no-auth"},  # q2
    {"covered": "conditional", "pa_needed": "no-auth"},  # q3
    {"covered": "covered", "pa_needed": "satisfied"},  # q5
    {"covered": "covered", "pa_needed": "no-auth", "satisfied_pa_id": "gc-1"},  # q5
    {"covered": "indeterminate", "pa_needed": None},  # q9
    {"covered": "maybe", "pa_needed": None},
    {"covered": "covered", "pa_needed": "no-auth", "doc_needed": ("fax",)},
])
def test_invariants_are_enforced(kwargs) -> None:
    with pytest.raises(InvalidDetermination):
        Determination(**kwargs)


def test_inactive_coverage_means_not_covered_and_no_pa_needed() -> None:
    d = for_inactive_coverage(AUTH)
    assert d.covered == "not-covered" and d.pa_needed is None
    assert [r.code for r in d.reasons] == ["no-active-coverage"]


def test_member_not_found_is_indeterminate_with_a_reason() -> None:
    d = for_member_not_found(AUTH)
    assert d.covered == "indeterminate" and d.reasons[0].code == "no-member-found"


def test_record_round_trip_keeps_the_hold_flag() -> None:
    d = Determination(covered="covered", pa_needed="auth-needed", hold_for_documentation=True)
    assert Determination.from_record(d.to_record()) == d
