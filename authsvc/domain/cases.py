"""The prior-authorization case state machine (domain.md §3.2, api.md › Cases).

A case is one request to one payer for one order. Its state moves only along the edges
below; anything else raises `IllegalTransition`, so a late or duplicate payer message can
never move a decided case backwards.
"""

from __future__ import annotations

from collections.abc import Iterable

from authsvc.domain.errors import IllegalTransition

NEEDS_INPUT = "needs_input"
READY_TO_SUBMIT = "ready_to_submit"
SUBMITTING = "submitting"
SUBMITTED = "submitted"
PENDED = "pended"
INFO_REQUESTED = "info_requested"
APPROVED = "approved"
PARTIALLY_APPROVED = "partially_approved"
MODIFIED = "modified"
DENIED = "denied"
NOT_REQUIRED = "not_required"
REJECTED = "rejected"
CONTACT_PAYER = "contact_payer"
CANCELLED = "cancelled"
EXPIRED = "expired"
SUPERSEDED = "superseded"
ERROR = "error"

STATES = (
    NEEDS_INPUT, READY_TO_SUBMIT, SUBMITTING, SUBMITTED, PENDED, INFO_REQUESTED, APPROVED,
    PARTIALLY_APPROVED, MODIFIED, DENIED, NOT_REQUIRED, REJECTED, CONTACT_PAYER, CANCELLED,
    EXPIRED, SUPERSEDED, ERROR,
)
FINAL = frozenset({
    APPROVED, PARTIALLY_APPROVED, MODIFIED, DENIED, NOT_REQUIRED, CANCELLED, EXPIRED, SUPERSEDED,
})
#: decided states that carry an authorization (can expire, be superseded or withdrawn).
AUTHORIZED = frozenset({APPROVED, PARTIALLY_APPROVED, MODIFIED})
#: states the payer's answer fans out to (domain.md §3.2).
ANSWER_STATES = frozenset({
    APPROVED, PARTIALLY_APPROVED, MODIFIED, DENIED, NOT_REQUIRED, CONTACT_PAYER, REJECTED,
    SUBMITTED, PENDED, INFO_REQUESTED,
})
#: states waiting on the payer: polled and subject to deadlines.
AWAITING_PAYER = frozenset({SUBMITTED, PENDED, INFO_REQUESTED})

_OPEN = frozenset(STATES) - FINAL
_TRANSITIONS: dict[str, frozenset[str]] = {
    NEEDS_INPUT: frozenset({READY_TO_SUBMIT, CANCELLED}),
    READY_TO_SUBMIT: frozenset({SUBMITTING, CANCELLED}),
    SUBMITTING: ANSWER_STATES | {ERROR, CANCELLED},
    SUBMITTED: ANSWER_STATES - {SUBMITTED} | {CANCELLED, ERROR},
    PENDED: ANSWER_STATES - {SUBMITTED, PENDED} | {CANCELLED, ERROR},
    INFO_REQUESTED: ANSWER_STATES - {SUBMITTED, INFO_REQUESTED} | {SUBMITTING, CANCELLED, ERROR},
    CONTACT_PAYER: (ANSWER_STATES - {SUBMITTED, CONTACT_PAYER}) | {CANCELLED, SUPERSEDED},
    REJECTED: frozenset({SUPERSEDED, CANCELLED}),
    ERROR: (ANSWER_STATES - {SUBMITTED}) | {SUPERSEDED, CANCELLED, SUBMITTING},
    APPROVED: frozenset({SUPERSEDED, EXPIRED, CANCELLED}),
    PARTIALLY_APPROVED: frozenset({SUPERSEDED, EXPIRED, CANCELLED}),
    MODIFIED: frozenset({SUPERSEDED, EXPIRED, CANCELLED}),
    DENIED: frozenset({SUPERSEDED}),
    NOT_REQUIRED: frozenset(),
    CANCELLED: frozenset(),
    EXPIRED: frozenset(),
    SUPERSEDED: frozenset(),
}
assert set(_TRANSITIONS) == set(STATES)


def can_transition(current: str, target: str) -> bool:
    return target in _TRANSITIONS.get(current, frozenset())


def transition(current: str, target: str) -> str:
    """Return `target` when the move is legal, else raise `IllegalTransition`."""
    if not can_transition(current, target):
        raise IllegalTransition(current, target)
    return target


def is_final(state: str) -> bool:
    return state in FINAL


def is_open(state: str) -> bool:
    return state in _OPEN


def aggregate(review_actions: Iterable[str | None], info_request_open: bool = False) -> str:
    """Case state from the payer's per-line review actions (domain.md aggregation rule).

    `None` stands for a line without a review action yet. Client-cancelled lines must be
    left out by the caller.
    """
    actions = [a for a in review_actions]
    present = [a for a in actions if a]
    if "A4" in present:
        return INFO_REQUESTED if info_request_open else PENDED
    if "CT" in present:
        return CONTACT_PAYER
    if "A6" in present:
        return MODIFIED
    if "A2" in present or ("A1" in present and "A3" in present):
        return PARTIALLY_APPROVED
    if not present or len(present) < len(actions):
        return SUBMITTED
    kinds = set(present)
    if kinds == {"A1"}:
        return APPROVED
    if kinds == {"A3"}:
        return DENIED
    if kinds == {"NA"}:
        return NOT_REQUIRED
    if kinds == {"C"}:
        return CANCELLED
    if kinds <= {"A1", "NA"}:
        return APPROVED
    if kinds <= {"A3", "NA"}:
        return DENIED
    return SUBMITTED


#: case state → order status (api.md table under Cases); `None` means "unchanged / ignored".
ORDER_STATUS_BY_CASE = {
    NEEDS_INPUT: "awaiting_documentation",
    READY_TO_SUBMIT: "in_review",
    SUBMITTING: "in_review",
    SUBMITTED: "in_review",
    PENDED: "in_review",
    INFO_REQUESTED: "awaiting_documentation",
    APPROVED: "approved",
    PARTIALLY_APPROVED: "partially_approved",
    MODIFIED: "modified",
    DENIED: "denied",
    NOT_REQUIRED: "no_auth_required",
    REJECTED: "needs_attention",
    CONTACT_PAYER: "needs_attention",
    ERROR: "needs_attention",
    CANCELLED: "cancelled",
    EXPIRED: None,
    SUPERSEDED: None,
}

#: needs_attention reasons a case state raises by itself.
ATTENTION_BY_STATE = {
    REJECTED: "rejected",
    ERROR: "error",
    CONTACT_PAYER: "contact_payer",
    INFO_REQUESTED: "info_requested",
    DENIED: "denied_review",
    PARTIALLY_APPROVED: "denied_review",
}


def attention_for(state: str, review_actions: Iterable[str | None] = ()) -> str | None:
    """The needs_attention reason a freshly entered state raises, if any."""
    if state == PARTIALLY_APPROVED and "A3" not in set(review_actions):
        return None
    return ATTENTION_BY_STATE.get(state)


def order_status_from_cases(
    cases: Iterable[tuple[str, str, str | None]], current: str
) -> str:
    """Order status from its cases, newest last: (kind, state, prior_state_of_related).

    The newest non-superseded case decides, except that a denied extension leaves the order
    at the status of the authorization it tried to extend.
    """
    decided = current
    for kind, state, _ in cases:
        if state == SUPERSEDED:
            continue
        if kind == "extension" and state == DENIED:
            continue
        status = ORDER_STATUS_BY_CASE.get(state)
        if status is not None:
            decided = status
    return decided
