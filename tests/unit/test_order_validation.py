"""``POST /v1/orders`` body validation (api.md › Orders and Errors; reliability.md B3–B12)."""

from __future__ import annotations

import copy
import datetime as dt
import json
import time
import unicodedata

import pytest
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authsvc.adapters import codesets
from authsvc.domain import clock
from schemas.common import ERROR_CODES, MAX_ERRORS, ValidationProblem
from schemas.orders import (
    ContactSchema,
    CoverageSchema,
    OrderLineSchema,
    OrderSchema,
    PatientSchema,
    ProviderSchema,
    load_order,
)

PAYERS = frozenset({"demo", "acme"})

ORDER = {
    "external_id": "EHR-ORD-1001",
    "urgency": "standard",
    "patient": {
        "mrn": "MRN-0001", "given_name": "Ana", "family_name": "Diaz",
        "birth_date": "1984-03-02", "sex": "female",
        "contacts": [
            {"role": "patient", "email": "ana@example.org", "phone": "+15555550101",
             "channel": "sms", "language": "es"},
            {"role": "caregiver", "name": "Luis Diaz", "relationship": "spouse",
             "email": "luis@example.org", "channel": "email", "language": "en"},
        ],
    },
    "coverage": {"payer_id": "demo", "member_id": "SIM-APPROVE-0001", "group_number": "G-100"},
    "requester": {"npi": "1234567893", "name": "Dr. Rivera"},
    "performer": {"npi": "1003000126", "name": "Valley Imaging"},
    "place_of_service": "22",
    "diagnoses": ["M54.50"],
    "lines": [
        {"sequence": 1, "code_system": "CPT", "code": "72148", "quantity": 1,
         "service_start": "2026-12-01", "service_end": "2026-12-31"},
    ],
    "notes": "Low back pain 8 weeks, failed conservative therapy.",
}


def order(**changes) -> dict:
    data = copy.deepcopy(ORDER)
    data.update(copy.deepcopy(changes))
    return data


def set_path(data: dict, path: str, value) -> dict:
    """Set ``a.b[0].c`` in data (``value is DELETE`` removes the key)."""
    keys = _split(path)
    node = data
    for key in keys[:-1]:
        node = node[key]
    if value is DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return data


def _split(path: str) -> list:
    keys: list = []
    for part in path.split("."):
        name, *indexes = part.split("[")
        if name:
            keys.append(name)
        keys.extend(int(i.rstrip("]")) for i in indexes)
    return keys


DELETE = object()


def with_(path: str, value) -> dict:
    return set_path(order(), path, value)


def problems(data, known_payers=PAYERS) -> list[dict]:
    with pytest.raises(ValidationProblem) as info:
        load_order(data, known_payers)
    errors = info.value.errors
    for error in errors:
        assert set(error) == {"field", "code", "message"}
        assert error["code"] in ERROR_CODES
    return errors


def pairs(data, known_payers=PAYERS) -> list[tuple[str, str]]:
    return [(e["field"], e["code"]) for e in problems(data, known_payers)]


def only(data) -> tuple[str, str]:
    found = pairs(data)
    assert len(found) == 1, found
    return found[0]


# --- the valid order ----------------------------------------------------------------

def test_valid_order_loads_to_clean_values():
    result = load_order(order(), PAYERS)
    assert result["patient"]["birth_date"] == dt.date(1984, 3, 2)
    line = result["lines"][0]
    assert line["service_start"] == dt.date(2026, 12, 1)
    assert line["service_end"] == dt.date(2026, 12, 31)
    assert line["modifiers"] == [] and line["coverage_assertion_id"] is None
    assert result["patient"]["contacts"][0]["name"] is None
    assert result["diagnoses"] == ["M54.50"]
    assert result["coverage"] == ORDER["coverage"]


def test_minimal_order_gets_every_optional_key():
    data = order()
    for key in ("external_id", "performer", "place_of_service", "notes"):
        del data[key]
    del data["patient"]["contacts"]
    del data["coverage"]["group_number"]
    del data["requester"]["name"]
    del data["lines"][0]["service_end"]
    result = load_order(data, PAYERS)
    assert result["external_id"] is None and result["performer"] is None
    assert result["notes"] is None and result["place_of_service"] is None
    assert result["patient"]["contacts"] == []
    assert result["coverage"]["group_number"] is None
    assert result["lines"][0]["service_end"] is None


def test_optional_fields_accept_null():
    data = order(performer=None, notes=None, place_of_service=None, external_id=None)
    data["lines"][0].update(modifiers=None, service_end=None, coverage_assertion_id=None)
    data["patient"]["contacts"] = None
    result = load_order(data, PAYERS)
    assert result["lines"][0]["modifiers"] == []
    assert result["patient"]["contacts"] == []


def test_full_line_with_modifiers_and_assertion():
    data = order()
    data["lines"][0].update(modifiers=["26", "RT"], coverage_assertion_id="ca-123")
    line = load_order(data, PAYERS)["lines"][0]
    assert line["modifiers"] == ["26", "RT"] and line["coverage_assertion_id"] == "ca-123"


def test_known_payers_any_collection():
    assert load_order(order(), ["demo"])["coverage"]["payer_id"] == "demo"
    assert load_order(order(), {"demo"})["coverage"]["payer_id"] == "demo"


# --- B3: wrong types ----------------------------------------------------------------

@pytest.mark.parametrize(
    "path,value",
    [
        ("requester.npi", 1234567893),  # NPI as a number
        ("patient.birth_date", 19010203),  # DOB as a number
        ("diagnoses", "M54.50"),  # a string where an array goes
        ("lines[0].quantity", "1"),
        ("lines[0].quantity", True),  # bool is an int in Python: still refused
        ("lines[0].quantity", 1.0),
        ("lines[0].quantity", 1.5),
        ("lines[0].sequence", False),
        ("lines[0].quantity", None),
        ("urgency", None),  # null for a required field
        ("urgency", 1),
        ("patient", None),
        ("patient", []),
        ("patient", "Ana Diaz"),
        ("coverage", "demo"),
        ("lines", {"sequence": 1}),
        ("lines[0]", "72148"),
        ("lines[0]", None),
        ("patient.contacts", {"role": "patient"}),
        ("patient.contacts[0]", ["sms"]),
        ("lines[0].modifiers", "25"),
        ("lines[0].service_start", 20261201),
        ("lines[0].code", 72148),
        ("diagnoses[0]", None),
        ("diagnoses[0]", ["M54.50"]),
        ("notes", 5),
        ("patient.given_name", {"first": "Ana"}),
        ("place_of_service", 22),
        ("performer", "Valley Imaging"),
        ("coverage.member_id", None),
        ("patient.sex", True),
    ],
)
def test_wrong_json_type_is_invalid_type(path, value):
    assert only(with_(path, value)) == (path, "invalid_type")


def test_wrong_type_inside_an_array_names_the_index():
    assert only(with_("lines[0].modifiers", ["25", 26])) == ("lines[0].modifiers[1]",
                                                            "invalid_type")


def test_no_boolean_fields_so_true_as_string_is_a_choice_error():
    # The order body has no boolean; "true" where an enum goes is just a wrong choice.
    assert only(with_("urgency", "true")) == ("urgency", "invalid_choice")


def test_top_level_not_an_object():
    assert pairs([]) == [("", "invalid_type")]
    assert pairs("order") == [("", "invalid_type")]
    assert pairs(None) == [("", "invalid_type")]


# --- missing and blank --------------------------------------------------------------

REQUIRED_PATHS = [
    "urgency", "patient", "coverage", "requester", "diagnoses", "lines",
    "patient.mrn", "patient.given_name", "patient.family_name", "patient.birth_date",
    "patient.sex", "patient.contacts[0].role", "patient.contacts[0].channel",
    "coverage.payer_id", "coverage.member_id", "requester.npi", "performer.npi",
    "lines[0].sequence", "lines[0].code_system", "lines[0].code", "lines[0].quantity",
    "lines[0].service_start",
]


@pytest.mark.parametrize("path", REQUIRED_PATHS)
def test_missing_required_field(path):
    assert only(set_path(order(), path, DELETE)) == (path, "required")


def test_empty_body_lists_every_required_field():
    assert pairs({}) == [(f, "required") for f in
                         ["coverage", "diagnoses", "lines", "patient", "requester", "urgency"]]


@pytest.mark.parametrize("path", ["patient.given_name", "patient.family_name"])
@pytest.mark.parametrize("value", ["", "   ", "\u202e", "\u200e\u200f"])
def test_blank_required_text_is_required(path, value):
    assert only(with_(path, value)) == (path, "required")


def test_blank_optional_text_is_absent():
    data = order(notes="  ")
    data["requester"]["name"] = ""
    result = load_order(data, PAYERS)
    assert result["notes"] is None and result["requester"]["name"] is None


@pytest.mark.parametrize("path", ["patient.mrn", "coverage.member_id", "coverage.payer_id"])
def test_empty_identifier_is_invalid_format(path):
    assert only(with_(path, "")) == (path, "invalid_format")


# --- B4: sizes ----------------------------------------------------------------------

def test_thirteen_diagnoses_too_many():
    assert only(order(diagnoses=["M54.50"] * 13)) == ("diagnoses", "too_many")


def test_twelve_diagnoses_ok():
    assert len(load_order(order(diagnoses=["M54.50"] * 12), PAYERS)["diagnoses"]) == 12


def test_fifty_one_lines_too_many_fifty_ok():
    line = ORDER["lines"][0]
    fifty = [dict(line, sequence=i + 1) for i in range(50)]
    assert len(load_order(order(lines=fifty), PAYERS)["lines"]) == 50
    assert only(order(lines=[*fifty, dict(line, sequence=51)])) == ("lines", "too_many")


def test_huge_arrays_are_one_error_and_quick():
    start = time.perf_counter()
    found = pairs(order(diagnoses=["Q99.99"] * 10_000, lines=[{"bad": 1}] * 10_000))
    assert found == [("diagnoses", "too_many"), ("lines", "too_many")]
    assert time.perf_counter() - start < 0.1


def test_empty_arrays_too_few():
    assert pairs(order(diagnoses=[], lines=[])) == [("diagnoses", "too_few"), ("lines", "too_few")]


def test_too_many_modifiers_and_contacts():
    assert only(with_("lines[0].modifiers", ["25", "26", "59", "RT", "LT"])) == (
        "lines[0].modifiers", "too_many")
    contact = ORDER["patient"]["contacts"][1]
    assert only(with_("patient.contacts", [contact] * 11)) == ("patient.contacts", "too_many")


@pytest.mark.parametrize(
    "path,limit",
    [("patient.given_name", 100), ("patient.family_name", 100), ("requester.name", 200),
     ("patient.contacts[1].name", 200), ("patient.contacts[1].relationship", 50),
     ("notes", 2000)],
)
def test_text_length_limits(path, limit):
    assert load_order(with_(path, "a" * limit), PAYERS)
    assert only(with_(path, "a" * (limit + 1))) == (path, "out_of_range")


@pytest.mark.parametrize(
    "path,limit",
    [("patient.mrn", 64), ("coverage.member_id", 80), ("coverage.group_number", 50),
     ("external_id", 128), ("lines[0].coverage_assertion_id", 128)],
)
def test_identifier_length_limits(path, limit):
    assert load_order(with_(path, "A" * limit), PAYERS)
    assert only(with_(path, "A" * (limit + 1))) == (path, "out_of_range")


def test_one_megabyte_string_is_quick():
    start = time.perf_counter()
    assert only(with_("notes", "x" * 1_000_000)) == ("notes", "out_of_range")
    assert only(with_("patient.given_name", "é" * 1_000_000)) == ("patient.given_name",
                                                                   "out_of_range")
    assert time.perf_counter() - start < 0.5


# --- enums and ranges ---------------------------------------------------------------

@pytest.mark.parametrize(
    "path,value",
    [("urgency", "STANDARD"), ("urgency", "urgent"), ("patient.sex", "f"),
     ("patient.sex", "Female"), ("lines[0].code_system", "cpt"), ("lines[0].code_system", "ICD"),
     ("patient.contacts[0].role", "doctor"), ("patient.contacts[0].channel", "fax"),
     ("patient.contacts[0].language", "fr"), ("urgency", "")],
)
def test_invalid_choice(path, value):
    assert only(with_(path, value)) == (path, "invalid_choice")


@pytest.mark.parametrize("path", ["lines[0].quantity", "lines[0].sequence"])
@pytest.mark.parametrize("value", [0, -1, 1000, 10**100])
def test_integer_out_of_range(path, value):
    assert only(with_(path, value)) == (path, "out_of_range")


@pytest.mark.parametrize("value", [1, 999])
def test_integer_bounds_inclusive(value):
    data = order()
    data["lines"][0].update(quantity=value, sequence=value)
    assert load_order(data, PAYERS)["lines"][0]["quantity"] == value


# --- dates --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "value",
    ["2026-02-30", "2026-2-3", "20261201", "2026-12-01T00:00:00", "2026-12-01 ", "12/01/2026",
     "٢٠٢٦-١٢-٠١", "2026-W48-2", ""],
)
def test_date_format(value):
    assert only(with_("lines[0].service_start", value)) == ("lines[0].service_start",
                                                            "invalid_format")


def test_service_end_before_start():
    assert only(with_("lines[0].service_end", "2026-11-30")) == ("lines[0].service_end",
                                                                "invalid_date_range")
    assert load_order(with_("lines[0].service_end", "2026-12-01"), PAYERS)


@pytest.mark.parametrize("value", ["2015-09-30", "1999-01-01", "2100-01-01"])
def test_service_dates_out_of_range(value):
    data = order()
    data["lines"][0].update(service_start=value, service_end=None)
    assert only(data) == ("lines[0].service_start", "out_of_range")


def test_birth_date_not_in_the_future():
    previous = clock.install(clock.FixedClock(dt.datetime(2026, 11, 26, 12, tzinfo=dt.UTC)))
    try:
        assert load_order(with_("patient.birth_date", "2026-11-27"), PAYERS)  # a day of slack
        assert only(with_("patient.birth_date", "2026-11-28")) == ("patient.birth_date",
                                                                 "out_of_range")
        assert only(with_("patient.birth_date", "1899-12-31")) == ("patient.birth_date",
                                                                 "out_of_range")
    finally:
        clock.install(previous)


# --- B8 NPI, B9 formats, B11 homoglyphs ---------------------------------------------

@pytest.mark.parametrize("path", ["requester.npi", "performer.npi"])
def test_npi_bad_check_digit(path):
    assert only(with_(path, "1234567890")) == (path, "invalid_check_digit")


@pytest.mark.parametrize(
    "value",
    ["0234567893", "123456789", "12345678931", "١٢٣٤٥٦٧٨٩٣", "1234567893\n", " 1234567893",
     "１２３４５６７８９３"],
)
def test_npi_bad_format(value):
    assert only(with_("requester.npi", value)) == ("requester.npi", "invalid_format")


@pytest.mark.parametrize("npi", ["1234567893", "1993999998", "1245319599"])
def test_npi_valid_vectors(npi):
    assert load_order(with_("requester.npi", npi), PAYERS)["requester"]["npi"] == npi


@pytest.mark.parametrize(
    "code", ["e11.9", "E1.19", "E11.", "11.9", "S52.131AB", "J06.9 ", "E119", "Е11.9", "J06.9\n"]
)
def test_icd_bad_format(code):
    assert only(order(diagnoses=["M54.50", code])) == ("diagnoses[1]", "invalid_format")


@pytest.mark.parametrize("code", ["9921", "992133", "99213-25", "A4567", "99213\n", "٩٩٢١٣"])
def test_cpt_bad_format(code):
    assert only(with_("lines[0].code", code)) == ("lines[0].code", "invalid_format")


@pytest.mark.parametrize("code", ["W1234", "A04281", "a0428", "99213", "А0428"])  # last: Cyrillic
def test_hcpcs_bad_format(code):
    data = order()
    data["lines"][0].update(code_system="HCPCS", code=code)
    assert only(data) == ("lines[0].code", "invalid_format")


def test_hcpcs_code_under_cpt_is_invalid_format():
    assert only(with_("lines[0].code", "A0428")) == ("lines[0].code", "invalid_format")


@pytest.mark.parametrize("value", ["rt", "2", "255", "٢٥"])
def test_modifier_format(value):
    assert only(with_("lines[0].modifiers", ["25", value])) == ("lines[0].modifiers[1]",
                                                               "invalid_format")


@pytest.mark.parametrize("value", ["2", "222", "ab", "٢٢"])
def test_place_of_service_format(value):
    assert only(with_("place_of_service", value)) == ("place_of_service", "invalid_format")


@pytest.mark.parametrize(
    "path,value",
    [("patient.contacts[0].email", "not-an-email"), ("patient.contacts[0].email", "a@b"),
     ("patient.contacts[0].email", "ana@exämple.org"), ("patient.contacts[0].phone", "5555550101"),
     ("patient.contacts[0].phone", "+1 555 555 0101"), ("patient.mrn", "MRN 1\n"),
     ("patient.mrn", " MRN-1"), ("coverage.member_id", "SIM-ÄPPROVE")],
)
def test_other_formats(path, value):
    assert only(with_(path, value)) == (path, "invalid_format")


# --- B7 code table ------------------------------------------------------------------

def test_unknown_and_not_billable_diagnoses():
    found = pairs(order(diagnoses=["Q99.99", "E11", "M54.50", "J45.50", "J06.9", "E11.9"]))
    assert found == [("diagnoses[0]", "unknown_code"), ("diagnoses[1]", "not_billable")]


def test_cpt_99999_and_hcpcs_a9999_accepted():
    line = ORDER["lines"][0]
    lines = [dict(line, code="99999"), dict(line, sequence=2, code_system="HCPCS", code="A9999")]
    assert len(load_order(order(lines=lines), PAYERS)["lines"]) == 2


@pytest.fixture
def later_code_set_without_m5450():
    current = codesets.table_for(None)
    codesets.register_table(codesets.table_from_codes(
        (c for c in current.codes if c != "M5450"), version="icd10cm@2099-10-01",
        effective=dt.date(2099, 10, 1)))
    yield
    codesets.reset_tables()


def test_diagnoses_checked_on_the_earliest_service_start(later_code_set_without_m5450):
    line = ORDER["lines"][0]
    late = dict(line, service_start="2099-11-01", service_end="2099-11-30")
    early = dict(line, sequence=2, service_start="2099-09-01", service_end="2099-09-30")
    assert load_order(order(lines=[late, early]), PAYERS)
    assert only(order(lines=[late])) == ("diagnoses[0]", "unknown_code")
    # an unusable service_start is not used for the check; the valid one is
    bad = dict(early, service_start="2099-02-30")
    assert pairs(order(lines=[late, bad])) == [("diagnoses[0]", "unknown_code"),
                                                ("lines[1].service_start", "invalid_format")]


def test_unknown_payer():
    assert only(with_("coverage.payer_id", "nope")) == ("coverage.payer_id", "unknown_code")
    assert pairs(order(), known_payers=[]) == [("coverage.payer_id", "unknown_code")]
    assert load_order(with_("coverage.payer_id", "acme"), PAYERS)


def test_payer_with_bad_format_is_only_invalid_format():
    assert only(with_("coverage.payer_id", "de mo\n")) == ("coverage.payer_id", "invalid_format")


# --- B11 unicode in names -----------------------------------------------------------

def test_names_are_nfc_normalized():
    nfd = unicodedata.normalize("NFD", "José Núñez")
    assert nfd != "José Núñez"
    result = load_order(with_("patient.given_name", nfd), PAYERS)
    assert result["patient"]["given_name"] == "José Núñez"


@pytest.mark.parametrize(
    "control", ["\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068",
                "\u2069", "\u200e", "\u200f"],
)
def test_bidi_controls_stripped(control):
    result = load_order(with_("patient.family_name", f"{control}Diaz{control}z"), PAYERS)
    assert result["patient"]["family_name"] == "Diazz"


def test_bidi_stripped_in_notes_and_contact_names():
    data = order(notes="line one\n\u202etwo")
    data["patient"]["contacts"][1]["name"] = "Luis\u2067 Diaz"
    result = load_order(data, PAYERS)
    assert result["notes"] == "line one\ntwo"
    assert result["patient"]["contacts"][1]["name"] == "Luis Diaz"


@pytest.mark.parametrize("name", ["李小龍", "👩‍👩‍👧", "Zoë", "O'Brien-Smith", "Ana\u200dMaria"])
def test_names_accept_any_script(name):
    assert load_order(with_("patient.given_name", name), PAYERS)["patient"]["given_name"] == name


def test_length_counted_in_code_points_after_nfc():
    nfd = "e\u0301" * 100  # 200 code points, 100 after NFC
    assert load_order(with_("patient.given_name", nfd), PAYERS)
    assert only(with_("patient.given_name", "a" + "\u0301" * 1000)) == ("patient.given_name",
                                                                       "out_of_range")


@pytest.mark.parametrize("value", ["Ana\nDiaz", "Ana\rDiaz", "Ana\r\nX-Injected: 1", "Ana\tDiaz",
                                   "Ana\x1bDiaz", "Ana\u2028Diaz", "Ana\x85Diaz"])
def test_single_line_text_refuses_line_breaks_and_controls(value):
    assert only(with_("patient.given_name", value)) == ("patient.given_name", "invalid_format")


def test_notes_allow_line_breaks_but_not_other_controls():
    assert load_order(order(notes="a\r\nb\tc"), PAYERS)["notes"] == "a\r\nb\tc"
    assert only(order(notes="a\x07b")) == ("notes", "invalid_format")


@pytest.mark.parametrize(
    "value", ["' OR 1=1--", '"; DROP TABLE orders;--', "{{7*7}}", "${jndi:ldap://127.0.0.1/x}",
              "<script>alert(1)</script>", "%0d%0a", "../../etc/passwd"],
)
def test_injection_strings_kept_literally(value):
    assert load_order(order(notes=value), PAYERS)["notes"] == value
    assert load_order(with_("patient.family_name", value), PAYERS)["patient"]["family_name"] == (
        value)


def test_surrogates_refused_when_called_directly():
    assert only(with_("patient.given_name", "Ana\ud800")) == ("patient.given_name",
                                                             "invalid_format")


# --- B12 mass assignment ------------------------------------------------------------

def test_mass_assignment_fields_are_unknown():
    data = order(status="approved", org_id="org_other", id="ord_1", created_by="x", payer_ref="p")
    assert pairs(data) == [(f, "unknown_field") for f in
                           ["created_by", "id", "org_id", "payer_ref", "status"]]


@pytest.mark.parametrize(
    "path",
    ["patient.favorite_color", "coverage.org_id", "lines[0].status", "lines[0].determination",
     "requester.org_id", "performer.id", "patient.contacts[1].id"],
)
def test_unknown_field_at_every_level(path):
    assert only(with_(path, "x")) == (path, "unknown_field")


def test_unknown_key_names_are_cut_in_paths():
    found = pairs(order(**{"k" * 5000: 1}))
    assert found == [("k" * 64 + "…", "unknown_field")]


# --- every error at once ------------------------------------------------------------

def test_every_error_collected_with_exact_paths():
    data = order(status="approved", urgency="soon", diagnoses=["E11", "e11.9", "Q99.99"])
    data["patient"]["favorite_color"] = "blue"
    data["patient"]["contacts"][0].update(channel="email", email=None, language="de")
    data["coverage"]["payer_id"] = "nope"
    data["requester"]["npi"] = "1234567890"
    line = data["lines"][0]
    data["lines"].append(dict(line, code="99213-25", quantity=0, service_end="2026-11-01"))
    data["lines"].append(dict(line, sequence=3, code_system="HCPCS", code="W1234", extra=1))
    assert pairs(data) == [
        ("coverage.payer_id", "unknown_code"),
        ("diagnoses[0]", "not_billable"),
        ("diagnoses[1]", "invalid_format"),
        ("diagnoses[2]", "unknown_code"),
        ("lines[1].code", "invalid_format"),
        ("lines[1].quantity", "out_of_range"),
        ("lines[1].sequence", "invalid_format"),  # duplicate of lines[0]
        ("lines[1].service_end", "invalid_date_range"),
        ("lines[2].code", "invalid_format"),
        ("lines[2].extra", "unknown_field"),
        ("patient.contacts[0].email", "required"),
        ("patient.contacts[0].language", "invalid_choice"),
        ("patient.favorite_color", "unknown_field"),
        ("requester.npi", "invalid_check_digit"),
        ("status", "unknown_field"),
        ("urgency", "invalid_choice"),
    ]


def test_indexes_sort_numerically():
    diagnoses = ["M54.50"] * 12
    diagnoses[2] = diagnoses[10] = "bad"
    assert pairs(order(diagnoses=diagnoses)) == [("diagnoses[2]", "invalid_format"),
                                                 ("diagnoses[10]", "invalid_format")]


def test_duplicate_sequences_flag_the_later_lines():
    line = ORDER["lines"][0]
    lines = [line, dict(line, sequence=2), dict(line), dict(line, sequence=2)]
    assert pairs(order(lines=lines)) == [("lines[2].sequence", "invalid_format"),
                                         ("lines[3].sequence", "invalid_format")]


def test_channel_needs_its_address():
    assert only(set_path(order(), "patient.contacts[0].phone", DELETE)) == (
        "patient.contacts[0].phone", "required")
    assert only(set_path(order(), "patient.contacts[1].email", DELETE)) == (
        "patient.contacts[1].email", "required")
    data = order()
    data["patient"]["contacts"] = [{"role": "caregiver", "channel": "none"}]
    assert load_order(data, PAYERS)


def test_error_count_is_capped():
    data = order(**{f"extra_{i:03}": i for i in range(300)})
    assert len(problems(data)) == MAX_ERRORS


# --- PHI is never echoed ------------------------------------------------------------

def test_messages_never_contain_submitted_values():
    secret = "Zq7SECRET"
    data = order(urgency=secret, notes=secret * 1000, external_id=f"{secret}\n")
    data["patient"].update(mrn=f" {secret}", given_name=f"{secret}\n", sex=secret,
                           birth_date=secret, favorite=secret)
    data["coverage"].update(member_id=f"{secret} ", payer_id=secret)
    data["requester"]["npi"] = secret
    data["diagnoses"] = [secret, f"{secret}.1"]
    data["lines"][0].update(code=secret, code_system=secret, service_start=secret,
                            modifiers=[secret])
    errors = problems(data)
    assert len(errors) >= 14
    assert secret not in json.dumps(errors)
    assert secret.lower() not in json.dumps(errors).lower()


# --- schemas for the OpenAPI document -----------------------------------------------

def test_schemas_render_in_apispec():
    spec = APISpec(title="t", version="1", openapi_version="3.0.3",
                   plugins=[MarshmallowPlugin()])
    spec.components.schema("Order", schema=OrderSchema)
    schemas = spec.to_dict()["components"]["schemas"]
    order_doc = schemas["Order"]
    assert order_doc["additionalProperties"] is False
    assert set(order_doc["required"]) == {"urgency", "patient", "coverage", "requester",
                                          "diagnoses", "lines"}
    assert order_doc["properties"]["diagnoses"]["maxItems"] == 12
    assert order_doc["properties"]["lines"]["minItems"] == 1
    assert order_doc["properties"]["urgency"]["enum"] == ["standard", "expedited"]
    line = schemas["OrderLine"]["properties"]
    assert line["quantity"] == {"type": "integer", "minimum": 1, "maximum": 999}
    assert line["service_start"]["format"] == "date"
    assert schemas["Provider"]["properties"]["npi"]["pattern"] == "^[12][0-9]{9}$"
    assert schemas["Patient"]["properties"]["given_name"]["maxLength"] == 100
    for name in ("Patient", "Contact", "Coverage", "Provider", "OrderLine"):
        assert schemas[name]["additionalProperties"] is False


def test_schema_classes_exported_and_usable_directly():
    for cls in (OrderSchema, OrderLineSchema, PatientSchema, ContactSchema, CoverageSchema,
                ProviderSchema):
        assert cls().fields
    # Without known_payers the payer check is skipped (documents, previews in tests).
    assert OrderSchema().load(with_("coverage.payer_id", "anything"))["coverage"]
    assert OrderSchema(known_payers=["demo"]).load(order())


# --- speed --------------------------------------------------------------------------

def test_one_line_order_under_a_millisecond():
    codesets.warm()
    data = order()
    for _ in range(50):
        load_order(data, PAYERS)
    runs = 500
    start = time.perf_counter()
    for _ in range(runs):
        load_order(data, PAYERS)
    per_call = (time.perf_counter() - start) / runs
    assert per_call < 1e-3, per_call  # measured about 0.17 ms


# --- properties ---------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30) | st.sampled_from(["M54.50", "E11", "2026-12-01", "CPT", "1234567893"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10),
                                                                     children, max_size=4),
    max_leaves=12,
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


ORDER_PATHS = [p for p in _paths(ORDER) if p]


def _check_outcome(data) -> None:
    try:
        result = load_order(data, PAYERS)
    except ValidationProblem as exc:
        assert exc.errors
        for error in exc.errors:
            assert error["code"] in ERROR_CODES
            assert isinstance(error["field"], str) and isinstance(error["message"], str)
    else:
        assert isinstance(result, dict)


@given(json_values)
@settings(max_examples=200)
def test_any_json_value_gives_an_order_or_a_validation_problem(data):
    _check_outcome(data)


@given(st.lists(st.tuples(st.sampled_from(ORDER_PATHS), json_values | st.just(DELETE)),
                min_size=1, max_size=4))
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_orders_give_an_order_or_a_validation_problem(mutations):
    data = order()
    for path, value in mutations:
        node = data
        try:
            for key in path[:-1]:
                node = node[key]
            if value is DELETE:
                del node[path[-1]]
            else:
                node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    _check_outcome(data)


def _get(node, path):
    for key in path:
        node = node[key]
    return node


STRING_PATHS = [p for p in ORDER_PATHS if isinstance(_get(ORDER, p), str)]


@given(st.sampled_from(STRING_PATHS), st.text(max_size=300))
@settings(max_examples=400)
def test_random_strings_in_every_string_field(path, text):
    data = order()
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = text
    _check_outcome(data)
