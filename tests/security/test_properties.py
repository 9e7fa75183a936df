"""Property tests of the validators (B3, B6, B8, B9, B11): for any input they answer with a
decision or a typed validation error, never an exception, and never accept non-ASCII codes."""

from __future__ import annotations

import copy
import json
import re
import unicodedata

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authsvc.api.jsonbody import MalformedJSON, parse_json_object
from authsvc.domain import codes
from schemas.common import ValidationProblem
from schemas.orders import load_order
from tests.conftest import order_body

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
NPI = re.compile(r"[12][0-9]{9}")


def luhn_80840(npi: str) -> bool:
    digits = [int(c) for c in "80840" + npi]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d *= 2
            d = d - 9 if d > 9 else d
        total += d
    return total % 10 == 0


@FAST
@given(st.text(max_size=14))
def test_B8_property_npi_valid_iff_ascii_format_and_luhn(s):
    expected = NPI.fullmatch(s) is not None and luhn_80840(s)
    assert codes.npi_valid(s) == expected


@FAST
@given(st.text(alphabet=st.characters(categories=["Nd"]), min_size=10, max_size=10))
def test_B8_property_non_ascii_digits_never_pass(s):
    if not s.isascii():
        assert not codes.npi_valid(s)
        assert not codes.icd10cm_format_ok(s[:3])
        assert not codes.cpt_format_ok(s[:5])


@FAST
@given(st.text(max_size=10))
def test_B9_property_code_formats_are_ascii_fullmatch(s):
    for check in (codes.icd10cm_format_ok, codes.cpt_format_ok, codes.hcpcs_format_ok):
        if check(s):
            assert s.isascii() and s == s.strip() and s.upper() == s and "\n" not in s


@FAST
@given(st.binary(max_size=400))
def test_B6_property_any_bytes_parse_or_are_malformed(raw):
    try:
        value = parse_json_object(raw)
    except MalformedJSON as exc:
        assert raw.decode("latin-1")[:40] not in exc.message or len(raw) < 3
        return
    assert isinstance(value, dict)


SAFE_TEXT = st.text(alphabet=st.characters(blacklist_categories=["Cs"],
                                          blacklist_characters="\x00"), max_size=12)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | SAFE_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(SAFE_TEXT, inner, max_size=4),
    max_leaves=20)


@FAST
@given(st.dictionaries(SAFE_TEXT, JSON_VALUES, max_size=5))
def test_B6_property_clean_objects_round_trip(obj):
    assert parse_json_object(json.dumps(obj).encode()) == json.loads(json.dumps(obj))


PATHS = [("patient", "given_name"), ("patient", "birth_date"), ("requester", "npi"),
         ("coverage", "member_id"), ("lines", 0, "code"), ("lines", 0, "quantity"),
         ("diagnoses", 0), ("urgency",), ("place_of_service",), ("patient", "mrn")]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PATHS), JSON_VALUES)
def test_B3_property_any_value_anywhere_is_accepted_or_a_422_naming_fields(path, value):
    body = copy.deepcopy(order_body())
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    try:
        load_order(body, {"demo"})
    except ValidationProblem as exc:
        assert exc.errors and all(e["field"] and e["code"] for e in exc.errors)


@FAST
@given(st.text(min_size=1, max_size=60))
def test_B11_property_accepted_names_are_nfc_without_bidi_controls(name):
    body = copy.deepcopy(order_body())
    body["patient"]["given_name"] = name
    try:
        clean = load_order(body, {"demo"})
    except ValidationProblem:
        return
    got = clean["patient"]["given_name"]
    assert unicodedata.is_normalized("NFC", got)
    assert not set(got) & {"\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066",
                           "\u2067", "\u2068", "\u2069", "\u200e", "\u200f"}
    assert "\n" not in got and "\r" not in got and len(got) <= 100
