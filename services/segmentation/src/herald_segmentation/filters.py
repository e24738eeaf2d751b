"""The segment language: validation of a filter tree, and its translation into one SQL condition
on the `users` table.

Every condition becomes a boolean that is never NULL, so `none_of` (NOT) means what it says.
Conditions on events and lists become set membership (`user_id IN (...)`): the planner runs each
set once, as a hash join, instead of once per user.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from google.protobuf import struct_pb2
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql.elements import Grouping

from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_common import api
from herald_common.db import text_in
from herald_common.errors import Validator
from herald_common.live import PAGE_VIEWED
from herald_common.timing import parse_datetime
from herald_common.validation import check_text_fields
from herald_segmentation.properties import (
    USER,
    PropertyType,
    Typed,
    as_python,
    event_subject,
    type_of,
)
from herald_segmentation.storage import devices, event_bodies, events, list_members, users

Op = pb.Operator
T = PropertyType
MAX_DEPTH = 16
MAX_CONDITIONS = 200
MAX_CIRCLES = 100
MAX_RADIUS_KM = 20_000.0
MAX_DAYS = 36_500
MAX_PATTERN = 2_000
EARTH_RADIUS_KM = 6371.0088

_ORDERING = {
    Op.OPERATOR_GREATER_THAN: ">",
    Op.OPERATOR_GREATER_THAN_OR_EQUAL: ">=",
    Op.OPERATOR_LESS_THAN: "<",
    Op.OPERATOR_LESS_THAN_OR_EQUAL: "<=",
}
_DATE_ONLY = {
    Op.OPERATOR_BEFORE,
    Op.OPERATOR_AFTER,
    Op.OPERATOR_WITHIN_LAST_DAYS,
    Op.OPERATOR_WITHIN_NEXT_DAYS,
}
_PRESENCE = {Op.OPERATOR_EXISTS, Op.OPERATOR_NOT_EXISTS}
# The operators whose SQL holds the moment it was built for.
_RELATIVE_TO_NOW = {Op.OPERATOR_WITHIN_LAST_DAYS, Op.OPERATOR_WITHIN_NEXT_DAYS}
# Which operators suit which type.
OPERATORS: dict[PropertyType, set[pb.Operator.ValueType]] = {
    T.STRING: {Op.OPERATOR_EQUALS, Op.OPERATOR_NOT_EQUALS, Op.OPERATOR_IN, Op.OPERATOR_CONTAINS}
    | {Op.OPERATOR_STARTS_WITH, Op.OPERATOR_MATCHES}
    | set(_ORDERING)
    | _PRESENCE,
    T.NUMBER: {Op.OPERATOR_EQUALS, Op.OPERATOR_NOT_EQUALS, Op.OPERATOR_IN, Op.OPERATOR_BETWEEN}
    | set(_ORDERING)
    | _PRESENCE,
    T.BOOLEAN: {Op.OPERATOR_EQUALS, Op.OPERATOR_NOT_EQUALS} | _PRESENCE,
    T.DATETIME: {Op.OPERATOR_EQUALS, Op.OPERATOR_NOT_EQUALS, Op.OPERATOR_BETWEEN}
    | set(_ORDERING)
    | _DATE_ONLY
    | _PRESENCE,
    T.LIST: {Op.OPERATOR_CONTAINS} | _PRESENCE,
    T.OBJECT: set(_PRESENCE),
}
# System fields of the profile: (column expression, type).
_PROFILE_TEXT = {
    pb.ProfileField.PROFILE_FIELD_USER_ID: users.c.user_id,
    pb.ProfileField.PROFILE_FIELD_EMAIL: users.c.email,
    pb.ProfileField.PROFILE_FIELD_PHONE: users.c.phone,
    pb.ProfileField.PROFILE_FIELD_GENDER: users.c.gender,
    pb.ProfileField.PROFILE_FIELD_COUNTRY: users.c.country,
    pb.ProfileField.PROFILE_FIELD_REGION: users.c.region,
    pb.ProfileField.PROFILE_FIELD_CITY: users.c.city,
    pb.ProfileField.PROFILE_FIELD_TIMEZONE: users.c.timezone,
}
_APP_COLUMNS = {
    pb.AppField.APP_FIELD_PLATFORM: devices.c.platform,
    pb.AppField.APP_FIELD_APP_VERSION: devices.c.app_version,
    pb.AppField.APP_FIELD_DEVICE_MAKE: devices.c.make,
    pb.AppField.APP_FIELD_DEVICE_MODEL: devices.c.model,
    pb.AppField.APP_FIELD_OS_VERSION: devices.c.os_version,
    pb.AppField.APP_FIELD_SDK_VERSION: devices.c.sdk_version,
    pb.AppField.APP_FIELD_PUSH_TOKEN_TYPE: devices.c.push_token_type,
}
# Fields whose values are names of an enum.
_PROFILE_ENUMS = {pb.ProfileField.PROFILE_FIELD_GENDER: pb.Gender}
_APP_ENUMS = {
    pb.AppField.APP_FIELD_PLATFORM: pb.Platform,
    pb.AppField.APP_FIELD_PUSH_TOKEN_TYPE: pb.PushTokenType,
}
_COUNT_OPERATORS = {Op.OPERATOR_GREATER_THAN_OR_EQUAL, Op.OPERATOR_LESS_THAN_OR_EQUAL, Op.OPERATOR_EQUALS}


def _python(value: struct_pb2.Value) -> Any:
    return as_python(value)


def _value_type(value: Any) -> PropertyType | None:
    """The type of an operand: a scalar's, as a property value's; None for lists and objects."""
    kind = type_of(value)
    return None if kind in (T.LIST, T.OBJECT) else kind


# --- walking the tree -------------------------------------------------------------------------


def conditions(segment_filter: pb.SegmentFilter, path: str) -> Iterator[tuple[pb.Condition, str]]:
    """Every condition of a filter with its path, nested groups included (depth first)."""
    for branch in ("all_of", "any_of", "none_of"):
        for i, condition in enumerate(getattr(segment_filter, branch)):
            here = f"{path}.{branch}[{i}]"
            yield condition, here
            if condition.WhichOneof("kind") == "group":
                yield from conditions(condition.group, f"{here}.group")


def _event_conditions(condition: pb.Condition) -> list[pb.EventCondition]:
    kind = condition.WhichOneof("kind")
    if kind == "event":
        return [condition.event]
    if kind == "constant_property":
        return list(condition.constant_property.events)
    return []


def property_keys(segment_filter: pb.SegmentFilter) -> set[tuple[str, str]]:
    """The (subject, key) of every custom property the filter tests, to look their types up."""
    keys = set()
    for condition, _ in conditions(segment_filter, ""):
        if condition.WhichOneof("kind") == "property":
            keys.add((USER, condition.property.property))
        for event in _event_conditions(condition):
            keys.update((event_subject(event.event_name), w.property) for w in event.where)
    return keys


def references(segment_filter: pb.SegmentFilter, path: str) -> list[tuple[str, str]]:
    """(name, path) of every list and segment the filter refers to."""
    found = []
    for condition, here in conditions(segment_filter, path):
        kind = condition.WhichOneof("kind")
        if kind == "in_list":
            found.append((condition.in_list, f"{here}.in_list"))
        elif kind == "in_segment":
            found.append((condition.in_segment, f"{here}.in_segment"))
    return found


# --- validation -------------------------------------------------------------------------------


def _depth(segment_filter: pb.SegmentFilter) -> int:
    nested = [
        _depth(c.group)
        for branch in (segment_filter.all_of, segment_filter.any_of, segment_filter.none_of)
        for c in branch
        if c.WhichOneof("kind") == "group"
    ]
    return 1 + max(nested, default=0)


def validate_filter(segment_filter: pb.SegmentFilter, path: str, check: Validator, types: Typed) -> None:
    check_text_fields(segment_filter, path, check)
    every = list(conditions(segment_filter, path))
    if not check.require(bool(every), f"{path}.all_of", "at least one condition is required"):
        return
    check.require(len(every) <= MAX_CONDITIONS, path, f"at most {MAX_CONDITIONS} conditions in all")
    check.require(_depth(segment_filter) <= MAX_DEPTH, path, f"groups nest at most {MAX_DEPTH} deep")
    for condition, here in every:
        _validate_condition(condition, here, check, types)


def _validate_condition(condition: pb.Condition, path: str, check: Validator, types: Typed) -> None:
    kind = condition.WhichOneof("kind")
    if kind is None:
        check.add(path, "a condition needs one of its kinds set")
    elif kind == "property":
        _validate_property(condition.property, f"{path}.property", USER, check, types)
    elif kind == "profile":
        _validate_profile(condition.profile, f"{path}.profile", check)
    elif kind == "radius":
        _validate_radius(condition.radius, f"{path}.radius", check)
    elif kind == "reachability":
        check.require(
            condition.reachability.reachability != pb.Reachability.REACHABILITY_UNSPECIFIED,
            f"{path}.reachability.reachability",
            "required",
        )
    elif kind == "app":
        _validate_app(condition.app, f"{path}.app", check)
    elif kind == "event":
        _validate_event(condition.event, f"{path}.event", check, types)
    elif kind == "constant_property":
        _validate_constant(condition.constant_property, f"{path}.constant_property", check, types)
    elif kind == "in_list":
        api.parse_uuid_name(condition.in_list, "lists", f"{path}.in_list")
    elif kind == "in_segment":
        api.parse_uuid_name(condition.in_segment, "segments", f"{path}.in_segment")
    elif kind == "group":
        check.require(
            any((condition.group.all_of, condition.group.any_of, condition.group.none_of)),
            f"{path}.group",
            "an empty group",
        )


def _operator_ok(operator: pb.Operator.ValueType, path: str, check: Validator) -> bool:
    if operator not in Op.values():
        return False  # reported by check_text_fields with the valid values
    return check.require(operator != Op.OPERATOR_UNSPECIFIED, f"{path}.operator", "required")


def _validate_operand(
    operator: pb.Operator.ValueType,
    value: struct_pb2.Value,
    present: bool,
    kind: PropertyType,
    path: str,
    check: Validator,
) -> None:
    """The operator suits the type, and the value suits the operator."""
    name = Op.Name(operator)
    allowed = OPERATORS[kind]
    choices = ", ".join(sorted(Op.Name(o) for o in allowed))
    if not check.require(
        operator in allowed,
        f"{path}.operator",
        f"{name} does not apply to a {kind.value}; use one of {choices}",
    ):
        return
    if operator in _PRESENCE:
        check.require(not present, f"{path}.value", f"{name} takes no value")
        return
    given = _python(value) if present else None
    if given is None:
        check.add(f"{path}.value", f"required for {name}")
        return
    if operator in (Op.OPERATOR_WITHIN_LAST_DAYS, Op.OPERATOR_WITHIN_NEXT_DAYS):
        check.require(
            isinstance(given, int | float) and not isinstance(given, bool) and 1 <= given <= MAX_DAYS,
            f"{path}.value",
            f"a number of days from 1 to {MAX_DAYS}",
        )
        return
    if operator == Op.OPERATOR_MATCHES:
        check.require(
            isinstance(given, str) and 0 < len(given) <= MAX_PATTERN,
            f"{path}.value",
            f"a pattern of 1 to {MAX_PATTERN:,} characters",
        )
        return
    items = given if operator in (Op.OPERATOR_IN, Op.OPERATOR_BETWEEN) else [given]
    if operator == Op.OPERATOR_IN and not check.require(
        isinstance(given, list) and len(given) > 0, f"{path}.value", "a non-empty list"
    ):
        return
    if operator == Op.OPERATOR_BETWEEN and not check.require(
        isinstance(given, list) and len(given) == 2, f"{path}.value", "a list of two bounds"
    ):
        return
    wanted = T.STRING if kind == T.LIST else kind
    for item in items:
        got = _value_type(item)
        fits = got == wanted or (wanted == T.STRING and got == T.DATETIME)
        if not fits:
            hint = "an RFC 3339 date-time string" if wanted == T.DATETIME else f"a {wanted.value}"
            check.add(f"{path}.value", f"this is a {kind.value}; compare it with {hint}")
            return
    if operator == Op.OPERATOR_BETWEEN:
        bounds: list[Any] = [parse_datetime(v) for v in given] if kind == T.DATETIME else given
        check.require(bounds[0] <= bounds[1], f"{path}.value", "the first bound must not be above the second")


def _validate_property(
    condition: pb.PropertyCondition, path: str, subject: str, check: Validator, types: Typed
) -> None:
    check.require(bool(condition.property.strip()), f"{path}.property", "required")
    if not _operator_ok(condition.operator, path, check):
        return
    kind = types.get((subject, condition.property))
    if kind is None:  # never sent: the value says what it is
        given = _python(condition.value) if condition.HasField("value") else None
        sample = given[0] if isinstance(given, list) and given else given
        kind = _value_type(sample) or T.STRING
        if condition.operator in (Op.OPERATOR_CONTAINS, Op.OPERATOR_MATCHES):
            kind = T.STRING
        if condition.operator in _DATE_ONLY:
            kind = T.DATETIME
    _validate_operand(condition.operator, condition.value, condition.HasField("value"), kind, path, check)


def _profile_type(field: int) -> PropertyType:
    if field == pb.ProfileField.PROFILE_FIELD_AGE:
        return T.NUMBER
    if field == pb.ProfileField.PROFILE_FIELD_DATE_OF_BIRTH:
        return T.DATETIME
    return T.STRING


def _validate_enum_values(enum: Any, value: struct_pb2.Value, path: str, check: Validator) -> None:
    if enum is None:
        return
    given = _python(value)
    for item in given if isinstance(given, list) else [given]:
        check.require(
            item in enum.keys() and enum.Value(item) != 0,  # noqa: SIM118 (an enum wrapper, not a dict)
            f"{path}.value",
            f"one of {', '.join(k for k in enum.keys() if enum.Value(k) != 0)}",  # noqa: SIM118
        )


def _validate_profile(condition: pb.ProfileCondition, path: str, check: Validator) -> None:
    if condition.field not in pb.ProfileField.values():
        return  # reported by check_text_fields
    if not check.require(
        condition.field != pb.ProfileField.PROFILE_FIELD_UNSPECIFIED, f"{path}.field", "required"
    ) or not _operator_ok(condition.operator, path, check):
        return
    errors = len(check.violations)
    _validate_operand(
        condition.operator,
        condition.value,
        condition.HasField("value"),
        _profile_type(condition.field),
        path,
        check,
    )
    if len(check.violations) == errors and condition.operator not in _PRESENCE:
        _validate_enum_values(_PROFILE_ENUMS.get(condition.field), condition.value, path, check)


def _validate_app(condition: pb.AppFieldCondition, path: str, check: Validator) -> None:
    if condition.field not in pb.AppField.values():
        return
    if not check.require(
        condition.field != pb.AppField.APP_FIELD_UNSPECIFIED, f"{path}.field", "required"
    ) or not _operator_ok(condition.operator, path, check):
        return
    errors = len(check.violations)
    _validate_operand(condition.operator, condition.value, condition.HasField("value"), T.STRING, path, check)
    if len(check.violations) == errors and condition.operator not in _PRESENCE:
        _validate_enum_values(_APP_ENUMS.get(condition.field), condition.value, path, check)


def _validate_radius(condition: pb.RadiusCondition, path: str, check: Validator) -> None:
    if not check.require(
        0 < len(condition.circles) <= MAX_CIRCLES, f"{path}.circles", f"1 to {MAX_CIRCLES} circles"
    ):
        return
    for i, circle in enumerate(condition.circles):
        here = f"{path}.circles[{i}]"
        check.require(-90 <= circle.latitude <= 90, f"{here}.latitude", "between -90 and 90")
        check.require(-180 <= circle.longitude <= 180, f"{here}.longitude", "between -180 and 180")
        check.require(
            0 < circle.radius_km <= MAX_RADIUS_KM,
            f"{here}.radius_km",
            f"more than 0 and at most {MAX_RADIUS_KM:,.0f} km",
        )


def _validate_window(window: pb.TimeWindow, path: str, check: Validator) -> None:
    which = window.WhichOneof("window")
    if which == "last_days":
        check.require(1 <= window.last_days <= MAX_DAYS, f"{path}.last_days", f"1 to {MAX_DAYS}")
    elif which == "between":
        span = window.between
        if check.require(
            span.HasField("start_time") and span.HasField("end_time"),
            f"{path}.between",
            "start_time and end_time are required",
        ):
            check.require(
                span.end_time.ToNanoseconds() > span.start_time.ToNanoseconds(),
                f"{path}.between.end_time",
                "must be after start_time",
            )
    elif which is None:
        check.add(path, "one of last_days, between or since")


def _validate_event(condition: pb.EventCondition, path: str, check: Validator, types: Typed) -> None:
    check.require(len(condition.event_name) <= 200, f"{path}.event_name", "at most 200 characters")
    validate_event_where(condition.where, condition.event_name, f"{path}.where", check, types)
    if condition.HasField("count"):
        count = condition.count
        check.require(
            count.operator in _COUNT_OPERATORS,
            f"{path}.count.operator",
            "OPERATOR_GREATER_THAN_OR_EQUAL, OPERATOR_LESS_THAN_OR_EQUAL or OPERATOR_EQUALS",
        )
        check.require(count.value >= 0, f"{path}.count.value", "zero or more")
        check.require(
            condition.occurrence == pb.Occurrence.OCCURRENCE_UNSPECIFIED,
            f"{path}.count",
            "a count does not go with a first or last occurrence",
        )
    if condition.HasField("window"):
        _validate_window(condition.window, f"{path}.window", check)
    elif condition.occurrence != pb.Occurrence.OCCURRENCE_UNSPECIFIED:
        check.add(f"{path}.window", "a first or last occurrence needs a window")


def _validate_constant(
    condition: pb.ConstantPropertyCondition, path: str, check: Validator, types: Typed
) -> None:
    check.require(bool(condition.property.strip()), f"{path}.property", "required")
    if not check.require(2 <= len(condition.events) <= 10, f"{path}.events", "2 to 10 event conditions"):
        return
    for i, event in enumerate(condition.events):
        here = f"{path}.events[{i}]"
        _validate_event(event, here, check, types)
        check.require(not event.did_not, f"{here}.did_not", "events held constant must have happened")
        check.require(
            event.occurrence == pb.Occurrence.OCCURRENCE_UNSPECIFIED,
            f"{here}.occurrence",
            "not with a constant property",
        )
        check.require(
            not event.HasField("count") or event.count.operator == Op.OPERATOR_GREATER_THAN_OR_EQUAL,
            f"{here}.count.operator",
            "only OPERATOR_GREATER_THAN_OR_EQUAL (at least) with a constant property",
        )


# --- translation into SQL ---------------------------------------------------------------------


@dataclass
class Context:
    """What a filter is evaluated against: one account, one moment, and the saved segments it
    refers to (loaded beforehand)."""

    account_id: Any
    now: datetime
    types: Typed
    segments: dict[str, pb.SegmentFilter] = field(default_factory=dict)
    # Set when the filter is evaluated for these users only: the events and list members read
    # are theirs alone (an index lookup per user, not a scan of everyone who did the event).
    only_users: list[str] | None = None


@dataclass(frozen=True)
class Operand:
    """A value under test: as text, as number, as time, and whether it is there at all."""

    kind: PropertyType
    present: sa.ColumnElement[bool]
    text: sa.ColumnElement[Any]
    number: sa.ColumnElement[Any] | None = None
    moment: sa.ColumnElement[Any] | None = None
    json: sa.ColumnElement[Any] | None = None  # the JSONB value, for properties


def _property_operand(column: sa.ColumnElement[Any], key: str, kind: PropertyType) -> Operand:
    value = column[key]
    typeof = sa.func.jsonb_typeof(value)
    text = value.astext
    return Operand(
        kind=kind,
        present=column.has_key(key),
        text=sa.case((typeof == "string", text), else_=None),
        number=sa.case((typeof == "number", sa.cast(text, sa.Numeric)), else_=None),
        moment=sa.case(
            (
                sa.and_(typeof == "string", text.regexp_match(r"^\d{4}-\d{2}-\d{2}[Tt ]")),
                sa.cast(text, sa.DateTime(timezone=True)),
            ),
            else_=None,
        ),
        json=value,
    )


def like_pattern(pattern: str) -> str:
    """A `*`/`?` wildcard pattern as a LIKE pattern (with `\\` escaping): LIKE never backtracks
    without bound, as a regular expression could."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _text_operand(column: sa.ColumnElement[Any]) -> Operand:
    return Operand(kind=T.STRING, present=column != "", text=column)


def _moment(value: Any) -> datetime:
    parsed = parse_datetime(value)
    assert parsed is not None  # validated
    return parsed


def _compare(
    operand: Operand, operator: pb.Operator.ValueType, value: Any, now: datetime
) -> sa.ColumnElement[bool]:
    compared: sa.ColumnElement[bool] = _compare_any(operand, operator, value, now)
    return compared


def _compare_any(operand: Operand, operator: pb.Operator.ValueType, value: Any, now: datetime) -> Any:
    kind = operand.kind
    if operator == Op.OPERATOR_EXISTS:
        return operand.present
    if operator == Op.OPERATOR_NOT_EXISTS:
        return sa.not_(operand.present)
    if operator == Op.OPERATOR_NOT_EQUALS:
        return sa.not_(sa.func.coalesce(_compare(operand, Op.OPERATOR_EQUALS, value, now), sa.false()))
    if operator == Op.OPERATOR_CONTAINS:
        if kind == T.LIST and operand.json is not None:
            return operand.json.contains(sa.literal([value], JSONB))
        return sa.func.strpos(sa.func.lower(operand.text), str(value).lower()) > 0
    if operator == Op.OPERATOR_STARTS_WITH:
        return sa.func.starts_with(sa.func.lower(operand.text), str(value).lower())
    if operator == Op.OPERATOR_MATCHES:
        return sa.func.lower(operand.text).like(like_pattern(str(value).lower()), escape="\\")
    if kind == T.NUMBER and operand.number is not None:
        target: Any = operand.number
        convert: Any = lambda v: sa.literal(v, sa.Numeric)  # noqa: E731
    elif kind == T.DATETIME and operand.moment is not None:
        target = operand.moment
        convert = lambda v: sa.literal(_moment(v), sa.DateTime(timezone=True))  # noqa: E731
    elif kind == T.BOOLEAN and operand.json is not None:
        target = operand.json
        convert = lambda v: sa.literal(v, JSONB)  # noqa: E731
    else:
        target = operand.text
        convert = lambda v: sa.literal(str(v))  # noqa: E731
    if operator == Op.OPERATOR_EQUALS:
        return target == convert(value)
    if operator == Op.OPERATOR_IN:
        return target.in_([convert(v) for v in value])
    if operator == Op.OPERATOR_BETWEEN:
        return target.between(convert(value[0]), convert(value[1]))
    if operator == Op.OPERATOR_BEFORE:
        return target < convert(value)
    if operator == Op.OPERATOR_AFTER:
        return target > convert(value)
    if operator == Op.OPERATOR_WITHIN_LAST_DAYS:
        return target.between(now - timedelta(days=float(value)), now)
    if operator == Op.OPERATOR_WITHIN_NEXT_DAYS:
        return target.between(now, now + timedelta(days=float(value)))
    return target.op(_ORDERING[operator])(convert(value))


def _never_null(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[bool]:
    return sa.func.coalesce(condition, sa.false())


def _property(
    condition: pb.PropertyCondition, column: sa.ColumnElement[Any], subject: str, ctx: Context
) -> sa.ColumnElement[bool]:
    value = _python(condition.value) if condition.HasField("value") else None
    kind = ctx.types.get((subject, condition.property))
    if kind is None:
        sample = value[0] if isinstance(value, list) and value else value
        kind = _value_type(sample) or T.STRING
        if condition.operator in _DATE_ONLY:
            kind = T.DATETIME
    return _never_null(
        _compare(_property_operand(column, condition.property, kind), condition.operator, value, ctx.now)
    )


def _age(now: datetime) -> sa.ColumnElement[Any]:
    return sa.func.date_part("year", sa.func.age(sa.literal(now.date(), sa.Date), users.c.date_of_birth))


def _profile(condition: pb.ProfileCondition, ctx: Context) -> sa.ColumnElement[bool]:
    value = _python(condition.value) if condition.HasField("value") else None
    field_ = condition.field
    if field_ == pb.ProfileField.PROFILE_FIELD_AGE:
        operand = Operand(T.NUMBER, users.c.date_of_birth.is_not(None), sa.null(), number=_age(ctx.now))
    elif field_ == pb.ProfileField.PROFILE_FIELD_DATE_OF_BIRTH:
        operand = Operand(
            T.DATETIME,
            users.c.date_of_birth.is_not(None),
            sa.null(),
            moment=sa.cast(users.c.date_of_birth, sa.DateTime(timezone=True)),
        )
    else:
        operand = _text_operand(_PROFILE_TEXT[field_])
    return _never_null(_compare(operand, condition.operator, value, ctx.now))


def _radius(condition: pb.RadiusCondition) -> sa.ColumnElement[bool]:
    lat, lon = sa.func.radians(users.c.latitude), sa.func.radians(users.c.longitude)
    within = []
    for circle in condition.circles:
        c_lat, c_lon = math.radians(circle.latitude), math.radians(circle.longitude)
        # Haversine distance; a bounding box on latitude first lets the index narrow the rows.
        a = sa.func.power(sa.func.sin((lat - c_lat) / 2), 2) + math.cos(c_lat) * sa.func.cos(
            lat
        ) * sa.func.power(sa.func.sin((lon - c_lon) / 2), 2)
        distance = 2 * EARTH_RADIUS_KM * sa.func.asin(sa.func.least(1.0, sa.func.sqrt(a)))
        degrees = circle.radius_km / 111.195
        within.append(
            sa.and_(
                users.c.latitude.between(circle.latitude - degrees, circle.latitude + degrees),
                distance <= circle.radius_km,
            )
        )
    return _never_null(sa.and_(users.c.latitude.is_not(None), sa.or_(*within)))


def _reachability(condition: pb.ReachabilityCondition) -> sa.ColumnElement[bool]:
    tests = {
        pb.Reachability.REACHABILITY_HAS_EMAIL: users.c.email != "",
        pb.Reachability.REACHABILITY_HAS_PHONE: users.c.phone != "",
        pb.Reachability.REACHABILITY_EMAIL_UNSUBSCRIBED: users.c.email_unsubscribed,
        pb.Reachability.REACHABILITY_SMS_UNSUBSCRIBED: users.c.sms_unsubscribed,
    }
    test = tests[condition.reachability]
    return test if condition.is_true else sa.not_(test)


def _device_where(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[bool]:
    """Some device of the user satisfies the condition."""
    return sa.exists(
        sa.select(1).where(
            devices.c.account_id == users.c.account_id, devices.c.user_id == users.c.user_id, condition
        )
    )


def _app(condition: pb.AppFieldCondition, ctx: Context) -> sa.ColumnElement[bool]:
    value = _python(condition.value) if condition.HasField("value") else None
    operand = _text_operand(_APP_COLUMNS[condition.field])
    if condition.field == pb.AppField.APP_FIELD_PUSH_TOKEN_TYPE:
        operand = Operand(T.STRING, operand.text != "PUSH_TOKEN_TYPE_UNSPECIFIED", operand.text)
    elif condition.field == pb.AppField.APP_FIELD_PLATFORM:
        operand = Operand(T.STRING, operand.text != "PLATFORM_UNSPECIFIED", operand.text)
    return _device_where(_never_null(_compare(operand, condition.operator, value, ctx.now)))


def _window(window: pb.TimeWindow, ctx: Context) -> tuple[datetime, datetime]:
    which = window.WhichOneof("window")
    if which == "last_days":
        return ctx.now - timedelta(days=window.last_days), ctx.now
    if which == "between":
        return api.from_timestamp(window.between.start_time), api.from_timestamp(window.between.end_time)
    return api.from_timestamp(window.since), ctx.now


# An event's properties: in its row (and so in the covering index), or, for the few too large
# for an index entry, in event_bodies under the client event id the row holds as a JSON string.
EVENT_PROPERTIES: Any = sa.type_coerce(
    Grouping(  # in parentheses, so that a subscript applies to the whole expression
        sa.case(
            (
                sa.func.jsonb_typeof(events.c.properties) == "string",
                sa.select(event_bodies.c.properties)
                .where(
                    event_bodies.c.account_id == events.c.account_id,
                    event_bodies.c.client_event_id
                    == events.c.properties.op("#>>")(sa.literal_column("'{}'")),
                )
                .scalar_subquery(),
            ),
            else_=events.c.properties,
        )
    ),
    JSONB,
)


def _event_rows(
    condition: pb.EventCondition, ctx: Context, windowed: bool = True
) -> list[sa.ColumnElement[bool]]:
    where = [events.c.account_id == ctx.account_id]
    if ctx.only_users is not None:
        where.append(text_in(events.c.user_id, ctx.only_users))
    if condition.event_name:
        where.append(events.c.name == condition.event_name)
    where.append(event_where(condition.where, EVENT_PROPERTIES, condition.event_name, ctx))
    if windowed and condition.HasField("window"):
        start, end = _window(condition.window, ctx)
        where.extend([events.c.occurred_at >= start, events.c.occurred_at < end])
    return where


def _event(condition: pb.EventCondition, ctx: Context) -> sa.ColumnElement[bool]:
    """Whether the user did (or did not) do the event as described: membership of the set of
    users whose events match."""
    occurrence = condition.occurrence
    if occurrence != pb.Occurrence.OCCURRENCE_UNSPECIFIED:
        start, end = _window(condition.window, ctx)
        moment = sa.func.min if occurrence == pb.Occurrence.OCCURRENCE_FIRST_TIME else sa.func.max
        members = (
            sa.select(events.c.user_id)
            .where(*_event_rows(condition, ctx, windowed=False))
            .group_by(events.c.user_id)
            .having(moment(events.c.occurred_at).between(start, end))
        )
        did: sa.ColumnElement[bool] = users.c.user_id.in_(members)
    else:
        did = _counted(condition, ctx)
    return sa.not_(did) if condition.did_not else did


def _counted(condition: pb.EventCondition, ctx: Context) -> sa.ColumnElement[bool]:
    rows = _event_rows(condition, ctx)
    operator, n = (
        (condition.count.operator, condition.count.value)
        if condition.HasField("count")
        else (
            Op.OPERATOR_GREATER_THAN_OR_EQUAL,
            1,
        )
    )

    def having(test: Any) -> sa.ColumnElement[bool]:
        grouped = sa.select(events.c.user_id).where(*rows).group_by(events.c.user_id).having(test)
        return users.c.user_id.in_(grouped)

    count = sa.func.count()
    if operator == Op.OPERATOR_GREATER_THAN_OR_EQUAL:
        if n <= 0:
            return sa.true()
        if n == 1:
            return users.c.user_id.in_(sa.select(events.c.user_id).where(*rows))
        return having(count >= n)
    if operator == Op.OPERATOR_LESS_THAN_OR_EQUAL:
        return sa.not_(having(count >= n + 1))
    if n == 0:
        return sa.not_(users.c.user_id.in_(sa.select(events.c.user_id).where(*rows)))
    return having(count == n)


def _constant(condition: pb.ConstantPropertyCondition, ctx: Context) -> sa.ColumnElement[bool]:
    key = condition.property
    # As text: hashing text is much cheaper than hashing jsonb, and a property keeps one type.
    value = EVENT_PROPERTIES[key].astext
    sets = []
    for event in condition.events:
        rows = [*_event_rows(event, ctx), EVENT_PROPERTIES.has_key(key)]
        query = sa.select(events.c.user_id, value.label("v")).where(*rows)
        if event.HasField("count") and event.count.value > 1:
            query = query.group_by(events.c.user_id, value).having(sa.func.count() >= event.count.value)
        sets.append(query)  # INTERSECT removes duplicates itself: no grouping without a count
    shared = sa.intersect(*sets).subquery()
    return users.c.user_id.in_(sa.select(shared.c.user_id))


def _condition(condition: pb.Condition, ctx: Context) -> sa.ColumnElement[bool]:
    kind = condition.WhichOneof("kind")
    if kind == "property":
        return _property(condition.property, users.c.properties, USER, ctx)
    if kind == "profile":
        return _profile(condition.profile, ctx)
    if kind == "radius":
        return _radius(condition.radius)
    if kind == "reachability":
        return _reachability(condition.reachability)
    if kind == "app":
        return _app(condition.app, ctx)
    if kind == "event":
        return _event(condition.event, ctx)
    if kind == "constant_property":
        return _constant(condition.constant_property, ctx)
    if kind == "in_list":
        list_id = api.parse_uuid_name(condition.in_list, "lists")
        return in_list(list_id, ctx)
    if kind == "in_segment":
        return to_sql(ctx.segments[condition.in_segment], ctx)
    assert kind == "group"
    return to_sql(condition.group, ctx)


def in_list(list_id: Any, ctx: Context) -> sa.ColumnElement[bool]:
    """The user is a member of the list."""
    members = sa.select(list_members.c.user_id).where(
        list_members.c.account_id == ctx.account_id, list_members.c.list_id == list_id
    )
    if ctx.only_users is not None:
        members = members.where(text_in(list_members.c.user_id, ctx.only_users))
    return users.c.user_id.in_(members)


def event_where(
    where: Sequence[pb.PropertyCondition], column: Any, event_name: str, ctx: Context
) -> sa.ColumnElement[bool]:
    """All of an event condition's `where` tests, on a JSONB column of event properties."""
    subject = event_subject(event_name)
    return sa.and_(sa.true(), *[_property(w, column, subject, ctx) for w in where])


def reads_now(where: Sequence[pb.PropertyCondition]) -> bool:
    """Whether event_where's SQL for these tests depends on the Context's `now`."""
    return any(w.operator in _RELATIVE_TO_NOW for w in where)


def validate_event_where(
    where: Sequence[pb.PropertyCondition], event_name: str, path: str, check: Validator, types: Typed
) -> None:
    """Checks `where` tests on an event's properties, each reported at `{path}[i]`."""
    subject = event_subject(event_name)
    for i, condition in enumerate(where):
        _validate_property(condition, f"{path}[{i}]", subject, check, types)


def to_sql(segment_filter: pb.SegmentFilter, ctx: Context) -> sa.ColumnElement[bool]:
    """The filter as one condition on `users` (the caller scopes it to the account)."""
    parts: list[sa.ColumnElement[bool]] = [_condition(c, ctx) for c in segment_filter.all_of]
    if segment_filter.any_of:
        parts.append(sa.or_(*[_condition(c, ctx) for c in segment_filter.any_of]))
    if segment_filter.none_of:
        parts.append(sa.not_(sa.or_(*[_condition(c, ctx) for c in segment_filter.none_of])))
    return sa.and_(sa.true(), *parts)


def reachable(channel: int) -> sa.ColumnElement[bool]:
    """Who of an audience a channel can reach."""
    if channel == pb.Channel.CHANNEL_SMS:
        return sa.and_(users.c.phone != "", sa.not_(users.c.sms_unsubscribed))
    if channel == pb.Channel.CHANNEL_WEB_POPUP:
        # A web device on the profile, or a page the web SDK reported (anonymous visitors have
        # no device).
        viewed_a_page = (
            sa.select(sa.literal(1))
            .where(
                events.c.account_id == users.c.account_id,
                events.c.user_id == users.c.user_id,
                events.c.name == PAGE_VIEWED,
            )
            .exists()
        )
        return sa.or_(_device_where(devices.c.platform == "PLATFORM_WEB"), viewed_a_page)
    return sa.true()
