"""Keyset pagination over (timestamp, uuid) keys, with opaque page tokens."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from herald_common import api
from herald_common.errors import invalid


def _decode(token: str) -> tuple[datetime, uuid.UUID] | None:
    keys = api.decode_page_token(token, 2)
    if keys is None:
        return None
    try:
        return datetime.fromisoformat(keys[0]), uuid.UUID(keys[1])
    except ValueError:
        raise invalid("page_token", "not a token this API returned") from None


async def keyset_page(
    session: AsyncSession,
    table: sa.Table,
    size: int,
    token: str,
    *where: sa.ColumnElement[bool],
    time_column: str = "created_at",
    newest_first: bool = True,
) -> tuple[Sequence[Any], str]:
    """One page of rows ordered by (time_column, id), and the next page's token ('' at the end)."""
    limit = api.page_size(size)
    after = _decode(token)
    key = sa.tuple_(table.c[time_column], table.c.id)
    order = (
        [table.c[time_column].desc(), table.c.id.desc()]
        if newest_first
        else [table.c[time_column], table.c.id]
    )
    query = sa.select(table).where(*where).order_by(*order)
    if after is not None:
        bound = sa.tuple_(
            sa.literal(after[0], table.c[time_column].type), sa.literal(after[1], table.c.id.type)
        )
        query = query.where(key < bound if newest_first else key > bound)
    rows = (await session.execute(query.limit(limit + 1))).all()
    if len(rows) <= limit:
        return rows, ""
    rows = rows[:limit]
    last = rows[-1]
    return rows, api.encode_page_token(getattr(last, time_column).isoformat(), str(last.id))
