"""The body of ``POST /v1/orders`` (and of the coverage-requirements preview).

``load_order`` is the entry point: it returns clean Python values (dates as
``datetime.date``, every optional key present, None or ``[]`` when absent) or raises
``ValidationProblem`` listing every broken field. The Schema classes are exported for the
OpenAPI document; ``OrderSchema().load`` does the same checks except the payer list,
which only ``OrderSchema(known_payers=...)`` (or ``load_order``) knows.

Checks that need more than one field run at object level on the *original* data, so
list indexes in the error paths are the submitted ones: a line's code against its
``code_system``, ``service_end >= service_start``, unique ``sequence``, the contact's
address for its channel, ICD-10-CM existence on the earliest ``service_start``, and the
payer id.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Collection
from typing import Any

from marshmallow import ValidationError, validates_schema

from authsvc.adapters.codesets import icd10cm_status
from authsvc.domain import clock
from authsvc.domain.codes import (
    CPT_RE,
    HCPCS_RE,
    ICD10CM_RE,
    MODIFIER_RE,
    NPI_RE,
    icd10cm_format_ok,
    npi_check_digit_ok,
    procedure_code_format_ok,
)
from schemas.common import (
    Choice,
    Items,
    Msg,
    Object,
    Pattern,
    StrictDate,
    StrictInteger,
    StrictSchema,
    Text,
    ValidationProblem,
    fail,
    parse_date,
    problem_errors,
)

URGENCIES = ("standard", "expedited")
SEXES = ("female", "male", "other", "unknown")
CODE_SYSTEMS = ("CPT", "HCPCS")
CONTACT_ROLES = ("patient", "caregiver")
CHANNELS = ("email", "sms", "none")
LANGUAGES = ("en", "es")

MAX_DIAGNOSES = 12
MAX_LINES = 50
MAX_MODIFIERS = 4
MAX_CONTACTS = 10

# Service dates: none before ICD-10-CM took effect, none absurdly far ahead.
EARLIEST_SERVICE_DATE = dt.date(2015, 10, 1)
LATEST_SERVICE_DATE = dt.date(2099, 12, 31)
EARLIEST_BIRTH_DATE = dt.date(1900, 1, 1)

# Printable ASCII without surrounding spaces: identifiers are matched, never normalized.
IDENTIFIER_RE = re.compile(r"[\x21-\x7E](?:[\x20-\x7E]*[\x21-\x7E])?")
EMAIL_RE = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+"
)
PHONE_RE = re.compile(r"\+[1-9][0-9]{7,14}")  # E.164
PLACE_OF_SERVICE_RE = re.compile(r"[0-9]{2}")
PROCEDURE_CODE_RE = re.compile(f"(?:{CPT_RE.pattern}|{HCPCS_RE.pattern})")

_CPT_MESSAGE = "Must be a CPT code: 5 digits, or 4 digits and F, T, U or M."
_HCPCS_MESSAGE = "Must be a HCPCS Level II code: a letter A-V and 4 digits."


def _latest_birth_date() -> dt.date:
    # A day of slack: the birth date is local, "today" is UTC.
    return clock.now().date() + dt.timedelta(days=1)


def _npi_check(value: str) -> ValidationError | None:
    if npi_check_digit_ok(value):
        return None
    return fail("invalid_check_digit", "The NPI check digit is wrong.")


def _identifier(max_length: int, **kwargs: Any) -> Pattern:
    return Pattern(
        IDENTIFIER_RE,
        max_length=max_length,
        message="Must be printable ASCII without leading or trailing spaces.",
        **kwargs,
    )


def _npi(**kwargs: Any) -> Pattern:
    return Pattern(
        NPI_RE,
        message="Must be a 10-digit NPI starting with 1 or 2.",
        check=_npi_check,
        **kwargs,
    )


def _service_date(**kwargs: Any) -> StrictDate:
    return StrictDate(earliest=EARLIEST_SERVICE_DATE, latest=LATEST_SERVICE_DATE, **kwargs)


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


class ContactSchema(StrictSchema):
    """Someone to notify about the order; the channel's address must be given."""

    role = Choice(CONTACT_ROLES, required=True)
    name = Text(max_length=200)
    relationship = Text(max_length=50)
    email = Pattern(EMAIL_RE, max_length=254, message="Must be an email address.")
    phone = Pattern(PHONE_RE, message="Must be a phone number in E.164 form (+15555550101).")
    channel = Choice(CHANNELS, required=True)
    language = Choice(LANGUAGES)

    @validates_schema(pass_original=True, skip_on_field_errors=False)
    def _channel_has_address(self, data: dict, original: Any, **kwargs: Any) -> None:
        needed = {"email": "email", "sms": "phone"}.get(data.get("channel"))
        if needed and isinstance(original, dict) and _blank(original.get(needed)):
            raise ValidationError(
                Msg("required", f"Required when channel is {data['channel']}."), needed
            )


class PatientSchema(StrictSchema):
    mrn = _identifier(64, required=True)
    given_name = Text(max_length=100, required=True)
    family_name = Text(max_length=100, required=True)
    birth_date = StrictDate(
        earliest=EARLIEST_BIRTH_DATE, latest=_latest_birth_date, required=True
    )
    sex = Choice(SEXES, required=True)
    contacts = Items(Object(ContactSchema, required=True), max_items=MAX_CONTACTS)


class CoverageSchema(StrictSchema):
    payer_id = _identifier(64, required=True)
    member_id = _identifier(80, required=True)
    group_number = _identifier(50)


class ProviderSchema(StrictSchema):
    """The requesting or performing provider."""

    npi = _npi(required=True)
    name = Text(max_length=200)


class OrderLineSchema(StrictSchema):
    sequence = StrictInteger(minimum=1, maximum=999, required=True)
    code_system = Choice(CODE_SYSTEMS, required=True)
    code = Pattern(
        PROCEDURE_CODE_RE,
        message="Must be a CPT or HCPCS Level II code (modifiers go in modifiers).",
        required=True,
    )
    quantity = StrictInteger(minimum=1, maximum=999, required=True)
    modifiers = Items(
        Pattern(MODIFIER_RE, message="Must be 2 uppercase letters or digits.", required=True),
        max_items=MAX_MODIFIERS,
    )
    service_start = _service_date(required=True)
    service_end = _service_date()
    coverage_assertion_id = _identifier(128)

    @validates_schema(skip_on_field_errors=False)
    def _cross_fields(self, data: dict, **kwargs: Any) -> None:
        errors: dict[str, list[Msg]] = {}
        system, code = data.get("code_system"), data.get("code")
        if system and code and not procedure_code_format_ok(system, code):
            text = _CPT_MESSAGE if system == "CPT" else _HCPCS_MESSAGE
            errors["code"] = [Msg("invalid_format", text)]
        start, end = data.get("service_start"), data.get("service_end")
        if start and end and end < start:
            errors["service_end"] = [
                Msg("invalid_date_range", "Must be on or after service_start.")
            ]
        if errors:
            raise ValidationError(errors)


class OrderSchema(StrictSchema):
    """``POST /v1/orders``. ``known_payers=None`` skips the payer check (documents only)."""

    external_id = _identifier(128)
    urgency = Choice(URGENCIES, required=True)
    patient = Object(PatientSchema, required=True)
    coverage = Object(CoverageSchema, required=True)
    requester = Object(ProviderSchema, required=True)
    performer = Object(ProviderSchema)
    place_of_service = Pattern(PLACE_OF_SERVICE_RE, message="Must be a 2-digit CMS POS code.")
    diagnoses = Items(
        Pattern(
            ICD10CM_RE,
            message="Must be an ICD-10-CM code, dotted and uppercase (M54.50).",
            required=True,
        ),
        min_items=1,
        max_items=MAX_DIAGNOSES,
        required=True,
    )
    lines = Items(
        Object(OrderLineSchema, required=True),
        min_items=1,
        max_items=MAX_LINES,
        required=True,
    )
    notes = Text(max_length=2000, multiline=True)

    def __init__(self, *args: Any, known_payers: Collection[str] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.known_payers = None if known_payers is None else frozenset(known_payers)

    @validates_schema(pass_original=True, skip_on_field_errors=False)
    def _cross_fields(self, data: dict, original: Any, **kwargs: Any) -> None:
        if not isinstance(original, dict):
            return
        errors: dict[str, Any] = {}
        lines = original.get("lines")
        lines = lines if isinstance(lines, list) and len(lines) <= MAX_LINES else []

        duplicates = _duplicate_sequences(lines)
        if duplicates:
            message = Msg("invalid_format", "Must be unique within the order.")
            errors["lines"] = {i: {"sequence": [message]} for i in duplicates}

        diagnoses = original.get("diagnoses")
        if isinstance(diagnoses, list) and len(diagnoses) <= MAX_DIAGNOSES:
            on = _earliest_service_start(lines)
            found = {}
            for i, code in enumerate(diagnoses):
                if icd10cm_format_ok(code):
                    status = icd10cm_status(code, on)
                    if status == "unknown_code":
                        found[i] = [Msg("unknown_code", _UNKNOWN_DX)]
                    elif status == "not_billable":
                        found[i] = [Msg("not_billable", _NOT_BILLABLE_DX)]
            if found:
                errors["diagnoses"] = found

        coverage = original.get("coverage")
        if self.known_payers is not None and isinstance(coverage, dict):
            payer_id = coverage.get("payer_id")
            if (
                isinstance(payer_id, str)
                and payer_id not in self.known_payers
                and IDENTIFIER_RE.fullmatch(payer_id)
                and len(payer_id) <= 64
            ):
                errors["coverage"] = {"payer_id": [Msg("unknown_code", "Unknown payer.")]}
        if errors:
            raise ValidationError(errors)


_UNKNOWN_DX = "Not an ICD-10-CM code valid on the date of service."
_NOT_BILLABLE_DX = "An ICD-10-CM category, not a billable code: use a more specific one."


def _duplicate_sequences(lines: list) -> list[int]:
    """Indexes of lines whose valid ``sequence`` an earlier line already used."""
    seen: set[int] = set()
    duplicates = []
    for i, line in enumerate(lines):
        seq = line.get("sequence") if isinstance(line, dict) else None
        if type(seq) is int and 1 <= seq <= 999:
            if seq in seen:
                duplicates.append(i)
            seen.add(seq)
    return duplicates


def _earliest_service_start(lines: list) -> dt.date | None:
    """The date the diagnoses are checked on; None (newest code set) when no line has one."""
    days = [
        day
        for line in lines
        if isinstance(line, dict)
        and (day := parse_date(line.get("service_start"))) is not None
        and EARLIEST_SERVICE_DATE <= day <= LATEST_SERVICE_DATE
    ]
    return min(days, default=None)


@functools.lru_cache(maxsize=8)
def _schema_for(known_payers: frozenset[str]) -> OrderSchema:
    return OrderSchema(known_payers=known_payers)


def load_order(data: Any, known_payers: Collection[str]) -> dict[str, Any]:
    """Validate a parsed order body; clean values or ``ValidationProblem`` with every error.

    ``known_payers`` are the payer ids of the payers file; another ``coverage.payer_id``
    is ``unknown_code``. Schemas are cached per payer set (reloads are rare).
    """
    schema = _schema_for(frozenset(known_payers))
    try:
        return schema.load(data)
    except ValidationError as exc:
        raise ValidationProblem(problem_errors(exc.messages)) from None
