"""Formats of the identifiers and codes an order carries (reliability.md §5).

Every pattern is ASCII-only and meant for ``re.fullmatch``: Python's ``\\d`` accepts
non-ASCII digits (``"١٢٣"``) and ``$`` accepts a trailing newline, so neither is used.
Nothing here normalizes case or whitespace: a lowercase code is a wrong code, not a
code to fix up (FHIR declares these systems case-sensitive).
"""

from __future__ import annotations

import re

# Compiled without anchors: always use ``fullmatch``. ``*_PATTERN`` are the anchored
# forms for documents (OpenAPI ``pattern``), where matching is a search.
NPI_RE = re.compile(r"[12][0-9]{9}")
ICD10CM_RE = re.compile(r"[A-Z][0-9][0-9A-Z](?:\.[0-9A-Z]{1,4})?")
ICD10CM_UNDOTTED_RE = re.compile(r"[A-Z][0-9][0-9A-Z]{1,5}")
CPT_RE = re.compile(r"(?:[0-9]{5}|[0-9]{4}[FTUM])")
HCPCS_RE = re.compile(r"[A-V][0-9]{4}")
MODIFIER_RE = re.compile(r"[0-9A-Z]{2}")

NPI_PATTERN = f"^{NPI_RE.pattern}$"
ICD10CM_PATTERN = f"^{ICD10CM_RE.pattern}$"
CPT_PATTERN = f"^{CPT_RE.pattern}$"
HCPCS_PATTERN = f"^{HCPCS_RE.pattern}$"
MODIFIER_PATTERN = f"^{MODIFIER_RE.pattern}$"


def npi_format_ok(s: str) -> bool:
    """Ten ASCII digits starting with 1 or 2 (says nothing about the check digit)."""
    return isinstance(s, str) and NPI_RE.fullmatch(s) is not None


def npi_check_digit_ok(s: str) -> bool:
    """Luhn over the 80840-prefixed NPI, as the constant 24; assumes ``npi_format_ok``."""
    total = 24
    for i, ch in enumerate(reversed(s[:9])):
        d = ord(ch) - 48
        if i % 2 == 0:  # the rightmost base digit is doubled
            d *= 2
            d = d // 10 + d % 10
        total += d
    return (10 - total % 10) % 10 == ord(s[9]) - 48


def npi_valid(s: str) -> bool:
    """True for a well-formed NPI with a correct check digit (not proof that it is issued)."""
    return npi_format_ok(s) and npi_check_digit_ok(s)


def icd10cm_format_ok(s: str) -> bool:
    """ICD-10-CM in the dotted, uppercase form the API takes (``M54.50``, ``A00``)."""
    return isinstance(s, str) and ICD10CM_RE.fullmatch(s) is not None


def cpt_format_ok(s: str) -> bool:
    """CPT category I (5 digits) or 4 digits + F/T/U/M; format only (the list is licensed)."""
    return isinstance(s, str) and CPT_RE.fullmatch(s) is not None


def hcpcs_format_ok(s: str) -> bool:
    """HCPCS Level II: one letter A–V then 4 digits; format only."""
    return isinstance(s, str) and HCPCS_RE.fullmatch(s) is not None


def modifier_format_ok(s: str) -> bool:
    """A procedure modifier: two ASCII uppercase letters or digits, in its own field."""
    return isinstance(s, str) and MODIFIER_RE.fullmatch(s) is not None


def procedure_code_format_ok(code_system: str, code: str) -> bool:
    """Format of a line's code for its ``code_system`` (``CPT`` or ``HCPCS``)."""
    if code_system == "CPT":
        return cpt_format_ok(code)
    if code_system == "HCPCS":
        return hcpcs_format_ok(code)
    return False
