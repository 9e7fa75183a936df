"""Strict request-body JSON (api.md › Errors; reliability.md B1, B5, B6)."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authsvc.api.jsonbody import MAX_DEPTH, MalformedJSON, parse_json_object

ORDER = {
    "external_id": "EHR-ORD-1001",
    "urgency": "standard",
    "patient": {
        "mrn": "MRN-0001", "given_name": "Ana", "family_name": "Díaz",
        "birth_date": "1984-03-02", "sex": "female",
        "contacts": [{"role": "patient", "email": "ana@example.org", "channel": "email"}],
    },
    "coverage": {"payer_id": "demo", "member_id": "SIM-APPROVE-0001"},
    "requester": {"npi": "1234567893", "name": "Dr. Rivera"},
    "diagnoses": ["M54.50"],
    "lines": [{"sequence": 1, "code_system": "CPT", "code": "72148", "quantity": 1,
               "service_start": "2026-12-01", "service_end": "2026-12-31"}],
    "notes": "Low back pain 8 weeks, failed conservative therapy. " * 20,
}


def rejected(raw: bytes) -> str:
    with pytest.raises(MalformedJSON) as info:
        parse_json_object(raw)
    assert isinstance(info.value, ValueError)
    return info.value.message


def test_parses_an_order():
    raw = json.dumps(ORDER).encode()
    assert parse_json_object(raw) == ORDER


def test_accepts_bytearray_and_memoryview():
    assert parse_json_object(bytearray(b'{"a": 1}')) == {"a": 1}
    assert parse_json_object(memoryview(b'{"a": 1}')) == {"a": 1}


def test_refuses_str_as_a_programming_error():
    with pytest.raises(TypeError):
        parse_json_object('{"a": 1}')  # type: ignore[arg-type]


# --- B1: malformed, empty, null, not an object --------------------------------------

@pytest.mark.parametrize(
    "raw",
    [b"{bad", b"", b"   ", b"null", b"[]", b"[{}]", b'"x"', b"1", b"true", b"{}{}", b"{},",
     b'{"a":1,}', b"{'a':1}", b'{"a":01}', b'{"a":.5}', b'{"a":"\x01"}', b'{"a":"x\ny"}',
     b'{"a":1} x', b'{"a":tru}', b'{"a":"\\x41"}'],
)
def test_malformed_or_not_an_object(raw):
    rejected(raw)


def test_message_never_quotes_the_body():
    message = rejected(b'{"ssn": "123-45-6789", "name": Ana Diaz}')
    assert "123-45" not in message and "Ana" not in message and "Diaz" not in message
    message = rejected(b'{"ssn": "123-45-6789", "ssn": "987-65-4321"}')
    assert "123" not in message and "987" not in message


# --- B6: edge values ----------------------------------------------------------------

@pytest.mark.parametrize(
    "raw",
    [
        b'{"qty": NaN}', b'{"qty": Infinity}', b'{"qty": -Infinity}', b'{"a": [NaN]}',
        b'{"qty": 1e999}', b'{"qty": -1e999}',
        b'{"org_id": "A", "org_id": "B"}',
        b'{"a": {"b": 1, "b": 1}}',  # duplicates with equal values too, nested
        b'{"a": [{"x": 1, "x": 2}]}',
        b'{"a": "\\u0000"}', b'{"a": "x\\u0000y"}', b'{"\\u0000": 1}', b'{"a": ["\\u0000"]}',
        b'{"a": "\\ud800"}', b'{"a": "\\uDBFF"}', b'{"a": "\\udc00"}', b'{"a": "\\ud800x"}',
        b'{"a": "\\ud800\\ud800"}', b'{"\\ud800": 1}',
    ],
)
def test_edge_values_rejected(raw):
    rejected(raw)


def test_integer_digit_limit():
    assert parse_json_object(b'{"n": ' + b"9" * 4300 + b"}")["n"] == int("9" * 4300)
    assert parse_json_object(b'{"n": -' + b"9" * 4300 + b"}")["n"] == -int("9" * 4300)
    rejected(b'{"n": ' + b"1" * 4301 + b"}")
    rejected(b'{"n": ' + b"1" * 5000 + b"}")


def test_valid_escapes_still_accepted():
    value = parse_json_object(b'{"e": "\\ud83d\\ude00", "b": "\\\\u0000", "c": "\\u00e9"}')
    assert value == {"e": "😀", "b": "\\u0000", "c": "é"}


def test_small_and_negative_numbers_fine():
    assert parse_json_object(b'{"a": 1e-400, "b": -0, "c": 1.5E3}') == {"a": 0.0, "b": 0,
                                                                         "c": 1500.0}


# --- encodings ----------------------------------------------------------------------

@pytest.mark.parametrize(
    "raw",
    [b'\xff{"a": 1}', b'{"a": "\xc3"}', b'{"a": "\xed\xa0\x80"}',  # encoded surrogate
     '{"a": 1}'.encode("utf-16"), '{"a": 1}'.encode("utf-32"), b'\xef\xbb\xbf{"a": 1}',
     b'{"a": "\xc0\xaf"}'],  # overlong
)
def test_only_utf8_without_bom(raw):
    rejected(raw)


def test_utf8_text_accepted():
    assert parse_json_object('{"n": "Zoë 李 🙂"}'.encode()) == {"n": "Zoë 李 🙂"}


# --- B5: nesting --------------------------------------------------------------------

def nest(depth: int, open_: str = "[", close: str = "]") -> bytes:
    return ('{"a": ' + open_ * (depth - 1) + close * (depth - 1) + "}").encode()


def test_depth_32_accepted_33_rejected():
    assert parse_json_object(nest(MAX_DEPTH))
    assert "deeper" in rejected(nest(MAX_DEPTH + 1))
    objects = "".join('{"k":' for _ in range(MAX_DEPTH)) + "1" + "}" * MAX_DEPTH
    assert parse_json_object(objects.encode())
    rejected(("".join('{"k":' for _ in range(MAX_DEPTH + 1)) + "1" + "}" * (MAX_DEPTH + 1))
             .encode())


def test_brackets_inside_strings_do_not_count():
    raw = json.dumps({"a": "[" * 500 + "{" * 500, "b": '\\"[[[', "c": [[[]]]}).encode()
    assert parse_json_object(raw)["a"].startswith("[[")


@pytest.mark.parametrize("text", ["]]]]}}}}" * 10, "x\"]]]]}}}}" * 10])  # with and without \"
def test_depth_exact_when_strings_hold_brackets(text):
    def body(depth: int) -> bytes:
        inner = "[" * (depth - 1) + json.dumps(text) + "]" * (depth - 1)
        return ('{"s": ' + json.dumps(text) + ', "a": ' + inner + "}").encode()

    assert parse_json_object(body(MAX_DEPTH))
    rejected(body(MAX_DEPTH + 1))


def test_many_shallow_brackets_accepted():
    raw = json.dumps({"lines": [{"m": ["25"]} for _ in range(50)]}).encode()
    assert len(parse_json_object(raw)["lines"]) == 50


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b"{" * 100_000,
        b'{"a":' * 100_000,
        b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b"[{" * 50_000,
    ],
)
def test_deep_nesting_is_a_quick_400_not_a_recursion_error(raw):
    start = time.perf_counter()
    message = rejected(raw)
    assert time.perf_counter() - start < 0.5
    assert "deeper" in message or "not valid JSON" in message


@pytest.mark.parametrize(
    "raw",
    [
        b"[]" * 20 + b'"' + b'\\"' * 120_000,  # unterminated string after many brackets
        b"[" * 20 + b'"a",' * 60_000,
        (b"[" * 32 + b"]" * 32 + b",") * 3000,
    ],
)
def test_depth_scan_stays_linear_on_hostile_bodies(raw):
    start = time.perf_counter()
    rejected(raw)
    assert time.perf_counter() - start < 0.5


# --- speed --------------------------------------------------------------------------

def test_typical_body_is_fast():
    raw = json.dumps(ORDER, ensure_ascii=False).encode()
    assert 1500 < len(raw) < 4000
    for _ in range(50):
        parse_json_object(raw)
    runs = 2000
    start = time.perf_counter()
    for _ in range(runs):
        parse_json_object(raw)
    per_call = (time.perf_counter() - start) / runs
    assert per_call < 200e-6, per_call  # measured about 20 µs; json.loads alone about 10 µs


# --- properties ---------------------------------------------------------------------

@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_any_bytes_give_a_dict_or_malformed(raw):
    try:
        value = parse_json_object(raw)
    except MalformedJSON:
        return
    assert type(value) is dict


@given(st.text(max_size=200))
@settings(max_examples=300)
def test_any_text_gives_a_dict_or_malformed(text):
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
    try:
        assert type(parse_json_object(raw)) is dict
    except MalformedJSON:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children,
                                                                     max_size=4),
    max_leaves=20,
)


def _clean(value) -> bool:
    if isinstance(value, str):
        return "\x00" not in value and not any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, dict):
        return all(_clean(k) and _clean(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_clean(v) for v in value)
    return True


def _depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


@given(st.dictionaries(st.text(), json_values, max_size=6), st.booleans())
@settings(max_examples=300)
def test_round_trips_like_json_loads(obj, ascii_only):
    raw = json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    if _clean(obj) and _depth(obj) <= MAX_DEPTH:
        assert parse_json_object(raw) == json.loads(raw)
    else:
        rejected(raw)

