"""Types of custom properties: each keeps the type it was first sent with, per account."""

from __future__ import annotations

import enum
import math
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format, struct_pb2

from herald_common.db import Database, Statement, Target
from herald_common.errors import Validator
from herald_common.timing import parse_datetime
from herald_segmentation.storage import SCHEMA

USER = "user"


class PropertyType(enum.Enum):
    STRING = "string"
    NUMBER = "number"
    BOOLEAN = "boolean"
    DATETIME = "datetime"
    LIST = "list"  # of strings
    OBJECT = "object"

    # Members are singletons: hashed by identity, in C, not by name in Python as Enum does. Types
    # are keys of sets and dicts for every event ingested.
    __hash__ = object.__hash__


def event_subject(event_name: str) -> str:
    return f"event:{event_name}"


def _text_type(value: str) -> PropertyType:
    """A string property's type: a date-time when it reads as one."""
    return PropertyType.DATETIME if parse_datetime(value) else PropertyType.STRING


def type_of(value: Any) -> PropertyType | None:
    """The type of a property value as JSON gives it; None for null (which says nothing)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return PropertyType.BOOLEAN
    if isinstance(value, int | float):
        return PropertyType.NUMBER
    if isinstance(value, str):
        return _text_type(value)
    if isinstance(value, list):
        return PropertyType.LIST
    return PropertyType.OBJECT


def as_python(message: Any) -> Any:
    """A Struct or Value as plain Python; None when it holds a number JSON cannot carry (NaN,
    infinities), which check_text_fields reports at its exact path."""
    try:
        return json_format.MessageToDict(message)
    except ValueError:
        return None


def struct_values(struct: struct_pb2.Struct, path: str, check: Validator) -> dict[str, Any]:
    """A Struct as plain Python (as json_format gives it, several times faster), reporting what
    JSON or PostgreSQL cannot hold (NaN, infinities, NUL characters) at its path."""
    values = {}
    for key, item in struct.fields.items():
        check.require("\x00" not in key, f"{path}.{key}", "NUL characters are not allowed in keys")
        values[key] = _plain(item, f"{path}.{key}", check)
    return values


def plain_properties(struct: struct_pb2.Struct) -> tuple[dict[str, Any], dict[str, PropertyType]] | None:
    """The common case, checked in one pass with no paths built: flat properties (strings,
    finite numbers, booleans, nulls, lists of strings) within every bound. Returns the values and
    the type of each non-null one, or None when anything needs a closer look: struct_values and
    check_properties then say what, at its path."""
    fields = struct.fields
    if len(fields) > MAX_PROPERTY_KEYS:
        return None
    values: dict[str, Any] = {}
    types: dict[str, PropertyType] = {}
    for key in fields:  # faster than .items() on a protobuf map
        if not _key_allowed(key):
            return None
        item = fields[key]
        kind = item.WhichOneof("kind")
        # Each kind checked and typed in its own branch: this runs for every property of every event.
        if kind == "number_value":
            value: Any = item.number_value
            if not math.isfinite(value):
                return None
            types[key] = PropertyType.NUMBER
        elif kind == "string_value":
            value = item.string_value
            if _string_problem(value) is not None:
                return None
            types[key] = _text_type(value)
        elif kind == "bool_value":
            value = item.bool_value
            types[key] = PropertyType.BOOLEAN
        elif kind == "list_value":
            items = item.list_value.values
            if not all(v.WhichOneof("kind") == "string_value" for v in items):
                return None
            value = [v.string_value for v in items]
            if value_problem(value) is not None:
                return None
            types[key] = PropertyType.LIST
        elif kind == "null_value":
            value = None
        else:
            return None
        values[key] = value
    return values, types


def _plain(item: struct_pb2.Value, path: str, check: Validator) -> Any:
    kind = item.WhichOneof("kind")
    if kind == "string_value":
        check.require("\x00" not in item.string_value, path, "NUL characters are not allowed")
        return item.string_value
    if kind == "number_value":
        return (
            item.number_value
            if check.require(math.isfinite(item.number_value), path, "must be finite")
            else None
        )
    if kind == "bool_value":
        return item.bool_value
    if kind == "struct_value":
        return struct_values(item.struct_value, path, check)
    if kind == "list_value":
        return [_plain(v, f"{path}[{i}]", check) for i, v in enumerate(item.list_value.values)]
    return None


# Bounds on one custom property (templates render them per recipient, audiences carry them):
# a string's characters, a list's items, and the distinct keys one request may set on a subject.
MAX_STRING_CHARACTERS = 16 * 1024
MAX_LIST_ITEMS = 256
MAX_PROPERTY_KEYS = 1000
# Profile keys a browser (a publishable key) may never set: contact fields, identities,
# subscription state and the other system fields, which only the account's server sets.
SERVER_ONLY_KEYS = frozenset(
    {
        "email",
        "phone",
        "identities",
        "subscriptions",
        "sms_unsubscribed",
        "email_unsubscribed",
        "push_unsubscribed",
        "devices",
        "gender",
        "date_of_birth",
        "country",
        "region",
        "city",
        "latitude",
        "longitude",
    }
)


def value_problem(value: Any) -> str | None:
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            return "a list property holds strings only"
        if len(value) > MAX_LIST_ITEMS:
            return f"a list of {len(value):,} items; at most {MAX_LIST_ITEMS}"
        return next((p for p in map(_string_problem, value) if p is not None), None)
    if isinstance(value, str):
        return _string_problem(value)
    return None


def _string_problem(value: str) -> str | None:
    if len(value) > MAX_STRING_CHARACTERS:
        return f"{len(value):,} characters; a string property holds at most {MAX_STRING_CHARACTERS:,}"
    if "\x00" in value:
        return "contains a NUL character"
    return None


Typed = dict[tuple[str, str], PropertyType]  # (subject, key) -> type


# Types on record never change: each process keeps those it has read from committed rows.
_ON_RECORD: dict[uuid.UUID, Typed] = {}


_READ_TYPES = Statement(
    f"""
    SELECT t.subject, t.key, t.type FROM {SCHEMA}.property_types t
    JOIN unnest(CAST(:subjects AS text[]), CAST(:keys AS text[])) AS k(subject, key)
      ON t.subject = k.subject AND t.key = k.key
    WHERE t.account_id = :account_id
    """
)
# In key order, so that two writers recording the same new keys cannot deadlock.
_RECORD_TYPES = Statement(
    f"""
    INSERT INTO {SCHEMA}.property_types (account_id, subject, key, type)
    SELECT :account_id, n.subject, n.key, n.type
    FROM unnest(CAST(:subjects AS text[]), CAST(:keys AS text[]), CAST(:types AS text[]))
         AS n(subject, key, type)
    ORDER BY n.subject, n.key
    ON CONFLICT DO NOTHING
    """
)


async def _read_types(target: Target, account_id: uuid.UUID, keys: set[tuple[str, str]]) -> Typed:
    if not keys:
        return {}
    ordered = sorted(keys)
    rows = await _READ_TYPES.fetch(
        target, account_id=account_id, subjects=[s for s, _ in ordered], keys=[k for _, k in ordered]
    )
    return {(r.subject, r.key): PropertyType(r.type) for r in rows}


async def known_types(target: Target, account_id: uuid.UUID, keys: Iterable[tuple[str, str]]) -> Typed:
    """The types on record for these properties. Call it in a transaction that writes nothing, so
    what it reads is committed and can be kept."""
    held = _ON_RECORD.setdefault(account_id, {})
    wanted = set(keys)
    held.update(await _read_types(target, account_id, wanted - held.keys()))
    return {key: held[key] for key in wanted if key in held}


async def record_types(
    target: Target, account_id: uuid.UUID, seen: Mapping[tuple[str, str], PropertyType]
) -> Typed:
    """Records the types of properties not seen before; returns every type now on record for
    them (a concurrent writer may have recorded another type first)."""
    held = _ON_RECORD.get(account_id, {})
    new = {key: kind for key, kind in seen.items() if key not in held}
    if not new:
        return {key: held[key] for key in seen}
    ordered = sorted(new.items())
    await _RECORD_TYPES.execute(
        target,
        account_id=account_id,
        subjects=[subject for (subject, _), _ in ordered],
        keys=[key for (_, key), _ in ordered],
        types=[kind.value for _, kind in ordered],
    )
    # Read inside this transaction, which may still roll back: not kept.
    return {
        **{key: held[key] for key in seen if key in held},
        **await _read_types(target, account_id, set(new)),
    }


def _key_allowed(key: str) -> bool:
    """A property key PostgreSQL can hold and a segment can name: 1-200 characters, no NUL."""
    return bool(key.strip()) and len(key) <= 200 and "\x00" not in key


def check_properties(properties: dict[str, Any], path: str, check: Validator) -> dict[str, PropertyType]:
    """Checks custom property values; returns the type of each non-null one."""
    found: dict[str, PropertyType] = {}
    if len(properties) > MAX_PROPERTY_KEYS:
        check.add(path, f"{len(properties):,} properties; at most {MAX_PROPERTY_KEYS:,}")
        return found
    for key, value in properties.items():
        if not _key_allowed(key):
            shown = key.replace("\x00", "\\0")
            check.add(f"{path}.{shown}", "keys are 1-200 characters, without NUL")
            continue  # not looked up: PostgreSQL cannot take it
        problem = value_problem(value)
        if problem is not None:
            check.add(f"{path}.{key}", problem)
            continue
        kind = type_of(value)
        if kind is not None:
            found[key] = kind
    return found


@dataclass
class SentTypes:
    """The types of the custom properties one request sends: each property must keep one type,
    within the request and as on record."""

    # (path of the properties, subject, key, type), the first sent of each: a property's own path
    # is made only to report it, and a batch repeats the same few.
    sent: dict[tuple[str, str, PropertyType], str] = field(default_factory=dict)
    first: dict[tuple[str, str], PropertyType] = field(default_factory=dict)

    def add(self, path: str, subject: str, types: Mapping[str, PropertyType]) -> None:
        """The types of the properties at `path` (for example `events[3].properties`)."""
        for key, kind in types.items():
            self.sent.setdefault((subject, key, kind), path)
            self.first.setdefault((subject, key), kind)

    def _against(self, on_record: Typed, check: Validator) -> None:
        for (subject, key, kind), path in self.sent.items():
            recorded = on_record.get((subject, key))
            if recorded is not None and recorded != kind:
                wanted = recorded.value
                problem = f"{key!r} was first sent as {wanted}; send a {wanted}, not a {kind.value}"
                check.add(f"{path}.{key}", problem)

    async def check(self, database: Database, account_id: uuid.UUID, check: Validator) -> None:
        """Against each other and against the types on record, before anything is written."""
        self._against(self.first, check)
        held = _ON_RECORD.get(account_id, {})
        if self.first.keys() <= held.keys():  # the usual case: nothing to read, no connection taken
            self._against(held, check)
            return
        async with database.connection() as connection:
            self._against(await known_types(connection, account_id, self.first), check)

    async def record(self, target: Target, account_id: uuid.UUID, check: Validator) -> None:
        """Records the new types in the writing transaction; raises if a concurrent writer recorded
        another type first (the transaction then rolls back)."""
        self._against(await record_types(target, account_id, self.first), check)
        check.raise_if_any()
