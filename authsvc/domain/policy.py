"""Pure helpers for payer policy files: code ranges and diagnosis patterns.

They live in the domain (no I/O) so that the policy loader and the tests agree on how a range
like ``70010-76499`` is compared. Code formats come from authsvc.domain.codes, the same checks
the order validator uses (CPT and HCPCS by format only: the code lists are licensed).
"""

from __future__ import annotations

import functools

from authsvc.domain.codes import procedure_code_format_ok

CODE_SYSTEMS = ("CPT", "HCPCS")

#: The order in which doc_needed values are listed (CRD doc-needed codes).
DOC_ORDER = ("clinical", "admin", "patient", "conditional")


def code_format_ok(system: str, code: str) -> bool:
    """True when ``code`` has the shape of a code of ``system`` (authsvc.domain.codes)."""
    return procedure_code_format_ok(system, code)


@functools.lru_cache(maxsize=65_536)
def code_key(system: str, code: str) -> tuple[str, int] | None:
    """Map a well-formed code to (class, number) so that ranges compare as integers.

    Codes of one class share a shape (CPT 5 digits; CPT ``dddd`` + F/T/U/M; HCPCS one letter
    + 4 digits), and a range only covers codes of its own class: ``0001T-0999T`` never matches
    ``05000``. Returns None for a code of no known shape (it can still match exactly).
    """
    if not code_format_ok(system, code):
        return None
    if system == "CPT":
        if code[-1].isdigit():
            return ("CPT:N", int(code))
        return (f"CPT:{code[-1]}", int(code[:4]))
    return (f"HCPCS:{code[0]}", int(code[1:]))


class CodeSpecError(ValueError):
    """A code or range in a policy file is malformed."""


def parse_code_spec(system: str, spec: str) -> tuple[str, int, int] | str:
    """Parse one entry of a ``codes`` list: an exact code (returned as is) or a range.

    A range ``A-B`` returns (class, start, end). Raises CodeSpecError on a bad format, on
    ends of different classes (``0001F-99999``) and on a start after its end.
    """
    if "-" not in spec:
        if not code_format_ok(system, spec):
            raise CodeSpecError(f"{spec!r} is not a {system} code")
        return spec
    start, _, end = spec.partition("-")
    for part in (start, end):
        if not code_format_ok(system, part):
            raise CodeSpecError(f"range {spec!r}: {part!r} is not a {system} code")
    k_start, k_end = code_key(system, start), code_key(system, end)
    assert k_start is not None and k_end is not None
    if k_start[0] != k_end[0]:
        raise CodeSpecError(f"range {spec!r} mixes code formats")
    if k_start[1] > k_end[1]:
        raise CodeSpecError(f"range {spec!r} starts after it ends")
    return (k_start[0], k_start[1], k_end[1])


def normalize_dx(code: str) -> str:
    """ICD-10-CM without its dot, so ``M54.50``, ``M5450`` and pattern ``M54.5*`` compare."""
    return code.replace(".", "").upper()


def dx_pattern_matcher(patterns: list[str] | tuple[str, ...]):
    """Compile ICD-10-CM patterns (``C*`` = prefix, otherwise exact) into one test.

    The returned function takes normalized diagnosis codes and says whether any matches.
    """
    exact = frozenset(normalize_dx(p) for p in patterns if not p.endswith("*"))
    prefixes = tuple(normalize_dx(p[:-1]) for p in patterns if p.endswith("*"))

    def any_match(diagnoses: tuple[str, ...]) -> bool:
        for dx in diagnoses:
            if dx in exact or (prefixes and dx.startswith(prefixes)):
                return True
        return False

    return any_match
