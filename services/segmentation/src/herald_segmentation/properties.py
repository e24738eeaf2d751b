"""Types of custom properties: each keeps the type it was first sent with, per account."""

from __future__ import annotations

import enum
import re
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from google.protobuf import json_format
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from herald_segmentation.storage import property_types

USER = "user"
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?([Zz]|[+-]\d{2}:\d{2})$")


class PropertyType(enum.Enum):
    STRING = "string"
    NUMBER = "number"
    BOOLEAN = "boolean"
    DATETIME = "datetime"
    LIST = "list"  # of strings
    OBJECT = "object"


def event_subject(event_name: str) -> str:
    return f"event:{event_name}"


def parse_datetime(text: str) -> datetime | None:
    """An RFC 3339 date-time with its offset, or None."""
    if not _RFC3339.match(text):
        return None
    try:
        return datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        return None


def type_of(value: Any) -> PropertyType | None:
    """The type of a property value as JSON gives it; None for null (which says nothing)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return PropertyType.BOOLEAN
    if isinstance(value, int | float):
        return PropertyType.NUMBER
    if isinstance(value, str):
        return PropertyType.DATETIME if parse_datetime(value) else PropertyType.STRING
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


def value_problem(value: Any) -> str | None:
    if isinstance(value, list) and not all(isinstance(v, str) for v in value):
        return "a list property holds strings only"
    return None


Typed = dict[tuple[str, str], PropertyType]  # (subject, key) -> type


async def known_types(session: AsyncSession, account_id: uuid.UUID, keys: Iterable[tuple[str, str]]) -> Typed:
    wanted = set(keys)
    if not wanted:
        return {}
    rows = await session.execute(
        sa.select(property_types.c.subject, property_types.c.key, property_types.c.type).where(
            property_types.c.account_id == account_id,
            sa.tuple_(property_types.c.subject, property_types.c.key).in_(sorted(wanted)),
        )
    )
    return {(r.subject, r.key): PropertyType(r.type) for r in rows}


async def record_types(
    session: AsyncSession, account_id: uuid.UUID, seen: Mapping[tuple[str, str], PropertyType]
) -> Typed:
    """Records the types of properties not seen before; returns every type now on record for
    them (a concurrent writer may have recorded another type first)."""
    if not seen:
        return {}
    await session.execute(
        insert(property_types)
        .on_conflict_do_nothing()
        .values(
            [
                {"account_id": account_id, "subject": subject, "key": key, "type": kind.value}
                for (subject, key), kind in sorted(seen.items())
            ]
        )
    )
    return await known_types(session, account_id, seen)
