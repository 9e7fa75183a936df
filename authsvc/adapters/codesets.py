"""ICD-10-CM existence and billability from the versioned code table of ``simple-icd-10-cm``.

The package ships the CMS code list (every chapter, block, category and code, undotted)
and the tabular XML. Importing the package builds a tree from the 10 MB XML: about 1.6 s
and 200 MB per process, which every API worker, queue worker and the scheduler would
pay. Existence and billability need only the code list: a code is billable exactly when
no other code extends it (a leaf). So the table is built from the packaged list in about
0.1 s and 15 MB, lazily or at ``warm()``; ``tests/unit/test_codes.py`` checks that it
equals the package's own ``is_valid_item``/``is_leaf`` answers. When a package release
stops shipping the list, the package API is used instead.

Tables are keyed by effective date so a later fiscal-year set (effective Oct 1, with an
April 1 update) can sit beside the current one: a code is looked up in the newest table
in effect on the date of service. Dates before the oldest table use the oldest table:
only one code set ships, so codes added since cannot be told apart for such dates.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import importlib.util
import pathlib
import re
import threading
import warnings
from collections.abc import Iterable
from typing import Literal

from authsvc.domain.codes import ICD10CM_UNDOTTED_RE

Status = Literal["ok", "unknown_code", "not_billable"]

_MONTHS = {
    name: i
    for i, name in enumerate(
        ("January", "February", "March", "April", "May", "June", "July", "August",
         "September", "October", "November", "December"),
        start=1,
    )
}
_LIST_NAME_RE = re.compile(r"code-list-([A-Za-z]+)-([0-9]{4})\.txt")


@dataclasses.dataclass(frozen=True)
class CodeTable:
    """One ICD-10-CM code set: every code (headers included) and the billable ones, undotted."""

    version: str
    effective: dt.date
    codes: frozenset[str]
    billable: frozenset[str]

    def status(self, code: str) -> Status:
        """``ok``, ``unknown_code`` or ``not_billable`` for a dotted or undotted code."""
        key = _undotted(code)
        if key is None or key not in self.codes:
            return "unknown_code"
        return "ok" if key in self.billable else "not_billable"


def _undotted(code: str) -> str | None:
    """The table key of ``M54.50`` or ``M5450``; None for anything else (no case folding)."""
    if not isinstance(code, str):
        return None
    if len(code) > 4 and code[3] == ".":
        code = code[:3] + code[4:]
    if ICD10CM_UNDOTTED_RE.fullmatch(code) is None:
        return None
    return code


def table_from_codes(codes: Iterable[str], *, version: str, effective: dt.date) -> CodeTable:
    """Build a table from undotted codes; chapters and blocks (``1``, ``A00-A09``) are dropped.

    In sorted order the codes extending a code follow it directly, so a code is billable
    exactly when the next one does not start with it.
    """
    ordered = sorted({c for c in codes if ICD10CM_UNDOTTED_RE.fullmatch(c)})
    billable = [
        c for i, c in enumerate(ordered)
        if i + 1 == len(ordered) or not ordered[i + 1].startswith(c)
    ]
    return CodeTable(version, effective, frozenset(ordered), frozenset(billable))


def _package_dir() -> pathlib.Path | None:
    # find_spec on a top-level name locates the package without importing it (the
    # import is what parses the XML).
    spec = importlib.util.find_spec("simple_icd_10_cm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def _packaged_list() -> tuple[pathlib.Path, dt.date] | None:
    root = _package_dir()
    if root is None:
        return None
    found = []
    for path in (root / "data").glob("code-list-*.txt"):
        m = _LIST_NAME_RE.fullmatch(path.name)
        if m and m.group(1) in _MONTHS:
            found.append((dt.date(int(m.group(2)), _MONTHS[m.group(1)], 1), path))
    if not found:
        return None
    effective, path = max(found)
    return path, effective


def _load_packaged_table() -> CodeTable:
    listed = _packaged_list()
    if listed is not None:
        path, effective = listed
        codes = path.read_text(encoding="ascii").split()
        return table_from_codes(codes, version=_version(effective), effective=effective)
    return _load_via_package_api()


def _load_via_package_api() -> CodeTable:  # pragma: no cover - only without the code list
    with warnings.catch_warnings():
        # The package reads its data with importlib.resources.read_text (deprecated).
        warnings.simplefilter("ignore", DeprecationWarning)
        import simple_icd_10_cm as icd

    codes = [c.replace(".", "") for c in icd.get_all_codes(True)]
    return table_from_codes(codes, version=ICD10CM_VERSION, effective=dt.date.min)


def _version(effective: dt.date) -> str:
    return f"icd10cm@{effective.isoformat()}"


_listed = _packaged_list()
_PACKAGED_EFFECTIVE: dt.date | None = _listed[1] if _listed else None
#: The version of the code set that ships, e.g. ``icd10cm@2026-04-01`` (FY2026, April update).
ICD10CM_VERSION: str = _version(_PACKAGED_EFFECTIVE) if _PACKAGED_EFFECTIVE else "icd10cm@unknown"
del _listed

_lock = threading.Lock()
_tables: list[CodeTable] = []  # sorted by effective date


def _ensure_loaded() -> list[CodeTable]:
    if not _tables:
        with _lock:
            if not _tables:
                _tables.append(_load_packaged_table())
    return _tables


def warm() -> None:
    """Load the code table now (process start) rather than on the first order."""
    _ensure_loaded()


def register_table(table: CodeTable) -> None:
    """Add another code set (e.g. next fiscal year's), in effect from ``table.effective``."""
    tables = _ensure_loaded()
    with _lock:
        tables[:] = [t for t in tables if t.effective != table.effective]
        bisect.insort(tables, table, key=lambda t: t.effective)


def reset_tables() -> None:
    """Forget registered tables; the packaged one is loaded again on next use (tests)."""
    with _lock:
        _tables.clear()


def table_for(on: dt.date | None) -> CodeTable:
    """The code set in effect on ``on``: the newest one when ``on`` is None."""
    tables = _ensure_loaded()
    if on is None:
        return tables[-1]
    i = bisect.bisect_right(tables, on, key=lambda t: t.effective)
    return tables[max(i - 1, 0)]


def icd10cm_status(code: str, on: dt.date | None = None) -> Status:
    """Whether ``code`` exists and is billable in the code set in effect on ``on``.

    Takes the dotted form (``M54.50``) and the undotted one (``M5450``); never folds case.
    Check the format first (``authsvc.domain.codes.icd10cm_format_ok``): this only answers
    existence, so ``E119`` is ``ok`` here although the API requires ``E11.9``.
    """
    return table_for(on).status(code)
