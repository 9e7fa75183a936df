"""Validation building blocks that speak the API's error vocabulary (api.md › Errors).

marshmallow reports errors as nested dicts of message strings. Every message made here
is a ``Msg``: a ``str`` that also carries the API ``code``, so ``problem_errors`` can
flatten marshmallow's dict into ``[{"field", "code", "message"}]`` without matching on
wording. Messages are fixed texts: a submitted value is never put in one (PHI).

The fields subclass marshmallow's own (String, Integer, Date, List, Nested) and put
their limits in ``metadata`` under JSON Schema names, so apispec documents them with no
extra plugin. They do their own checks instead of marshmallow's validators, whose
messages carry no code and may quote the input.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any

from marshmallow import Schema, ValidationError, fields

MAX_ERRORS = 100  # a response lists at most this many errors (first by field path)
_MAX_KEY_IN_PATH = 64  # unknown keys longer than this are cut in the field path

ERROR_CODES = frozenset({
    "required", "invalid_type", "invalid_format", "invalid_choice", "invalid_check_digit",
    "out_of_range", "too_few", "too_many", "unknown_field", "unknown_code", "not_billable",
    "invalid_date_range",
})


class Msg(str):
    """An error message that knows its API error code."""

    code: str

    def __new__(cls, code: str, text: str) -> Msg:
        assert code in ERROR_CODES, code
        self = super().__new__(cls, text)
        self.code = code
        return self


class ValidationProblem(Exception):
    """A well-formed body broke rules (HTTP 422); ``errors`` lists every broken field."""

    def __init__(self, errors: list[dict[str, str]]):
        super().__init__(f"{len(errors)} validation error(s)")
        self.errors = errors


def fail(code: str, text: str) -> ValidationError:
    """A marshmallow ValidationError carrying one coded message (raise it)."""
    return ValidationError(Msg(code, text))


# --- flattening ---------------------------------------------------------------------

def _key_segment(key: str) -> str:
    if len(key) > _MAX_KEY_IN_PATH:
        return key[:_MAX_KEY_IN_PATH] + "…"
    return key


def problem_errors(messages: Any) -> list[dict[str, str]]:
    """Flatten marshmallow's error dict into api.md's ``errors[]``, sorted by field path.

    Paths use dots for keys and ``[i]`` for list indexes (``patient.contacts[1].email``);
    marshmallow's ``_schema`` key stands for the object itself.
    """
    out: list[tuple[tuple, dict[str, str]]] = []

    def walk(node: Any, path: str, sort_key: tuple) -> None:
        if isinstance(node, Mapping):
            for key, sub in node.items():
                if key == "_schema":
                    walk(sub, path, sort_key)
                elif isinstance(key, int):
                    walk(sub, f"{path}[{key}]", (*sort_key, (1, key, "")))
                else:
                    seg = _key_segment(str(key))
                    walk(sub, f"{path}.{seg}" if path else seg, (*sort_key, (0, 0, seg)))
        elif isinstance(node, list | tuple):
            for sub in node:
                walk(sub, path, sort_key)
        else:
            if isinstance(node, Msg):
                entry = {"field": path, "code": node.code, "message": str(node)}
            else:  # a message not made here: keep its place, never its text
                entry = {"field": path, "code": "invalid_format", "message": "Invalid value."}
            out.append((sort_key, entry))

    walk(messages, "", ())
    out.sort(key=lambda item: item[0])
    seen: set[tuple[str, str]] = set()
    result = []
    for _, entry in out:
        ident = (entry["field"], entry["code"])
        if ident not in seen:
            seen.add(ident)
            result.append(entry)
    return result[:MAX_ERRORS]


# --- base classes -------------------------------------------------------------------

_FIELD_ERRORS = {
    "required": Msg("required", "This field is required."),
    "null": Msg("invalid_type", "This field may not be null."),
}
_WRONG_TYPE = Msg("invalid_type", "Wrong JSON type for this field.")


class _Coded:
    """Mixin: marshmallow's built-in field errors become coded messages."""

    def make_error(self, key: str, **kwargs: Any) -> ValidationError:
        return ValidationError(_FIELD_ERRORS.get(key, _WRONG_TYPE))

    def _validate(self, value: Any) -> None:
        # marshmallow builds a validator chain on every call, even an empty one (hot path).
        if self.validators:  # type: ignore[attr-defined]
            super()._validate(value)  # type: ignore[misc]


class StrictSchema(Schema):
    """Unknown keys are errors (``unknown_field``), a non-object is ``invalid_type``."""

    error_messages = {  # marshmallow merges this class attribute into its defaults
        "unknown": Msg("unknown_field", "Unknown field."),
        "type": Msg("invalid_type", "Expected a JSON object."),
    }


# --- strings ------------------------------------------------------------------------

_BIDI_CONTROLS = dict.fromkeys(
    [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F], None
)
# Controls (C0, DEL, C1), line/paragraph separators and surrogates; notes allow \t \n \r.
_SINGLE_LINE_BAD = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_MULTI_LINE_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def _type_str(value: Any) -> str:
    if not isinstance(value, str):
        raise fail("invalid_type", "Must be a string.")
    return value


class Text(_Coded, fields.String):
    """Free text shown to people (names, notes).

    NFC-normalized, bidi controls (U+202A–U+202E, U+2066–U+2069, U+200E/F) removed,
    surrounding whitespace trimmed, length counted in code points after that. Single-line
    text refuses CR, LF and other controls (they split log lines and headers). An empty
    value counts as absent: ``required`` when the field is, otherwise None.
    """

    def __init__(self, *, max_length: int, multiline: bool = False, **kwargs: Any):
        self.max_length = max_length
        self.multiline = multiline
        kwargs.setdefault("metadata", {})
        kwargs["metadata"].setdefault("maxLength", max_length)
        if not kwargs.get("required"):
            kwargs.setdefault("load_default", None)
            kwargs.setdefault("allow_none", True)
        super().__init__(**kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        value = _type_str(value)
        if (_MULTI_LINE_BAD if self.multiline else _SINGLE_LINE_BAD).search(value):
            if self.multiline:
                raise fail("invalid_format", "Must not contain control characters.")
            raise fail("invalid_format", "Must be a single line without control characters.")
        if not value.isascii():
            value = unicodedata.normalize("NFC", value.translate(_BIDI_CONTROLS))
        value = value.strip()
        if not value:
            if self.required:
                raise fail("required", "This field is required and may not be blank.")
            return None
        if len(value) > self.max_length:
            raise fail("out_of_range", f"Must be at most {self.max_length} characters.")
        return value


class Pattern(_Coded, fields.String):
    """An ASCII string that must fully match ``regex`` (codes, identifiers); never changed."""

    def __init__(
        self,
        regex: re.Pattern[str],
        *,
        message: str,
        max_length: int | None = None,
        check: Callable[[str], ValidationError | None] | None = None,
        **kwargs: Any,
    ):
        self.regex = regex
        self.message = message
        self.max_length = max_length
        self.check = check
        metadata = kwargs.setdefault("metadata", {})
        metadata.setdefault("pattern", f"^{regex.pattern}$")
        if max_length is not None:
            metadata.setdefault("maxLength", max_length)
        if not kwargs.get("required"):
            kwargs.setdefault("load_default", None)
            kwargs.setdefault("allow_none", True)
        super().__init__(**kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        value = _type_str(value)
        if self.max_length is not None and len(value) > self.max_length:
            raise fail("out_of_range", f"Must be at most {self.max_length} characters.")
        if self.regex.fullmatch(value) is None:
            raise fail("invalid_format", self.message)
        if self.check is not None:
            error = self.check(value)
            if error is not None:
                raise error
        return value


class Choice(_Coded, fields.String):
    """One of a fixed set of strings (``invalid_choice``); case-sensitive."""

    def __init__(self, choices: tuple[str, ...], **kwargs: Any):
        self.choices = choices
        self._choice_set = frozenset(choices)
        self._message = "Must be one of: " + ", ".join(choices) + "."
        kwargs.setdefault("metadata", {}).setdefault("enum", list(choices))
        if not kwargs.get("required"):
            kwargs.setdefault("load_default", None)
            kwargs.setdefault("allow_none", True)
        super().__init__(**kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        value = _type_str(value)
        if value not in self._choice_set:
            raise fail("invalid_choice", self._message)
        return value


# --- numbers and dates --------------------------------------------------------------

class StrictInteger(_Coded, fields.Integer):
    """A JSON integer in [minimum, maximum]; booleans, floats (even 1.0) and strings refused."""

    def __init__(self, *, minimum: int, maximum: int, **kwargs: Any):
        self.minimum = minimum
        self.maximum = maximum
        metadata = kwargs.setdefault("metadata", {})
        metadata.setdefault("minimum", minimum)
        metadata.setdefault("maximum", maximum)
        super().__init__(strict=True, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if type(value) is not int:  # bool is an int subclass: refused here on purpose
            raise fail("invalid_type", "Must be an integer.")
        if not self.minimum <= value <= self.maximum:
            raise fail("out_of_range", f"Must be between {self.minimum} and {self.maximum}.")
        return value


_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def parse_date(value: Any) -> dt.date | None:
    """``YYYY-MM-DD`` (ASCII digits, a real calendar day) as a date; None otherwise."""
    if not isinstance(value, str) or _DATE_RE.fullmatch(value) is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        return None


class StrictDate(_Coded, fields.Date):
    """A ``YYYY-MM-DD`` string (not the other forms ``date.fromisoformat`` takes) in bounds.

    ``earliest``/``latest`` are dates or zero-argument callables (e.g. today from the clock).
    """

    def __init__(
        self,
        *,
        earliest: dt.date | Callable[[], dt.date],
        latest: dt.date | Callable[[], dt.date],
        **kwargs: Any,
    ):
        self.earliest = earliest
        self.latest = latest
        if not kwargs.get("required"):
            kwargs.setdefault("load_default", None)
            kwargs.setdefault("allow_none", True)
        super().__init__(**kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        value = _type_str(value)
        day = parse_date(value)
        if day is None:
            raise fail("invalid_format", "Must be a calendar date as YYYY-MM-DD.")
        earliest = self.earliest() if callable(self.earliest) else self.earliest
        latest = self.latest() if callable(self.latest) else self.latest
        if not earliest <= day <= latest:
            raise fail(
                "out_of_range",
                f"Must be between {earliest.isoformat()} and {latest.isoformat()}.",
            )
        return day


# --- containers ---------------------------------------------------------------------

class Items(_Coded, fields.List):
    """A JSON array of ``min_items``..``max_items``; items are not looked at when it is too long."""

    def __init__(
        self, inner: fields.Field, *, min_items: int = 0, max_items: int, **kwargs: Any
    ):
        self.min_items = min_items
        self.max_items = max_items
        metadata = kwargs.setdefault("metadata", {})
        metadata.setdefault("maxItems", max_items)
        if min_items:
            metadata.setdefault("minItems", min_items)
        if not kwargs.get("required"):
            kwargs.setdefault("load_default", list)
            kwargs.setdefault("allow_none", True)
        super().__init__(inner, **kwargs)

    def deserialize(self, value: Any, attr: str | None = None, data: Any = None, **kwargs: Any):
        result = super().deserialize(value, attr, data, **kwargs)
        return [] if result is None else result  # optional lists: null is the empty list

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if not isinstance(value, list):
            raise fail("invalid_type", "Must be an array.")
        if len(value) > self.max_items:
            raise fail("too_many", f"Must have at most {self.max_items} items.")
        if len(value) < self.min_items:
            raise fail("too_few", f"Must have at least {self.min_items} item(s).")
        # fields.List._deserialize, minus its generic (and slow) collection test.
        result = []
        errors = {}
        inner = self.inner
        for idx, each in enumerate(value):
            try:
                result.append(inner.deserialize(each, **kwargs))
            except ValidationError as error:
                if error.valid_data is not None:
                    result.append(error.valid_data)
                errors[idx] = error.messages
        if errors:
            raise ValidationError(errors, valid_data=result)
        return result


class Object(_Coded, fields.Nested):
    """A nested JSON object (a StrictSchema); a non-object is ``invalid_type``."""

    def __init__(self, nested: type[Schema], **kwargs: Any):
        if not kwargs.get("required"):
            kwargs.setdefault("load_default", None)
            kwargs.setdefault("allow_none", True)
        super().__init__(nested, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if not isinstance(value, dict):
            raise fail("invalid_type", "Must be a JSON object.")
        return super()._deserialize(value, attr, data, **kwargs)
