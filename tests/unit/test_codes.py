"""Identifier formats (reliability.md §5 test vectors) and the ICD-10-CM code table."""

from __future__ import annotations

import datetime as dt
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authsvc.adapters import codesets
from authsvc.domain.codes import (
    CPT_PATTERN,
    ICD10CM_RE,
    cpt_format_ok,
    hcpcs_format_ok,
    icd10cm_format_ok,
    modifier_format_ok,
    npi_format_ok,
    npi_valid,
    procedure_code_format_ok,
)

# --- NPI (§5.1, B8) -----------------------------------------------------------------

VALID_NPIS = ["1234567893", "1993999998", "1245319599"]
INVALID_NPIS = [
    "1234567890",  # bad check digit
    "0234567893",  # must start with 1 or 2
    "123456789",  # 9 digits
    "12345678931",  # 11 digits
    "١٢٣٤٥٦٧٨٩٣",  # Arabic-Indic digits: \d and int() accept them
    "1234567893\n",  # $ would accept the trailing newline
    " 1234567893",
    "1234567893 ",
    "１２３４５６７８９３",  # full-width digits
    "",
    "12345678a3",
]


@pytest.mark.parametrize("npi", VALID_NPIS)
def test_npi_valid_vectors(npi):
    assert npi_valid(npi)


@pytest.mark.parametrize("npi", INVALID_NPIS)
def test_npi_invalid_vectors(npi):
    assert not npi_valid(npi)


def test_npi_format_separate_from_check_digit():
    assert npi_format_ok("1234567890") and not npi_valid("1234567890")
    assert not npi_format_ok("0234567893")


@pytest.mark.parametrize("value", [None, 1234567893, b"1234567893", ["1234567893"]])
def test_npi_non_strings_are_invalid_not_errors(value):
    assert not npi_valid(value)


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


@given(st.from_regex(r"[12][0-9]{9}", fullmatch=True))
def test_npi_constant_24_equals_luhn_with_80840_prefix(npi):
    assert npi_valid(npi) == _luhn_ok("80840" + npi)


def test_every_npi_base_has_exactly_one_check_digit():
    base = "123456789"
    assert [d for d in "0123456789" if npi_valid(base + d)] == ["3"]


# --- ICD-10-CM format (§5.2, B9, B11) -----------------------------------------------

ICD_PASS = ["A00", "J06.9", "S52.131A", "T36.0X1A", "C4A.0", "Z3A.20", "M1A.00X0", "U07.1",
            "M54.50", "E11", "Q99.99"]
ICD_FAIL = ["E11.", "E1.1", "E1.19", "11.1", "11.9", "e11.9", "S52.131AB", "A0", "J06.9 ",
            "E119", "Е11.9",  # Cyrillic Е
            "J06.9\n", " J06.9", "m54.50", "", "E11.9.1", "M5٤.50"]


@pytest.mark.parametrize("code", ICD_PASS)
def test_icd10cm_format_pass(code):
    assert icd10cm_format_ok(code)


@pytest.mark.parametrize("code", ICD_FAIL)
def test_icd10cm_format_fail(code):
    assert not icd10cm_format_ok(code)


def test_patterns_are_ascii_and_unanchored_for_fullmatch():
    assert ICD10CM_RE.fullmatch("J06.9") and not ICD10CM_RE.fullmatch("J06.9\n")
    assert CPT_PATTERN.startswith("^") and CPT_PATTERN.endswith("$")


# --- CPT and HCPCS (§5.3, §5.4, B9) -------------------------------------------------

@pytest.mark.parametrize("code", ["99213", "0001F", "0075T", "0001U", "0002M", "99999", "72148"])
def test_cpt_pass(code):
    assert cpt_format_ok(code)
    assert procedure_code_format_ok("CPT", code)


@pytest.mark.parametrize(
    "code", ["9921", "992133", "A4567", "99213-25", "99213\n", "٩٩٢١٣", "0001f", "0001X", "9921 "]
)
def test_cpt_fail(code):
    assert not cpt_format_ok(code)


@pytest.mark.parametrize("code", ["A0428", "E0114", "J1885", "A9999", "V5299"])
def test_hcpcs_pass(code):
    assert hcpcs_format_ok(code)
    assert procedure_code_format_ok("HCPCS", code)


@pytest.mark.parametrize("code", ["W1234", "A04281", "a0428", "A042", "Z1234", "А0428", "A0428\n"])
def test_hcpcs_fail(code):
    assert not hcpcs_format_ok(code)


def test_procedure_code_checked_against_its_own_system():
    assert not procedure_code_format_ok("CPT", "A0428")
    assert not procedure_code_format_ok("HCPCS", "99213")
    assert not procedure_code_format_ok("ICD", "99213")


@pytest.mark.parametrize("mod,ok", [("25", True), ("RT", True), ("59", True), ("2", False),
                                    ("rt", False), ("255", False), ("2\n", False)])
def test_modifier_format(mod, ok):
    assert modifier_format_ok(mod) is ok


# --- ICD-10-CM code table (B7) ------------------------------------------------------

@pytest.mark.parametrize(
    "code,status",
    [
        ("M54.50", "ok"), ("J45.50", "ok"), ("J06.9", "ok"), ("E11.9", "ok"), ("A09", "ok"),
        ("U07.1", "ok"), ("S52.131A", "ok"),
        ("Q99.99", "unknown_code"), ("E11", "not_billable"), ("M54.5", "not_billable"),
        ("S52.131", "not_billable"),  # needs its 7th character
        ("e11.9", "unknown_code"), ("E11.", "unknown_code"), ("E1.19", "unknown_code"),
        ("", "unknown_code"), ("A00-A09", "unknown_code"), ("1", "unknown_code"),
    ],
)
def test_icd10cm_status(code, status):
    assert codesets.icd10cm_status(code, dt.date(2026, 12, 1)) == status


def test_icd10cm_status_takes_undotted_form_too():
    assert codesets.icd10cm_status("M5450") == "ok"
    assert codesets.icd10cm_status("E11") == "not_billable"


def test_icd10cm_version_names_the_shipped_code_set():
    assert codesets.ICD10CM_VERSION.startswith("icd10cm@")
    assert codesets.table_for(None).version == codesets.ICD10CM_VERSION
    dt.date.fromisoformat(codesets.ICD10CM_VERSION.split("@")[1])


@pytest.fixture
def restore_tables():
    yield
    codesets.reset_tables()


def test_code_retired_before_the_date_of_service_is_unknown(restore_tables):
    current = codesets.table_for(None)
    next_year = codesets.table_from_codes(
        (c for c in current.codes if c != "M5450"),
        version="icd10cm@2099-10-01",
        effective=dt.date(2099, 10, 1),
    )
    codesets.register_table(next_year)
    assert codesets.icd10cm_status("M54.50", dt.date(2099, 9, 30)) == "ok"
    assert codesets.icd10cm_status("M54.50", dt.date(2099, 10, 1)) == "unknown_code"
    assert codesets.icd10cm_status("M54.50", None) == "unknown_code"  # newest set
    assert codesets.icd10cm_status("M54.59", dt.date(2099, 10, 1)) == "ok"


def test_dates_before_the_oldest_table_use_it():
    assert codesets.icd10cm_status("M54.50", dt.date(2016, 1, 1)) == "ok"


def test_table_from_codes_billable_means_leaf():
    table = codesets.table_from_codes(
        ["A00-A09", "A00", "A000", "A001", "A01", "1"], version="t", effective=dt.date(2020, 1, 1)
    )
    assert table.codes == {"A00", "A000", "A001", "A01"}
    assert table.billable == {"A000", "A001", "A01"}


def test_table_matches_the_package_api():
    """The table built from the packaged code list equals simple_icd_10_cm's own answers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import simple_icd_10_cm as icd

    codes = [c for c in icd.get_all_codes(True) if codesets._undotted(c) is not None]
    table = codesets.table_for(None)
    assert {codesets._undotted(c) for c in codes} == table.codes
    assert {codesets._undotted(c) for c in codes if icd.is_leaf(c)} == table.billable
    assert len(table.billable) > 70_000


def test_status_lookup_is_fast():
    import time

    codesets.warm()
    start = time.perf_counter()
    for _ in range(10_000):
        codesets.icd10cm_status("M54.50", dt.date(2026, 12, 1))
    assert (time.perf_counter() - start) / 10_000 < 20e-6
