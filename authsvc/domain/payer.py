"""What we send to payers and what they answer, independent of the wire protocol.

The PAS/FHIR adapter (authsvc/adapters/payers) maps these to and from Da Vinci PAS 2.2.1
Bundles; a clearinghouse or X12 adapter would map the same objects. Field names follow the
X12 278 / PAS vocabulary (review action = HCR01, reason = 886, AAA = 901/889).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Protocol

# ---------------------------------------------------------------- outbound (our request)


@dataclasses.dataclass(frozen=True)
class Party:
    npi: str
    name: str | None = None


@dataclasses.dataclass(frozen=True)
class PatientInfo:
    mrn: str
    given_name: str
    family_name: str
    birth_date: dt.date
    sex: str  # female|male|other|unknown


@dataclasses.dataclass(frozen=True)
class CoverageInfo:
    payer_id: str
    member_id: str
    group_number: str | None = None


@dataclasses.dataclass(frozen=True)
class ClaimLine:
    sequence: int
    code_system: str  # CPT|HCPCS
    code: str
    quantity: int
    service_start: dt.date
    service_end: dt.date | None = None
    change_flag: str | None = None  # PAS infoChanged: added|changed
    cancelled: bool = False


@dataclasses.dataclass(frozen=True)
class Attachment:
    """A document sent to the payer as Claim.supportingInfo (base64 in the Bundle)."""

    attachment_id: str
    content_type: str
    title: str
    data: bytes
    loinc: str | None = None  # e.g. 18748-4 when answering an info request


@dataclasses.dataclass(frozen=True)
class ClaimRequest:
    """One PAS request: initial submit, update, cancel, extension or appeal.

    `claim_identifier` is our case id; it never changes across retries and is the payer's
    idempotency key.
    """

    claim_identifier: str
    certification_type: str  # UM02: I initial, 3 cancel, 4 extension, 1/2 appeal, S revised
    urgency: str  # standard|expedited -> UM06 E|U
    patient: PatientInfo
    coverage: CoverageInfo
    requester: Party
    performer: Party | None
    diagnoses: tuple[str, ...]
    place_of_service: str | None
    lines: tuple[ClaimLine, ...]
    attachments: tuple[Attachment, ...] = ()
    related_claim_identifier: str | None = None
    level_of_care: str | None = None
    created_at: dt.datetime | None = None
    note: str | None = None  # free text for the payer's reviewer (an appeal's reason)


@dataclasses.dataclass(frozen=True)
class EligibilityRequest:
    request_id: str  # our eligibility check id (trace number)
    patient: PatientInfo
    coverage: CoverageInfo
    requester: Party
    date_of_service: dt.date
    codes: tuple[tuple[str, str], ...] = ()  # (code_system, code)


# ---------------------------------------------------------------- inbound (payer's answer)


@dataclasses.dataclass(frozen=True)
class DenialReason:
    code: str | None
    text: str | None


@dataclasses.dataclass(frozen=True)
class LineDecision:
    """The payer's answer for one item, keyed by item sequence (PAS spec-34)."""

    sequence: int
    review_action: str | None  # HCR01: A1 A2 A3 A4 A6 C CT NA
    auth_number: str | None = None
    authorized_quantity: int | None = None
    authorized_code: str | None = None
    valid_from: dt.date | None = None
    valid_to: dt.date | None = None
    denial_reason: DenialReason | None = None
    administration_ref: str | None = None


@dataclasses.dataclass(frozen=True)
class PayerError:
    """An AAA error of a rejected request (X12 901 code, 889 follow-up)."""

    code: str | None
    followup: str | None = None
    element: str | None = None
    path: str | None = None
    message: str | None = None


@dataclasses.dataclass(frozen=True)
class InfoRequest:
    """The payer asks for documentation (Task / CommunicationRequest, LOINC codes)."""

    codes: tuple[str, ...]
    text: str | None = None


@dataclasses.dataclass(frozen=True)
class PayerAnswer:
    """A parsed ClaimResponse (from $submit, $inquire or a notification)."""

    outcome: str  # complete|partial|error
    lines: tuple[LineDecision, ...] = ()
    errors: tuple[PayerError, ...] = ()
    info_request: InfoRequest | None = None
    claim_identifier: str | None = None  # our case id, echoed by the payer
    payer_ref: str | None = None  # ClaimResponse.preAuthRef / id
    event_number: int | None = None  # notification-event.event-number
    last_updated: dt.datetime | None = None  # ClaimResponse meta.lastUpdated / created

    @property
    def rejected(self) -> bool:
        return self.outcome == "error" or bool(self.errors)


@dataclasses.dataclass(frozen=True)
class EligibilityAnswer:
    status: str  # active|inactive|member_not_found|error
    plan_name: str | None = None
    auth_required: bool | None = None  # EB11-like hint; a payer rule overrides it
    errors: tuple[PayerError, ...] = ()


# ---------------------------------------------------------------- exchanges and failures


@dataclasses.dataclass
class ExchangeRecord:
    """One HTTP round trip with a payer, kept immutable in `payer_exchanges`."""

    kind: str  # submit|update|cancel|inquire|eligibility|subscription|notification
    direction: str  # out|in
    url: str
    http_status: int | None
    started_at: dt.datetime
    finished_at: dt.datetime | None
    request_body: str | None
    response_body: str | None
    error: str | None = None


class PayerFailure(Exception):
    """Base of every payer failure; names what the caller does next."""

    retryable = False

    def __init__(self, message: str, http_status: int | None = None):
        super().__init__(message)
        self.http_status = http_status


class PayerUnavailable(PayerFailure):
    """5xx, 429, connection refused: nothing was accepted; retry later (same identifier)."""

    retryable = True

    def __init__(self, message: str, http_status: int | None = None,
                 retry_after: float | None = None):
        super().__init__(message, http_status)
        self.retry_after = retry_after


class PayerOutcomeUnknown(PayerFailure):
    """The request may have reached the payer but no answer came (timeout, reset, garbage).

    The caller marks the case `submission_unknown` and `$inquire`s before sending again.
    """

    retryable = True


class PayerRejected(PayerFailure):
    """HTTP 4xx with an OperationOutcome: not recoverable by resending the same request."""

    def __init__(self, message: str, http_status: int | None = None,
                 errors: tuple[PayerError, ...] = ()):
        super().__init__(message, http_status)
        self.errors = errors


class PayerAdapter(Protocol):
    """What the service layer needs from a payer, whatever the protocol."""

    def check_eligibility(self, request: EligibilityRequest) -> EligibilityAnswer: ...

    def submit(self, claim: ClaimRequest) -> PayerAnswer: ...

    def inquire(self, claim: ClaimRequest) -> PayerAnswer | None:
        """The payer's current answer for our Claim.identifier, or None if it has none."""
        ...

    def update(self, claim: ClaimRequest) -> PayerAnswer: ...

    def cancel(self, claim: ClaimRequest) -> PayerAnswer: ...

    def register_subscription(self, callback_url: str) -> str: ...

    def parse_notification(self, body: bytes) -> PayerAnswer: ...
