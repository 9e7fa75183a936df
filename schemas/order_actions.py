"""Payloads of the coordinator's order actions: extensions, coverage fixes, resolve."""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, ValidationError

from schemas.common import (
    Items,
    Object,
    StrictInteger,
    StrictSchema,
    Text,
    ValidationProblem,
    problem_errors,
)
from schemas.orders import _identifier, _service_date


class ExtensionLineSchema(StrictSchema):
    sequence = StrictInteger(minimum=1, maximum=999, required=True)
    quantity = StrictInteger(minimum=1, maximum=999, required=True)  # the new total
    service_end = _service_date(required=True)


class ExtensionSchema(StrictSchema):
    lines = Items(Object(ExtensionLineSchema), min_items=1, max_items=50, required=True)


class CoverageFixSchema(StrictSchema):
    member_id = _identifier(80, required=True)
    group_number = _identifier(80)


class ResolveSchema(StrictSchema):
    note = Text(max_length=2000, multiline=True, required=True)


def load(schema: Schema, data: Any) -> dict[str, Any]:
    """Validate with the API's error vocabulary (`ValidationProblem` lists every field)."""
    try:
        return schema.load(data)
    except ValidationError as exc:
        raise ValidationProblem(problem_errors(exc.messages)) from None
