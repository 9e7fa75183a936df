"""Strict JSON for request bodies: anything that is not a usable JSON object is a 400.

Python's ``json`` accepts ``NaN``/``Infinity``, keeps the last of duplicate keys, accepts
lone surrogates and ``\\u0000`` (which PostgreSQL then rejects with a 500), and recurses
per nesting level (``'[' * 100000`` is a RecursionError, a 500 in Flask). This module
closes each of those holes while keeping the common case on the C scanner:

* depth is only scanned when the body holds more than ``MAX_DEPTH`` opening brackets at
  all (a typical order has about a dozen), in linear time with regexes that skip
  strings, before ``json`` sees the text;
* NUL and surrogates can only arrive as ``\\u`` escapes (raw control characters are a
  JSON error and encoded surrogates are invalid UTF-8), so the parsed value is walked
  only when the text contains such an escape.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any

MAX_DEPTH = 32
MAX_INT_DIGITS = 4300  # CPython's default int/str conversion limit, made explicit

# A JSON string, or an opening quote with no closing one: then the rest of the text (the
# body is malformed anyway; consuming it keeps the scan linear instead of retrying the
# string pattern from every later quote).
_STRING_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|"[\s\S]*')
_NOT_BRACKET_RE = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_SUSPECT_ESCAPE_RE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")
_BAD_CHAR_RE = re.compile("[\x00\ud800-\udfff]")


class MalformedJSON(ValueError):
    """The body is not a usable JSON object (HTTP 400). ``message`` never quotes the body."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class _Reject(Exception):
    """Raised from inside the decoder's hooks; turned into MalformedJSON by the caller."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _Reject("duplicate key in a JSON object")
    return obj


def _constant(name: str) -> Any:
    raise _Reject("NaN and Infinity are not JSON numbers")


def _int(text: str) -> int:
    if len(text) - (text[0] == "-") > MAX_INT_DIGITS:
        raise _Reject("integer too long")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as inf, which JSON cannot carry back out
        raise _Reject("number out of range")
    return value


_DECODER = json.JSONDecoder(
    object_pairs_hook=_object, parse_constant=_constant, parse_int=_int, parse_float=_float
)


def _check_depth(text: str) -> None:
    """Raise when brackets outside strings nest deeper than MAX_DEPTH (no recursion).

    Passes in C: drop strings, drop everything but brackets, running sum. Without any
    escaped quote, every quote delimits a string, so splitting on quotes and keeping the
    even parts drops the strings (much faster than the string regex). Exact for valid
    JSON; for invalid JSON the decoder stops no later than where the strings seen here
    stop matching its own, so it never nests deeper than the depth computed here.
    """
    if '\\"' in text:
        outside = _STRING_RE.sub("", text)
    else:
        outside = "".join(text.split('"')[::2])
    brackets = _NOT_BRACKET_RE.sub("", outside)
    if max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0) > MAX_DEPTH:
        raise MalformedJSON(f"JSON nested deeper than {MAX_DEPTH} levels")


def _check_strings(value: Any) -> None:
    """Raise on NUL or a lone surrogate in any key or string of the parsed value."""
    stack = [value]
    bad = _BAD_CHAR_RE.search
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if bad(item):
                raise MalformedJSON("NUL characters and lone surrogates are not allowed")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Parse a request body that must be one JSON object in UTF-8, or raise MalformedJSON."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise TypeError("parse_json_object takes the raw body as bytes")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedJSON("request body is not valid UTF-8") from None
    if text.count("[") + text.count("{") > MAX_DEPTH:
        _check_depth(text)
    try:
        value = _DECODER.decode(text)
    except _Reject as exc:
        raise MalformedJSON(str(exc)) from None
    except json.JSONDecodeError as exc:
        # exc.msg is the parser's own wording ("Expecting value"): no input is quoted.
        raise MalformedJSON(
            f"request body is not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno})"
        ) from None
    except (ValueError, RecursionError):
        raise MalformedJSON("request body is not valid JSON") from None
    if type(value) is not dict:
        raise MalformedJSON("request body must be a JSON object")
    if "\\u" in text and _SUSPECT_ESCAPE_RE.search(text):
        _check_strings(value)
    return value
