"""Checks every API request gets before anything is stored: values PostgreSQL or JSON cannot hold.

A NUL character cannot be stored in PostgreSQL text or JSONB, and NaN/Infinity are not JSON; both
are refused as INVALID_ARGUMENT naming the field, never left to fail as INTERNAL deep inside.
Enum fields must hold a value their enum defines.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from herald_common.errors import Validator

_MAX_PROBLEMS = 20


def check_text_fields(message: Message, path: str, check: Validator) -> None:
    """Adds a violation for each string with a NUL, number that is NaN/Infinity, or unknown enum."""
    problems: list[tuple[str, str]] = []
    _walk(message, path, problems)
    for field, description in problems[:_MAX_PROBLEMS]:
        check.add(field, description)


def _walk(message: Message, path: str, problems: list[tuple[str, str]]) -> None:
    for field, value in message.ListFields():
        name = f"{path}.{field.name}" if path else field.name
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for key, item in value.items():
                _check_scalar(field.message_type.fields_by_name["key"], key, f"{name}[{key!r}] key", problems)
                _check_value(value_field, item, f"{name}[{key!r}]", problems)
        elif field.is_repeated:
            for i, item in enumerate(value):
                _check_value(field, item, f"{name}[{i}]", problems)
        else:
            _check_value(field, value, name, problems)


def _check_value(field: FieldDescriptor, value: Any, name: str, problems: list[tuple[str, str]]) -> None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        _walk(value, name, problems)
    else:
        _check_scalar(field, value, name, problems)


def _check_scalar(field: FieldDescriptor, value: Any, name: str, problems: list[tuple[str, str]]) -> None:
    if isinstance(value, str) and "\x00" in value:
        problems.append((name, "must not contain NUL characters"))
    elif isinstance(value, float) and not math.isfinite(value):
        problems.append((name, "must be a finite number, not NaN or Infinity"))
    elif field.enum_type is not None and field.enum_type.values_by_number.get(value) is None:
        valid = ", ".join(v.name for v in field.enum_type.values if v.number != 0)
        problems.append((name, f"unknown value {value}; one of {valid}"))


def nul_fields(message: Message, path: str = "", found: list[str] | None = None) -> list[str]:
    """The string fields (and map keys) holding a NUL character, at most _MAX_PROBLEMS of them.
    Well-known types are left to the checks that read them (properties, filter values): walking a
    Struct field by field costs a hundred times more than the rest of a request."""
    found = [] if found is None else found
    plan = _plan(message.DESCRIPTOR)
    for name in plan.texts:
        if "\x00" in getattr(message, name):
            found.append(f"{path}{name}")
    for name in plan.repeated_texts:
        found += [_at(path, name, i) for i, text in enumerate(getattr(message, name)) if "\x00" in text]
    for name in plan.maps:
        for key, item in getattr(message, name).items():
            if isinstance(key, str) and "\x00" in key:
                found.append(_at(path, name, "key"))
            elif isinstance(item, str) and "\x00" in item:
                found.append(_at(path, name, key))
            elif isinstance(item, Message):
                nul_fields(item, f"{_at(path, name, key)}.", found)
    for name in plan.repeated_messages:
        for i, item in enumerate(getattr(message, name)):
            nul_fields(item, f"{_at(path, name, i)}.", found)
            if len(found) >= _MAX_PROBLEMS:
                break
    for name in plan.messages:
        if message.HasField(name):
            nul_fields(getattr(message, name), f"{path}{name}.", found)
    return found[:_MAX_PROBLEMS]


class _Plan(NamedTuple):
    """A message type's fields that may hold text, by how nul_fields reads them."""

    texts: list[str]
    repeated_texts: list[str]
    maps: list[str]
    repeated_messages: list[str]
    messages: list[str]


@functools.cache
def _plan(descriptor: Descriptor) -> _Plan:
    """Made once per message type: reading each field by name is three times cheaper than
    ListFields, which also hands over the well-known types skipped here."""
    plan = _Plan([], [], [], [], [])
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            (plan.repeated_texts if field.is_repeated else plan.texts).append(field.name)
        elif field.message_type is None or field.message_type.full_name.startswith("google.protobuf."):
            continue
        elif field.message_type.GetOptions().map_entry:
            plan.maps.append(field.name)
        else:
            (plan.repeated_messages if field.is_repeated else plan.messages).append(field.name)
    return plan


def _at(path: str, name: str, index: object) -> str:
    return f"{path}{name}" if index is None else f"{path}{name}[{index}]"
