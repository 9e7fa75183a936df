"""The case state machine of domain.md §3.2: every legal edge works, illegal ones raise."""

from __future__ import annotations

import itertools

import pytest

from authsvc.domain import cases as cs
from authsvc.domain.errors import IllegalTransition

LEGAL = [
    ("needs_input", "ready_to_submit"), ("needs_input", "cancelled"),
    ("ready_to_submit", "submitting"), ("ready_to_submit", "cancelled"),
    *[("submitting", s) for s in ("approved", "partially_approved", "modified", "denied",
                                   "not_required", "contact_payer", "rejected", "submitted",
                                   "pended", "info_requested", "error", "cancelled")],
    *[("submitted", s) for s in ("approved", "pended", "info_requested", "denied", "cancelled")],
    *[("pended", s) for s in ("approved", "partially_approved", "modified", "denied",
                               "not_required", "contact_payer", "info_requested", "cancelled")],
    ("info_requested", "submitting"), ("info_requested", "pended"),
    ("info_requested", "approved"), ("info_requested", "cancelled"),
    ("approved", "superseded"), ("approved", "expired"), ("approved", "cancelled"),
    ("partially_approved", "superseded"), ("modified", "expired"), ("modified", "cancelled"),
    ("denied", "superseded"), ("rejected", "superseded"), ("rejected", "cancelled"),
    ("error", "superseded"), ("error", "submitting"), ("error", "approved"),
    ("contact_payer", "approved"), ("contact_payer", "denied"),
]
ILLEGAL = [
    ("approved", "pended"), ("approved", "denied"), ("approved", "submitting"),
    ("denied", "approved"), ("denied", "submitting"), ("cancelled", "submitting"),
    ("cancelled", "approved"), ("expired", "approved"), ("superseded", "approved"),
    ("not_required", "approved"), ("needs_input", "submitting"), ("needs_input", "approved"),
    ("ready_to_submit", "approved"), ("pended", "submitted"), ("pended", "ready_to_submit"),
    ("rejected", "submitting"), ("denied", "cancelled"),
]


@pytest.mark.parametrize(("current", "target"), LEGAL)
def test_legal_transitions(current: str, target: str) -> None:
    assert cs.transition(current, target) == target


@pytest.mark.parametrize(("current", "target"), ILLEGAL)
def test_illegal_transitions_raise(current: str, target: str) -> None:
    with pytest.raises(IllegalTransition) as err:
        cs.transition(current, target)
    assert err.value.current == current and err.value.target == target


def test_final_states_never_go_back_to_waiting_on_the_payer() -> None:
    for final, waiting in itertools.product(cs.FINAL, cs.AWAITING_PAYER | {cs.SUBMITTING}):
        assert not cs.can_transition(final, waiting)


def test_only_decided_authorizations_can_expire() -> None:
    expirable = {s for s in cs.STATES if cs.can_transition(s, cs.EXPIRED)}
    assert expirable == {"approved", "partially_approved", "modified"}


@pytest.mark.parametrize(("actions", "info", "expected"), [
    (["A1"], False, "approved"),
    (["A1", "A1"], False, "approved"),
    (["A3"], False, "denied"),
    (["A1", "A3"], False, "partially_approved"),
    (["A2"], False, "partially_approved"),
    (["A6"], False, "modified"),
    (["A1", "A6"], False, "modified"),
    (["A4"], False, "pended"),
    (["A4"], True, "info_requested"),
    (["A1", "A4"], False, "pended"),
    (["CT", "A1"], False, "contact_payer"),
    (["NA"], False, "not_required"),
    (["C"], False, "cancelled"),
    ([None], False, "submitted"),
    (["A1", None], False, "submitted"),
])
def test_aggregation_rule(actions, info, expected) -> None:
    assert cs.aggregate(actions, info) == expected


def test_order_status_follows_the_newest_case_but_not_a_denied_extension() -> None:
    assert cs.order_status_from_cases([("initial", "pended", None)], "received") == "in_review"
    assert cs.order_status_from_cases(
        [("initial", "approved", None), ("extension", "denied", None)], "x") == "approved"
    assert cs.order_status_from_cases(
        [("initial", "superseded", None), ("extension", "approved", None)], "x") == "approved"
    assert cs.order_status_from_cases([("initial", "needs_input", None)], "x") == \
        "awaiting_documentation"
    assert cs.order_status_from_cases([("initial", "rejected", None)], "x") == "needs_attention"


def test_partial_approval_raises_denied_review_only_with_a_denied_line() -> None:
    assert cs.attention_for("partially_approved", ["A1", "A3"]) == "denied_review"
    assert cs.attention_for("partially_approved", ["A2"]) is None
    assert cs.attention_for("denied", ["A3"]) == "denied_review"
    assert cs.attention_for("approved", ["A1"]) is None
