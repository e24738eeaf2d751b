"""Segment filters: validation, and translation into a SQL condition on user properties."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from google.protobuf import json_format, struct_pb2
from sqlalchemy.dialects.postgresql import JSONB

from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_common.errors import Validator
from herald_common.validation import check_text_fields
from herald_segmentation.storage import users

Op = pb.Operator
_ORDERING = {
    Op.OPERATOR_GREATER_THAN: ">",
    Op.OPERATOR_GREATER_THAN_OR_EQUAL: ">=",
    Op.OPERATOR_LESS_THAN: "<",
    Op.OPERATOR_LESS_THAN_OR_EQUAL: "<=",
}
_VALUELESS = {Op.OPERATOR_EXISTS, Op.OPERATOR_NOT_EXISTS}
MAX_CONDITIONS = 100


def _python_value(value: struct_pb2.Value) -> Any:
    return json_format.MessageToDict(value)


def validate_filter(segment_filter: pb.SegmentFilter, field: str, check: Validator) -> None:
    check_text_fields(segment_filter, field, check)
    if not check.require(
        len(segment_filter.conditions) > 0, f"{field}.conditions", "at least one condition is required"
    ):
        return
    check.require(
        len(segment_filter.conditions) <= MAX_CONDITIONS,
        f"{field}.conditions",
        f"at most {MAX_CONDITIONS} conditions",
    )
    for i, condition in enumerate(segment_filter.conditions):
        path = f"{field}.conditions[{i}]"
        check.require(bool(condition.property.strip()), f"{path}.property", "required")
        if condition.operator not in Op.values():
            continue  # reported by check_text_fields with the valid values
        if not check.require(condition.operator != Op.OPERATOR_UNSPECIFIED, f"{path}.operator", "required"):
            continue
        if condition.operator in _VALUELESS:
            check.require(
                not condition.HasField("value"),
                f"{path}.value",
                f"{Op.Name(condition.operator)} takes no value",
            )
            continue
        kind = condition.value.WhichOneof("kind")
        if not check.require(
            kind is not None and kind != "null_value", f"{path}.value", "required for this operator"
        ):
            continue
        if condition.operator == Op.OPERATOR_IN:
            check.require(
                kind == "list_value" and len(condition.value.list_value.values) > 0,
                f"{path}.value",
                "OPERATOR_IN needs a non-empty list",
            )
        elif condition.operator in _ORDERING:
            check.require(
                kind in ("number_value", "string_value"),
                f"{path}.value",
                "ordering needs a number or a string",
            )
        elif condition.operator == Op.OPERATOR_CONTAINS:
            check.require(
                kind in ("number_value", "string_value", "bool_value"),
                f"{path}.value",
                "OPERATOR_CONTAINS needs a scalar",
            )
        else:
            check.require(
                kind != "list_value" and kind != "struct_value", f"{path}.value", "equality needs a scalar"
            )


def _jsonb(value: Any) -> sa.ColumnElement[Any]:
    return sa.literal(value, JSONB)


def _condition(condition: pb.PropertyCondition) -> sa.ColumnElement[bool]:
    key = condition.property
    prop = users.c.properties[key]
    op = condition.operator
    has_key: sa.ColumnElement[bool] = users.c.properties.has_key(key)
    if op == Op.OPERATOR_EXISTS:
        return has_key
    if op == Op.OPERATOR_NOT_EXISTS:
        return sa.not_(has_key)
    value = _python_value(condition.value)
    if op == Op.OPERATOR_EQUALS:
        equals: sa.ColumnElement[bool] = users.c.properties.contains(_jsonb({key: value}))
        return equals
    if op == Op.OPERATOR_NOT_EQUALS:
        return sa.not_(users.c.properties.contains(_jsonb({key: value})))
    if op == Op.OPERATOR_IN:
        return _jsonb(value).contains(sa.func.jsonb_build_array(prop))
    if op == Op.OPERATOR_CONTAINS:
        text_match = sa.func.strpos(sa.func.lower(prop.astext), str(value).lower()) > 0
        list_match = prop.contains(_jsonb([value]))
        return sa.case(
            (sa.func.jsonb_typeof(prop) == "string", text_match),
            (sa.func.jsonb_typeof(prop) == "array", list_match),
            else_=sa.false(),
        )
    comparator = _ORDERING[op]
    if isinstance(value, str):
        return sa.case(
            (sa.func.jsonb_typeof(prop) == "string", prop.astext.op(comparator)(value)),
            else_=sa.false(),
        )
    return sa.case(
        (
            sa.func.jsonb_typeof(prop) == "number",
            sa.cast(prop.astext, sa.Numeric).op(comparator)(sa.literal(value, sa.Numeric)),
        ),
        else_=sa.false(),
    )


def to_sql(segment_filter: pb.SegmentFilter) -> sa.ColumnElement[bool]:
    clauses = [_condition(c) for c in segment_filter.conditions]
    if segment_filter.match == pb.Match.MATCH_ANY:
        return sa.or_(*clauses)
    return sa.and_(*clauses)
