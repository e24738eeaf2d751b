"""Checks every API request gets before anything is stored: values PostgreSQL or JSON cannot hold.

A NUL character cannot be stored in PostgreSQL text or JSONB, and NaN/Infinity are not JSON; both
are refused as INVALID_ARGUMENT naming the field, never left to fail as INTERNAL deep inside.
Enum fields must hold a value their enum defines.
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
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
    for field, value in message.ListFields():
        if len(found) >= _MAX_PROBLEMS:
            break
        if field.type == FieldDescriptor.TYPE_STRING:
            items = enumerate(value) if field.is_repeated else [(None, value)]
            found += [_at(path, field.name, i) for i, text in items if "\x00" in text]
        elif field.message_type is not None:
            if field.message_type.full_name.startswith("google.protobuf."):
                continue
            if field.message_type.GetOptions().map_entry:
                for key, item in value.items():
                    if isinstance(key, str) and "\x00" in key:
                        found.append(_at(path, field.name, "key"))
                    elif isinstance(item, str) and "\x00" in item:
                        found.append(_at(path, field.name, key))
                    elif isinstance(item, Message):
                        nul_fields(item, f"{_at(path, field.name, key)}.", found)
            elif field.is_repeated:
                for i, item in enumerate(value):
                    nul_fields(item, f"{_at(path, field.name, i)}.", found)
            else:
                nul_fields(value, f"{path}{field.name}.", found)
    return found[:_MAX_PROBLEMS]


def _at(path: str, name: str, index: object) -> str:
    return f"{path}{name}" if index is None else f"{path}{name}[{index}]"
