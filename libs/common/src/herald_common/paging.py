"""Newest-first keyset pagination over tables keyed by (created_at, id)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from herald_common import api


async def newest_first_page(
    session: AsyncSession,
    table: sa.Table,
    size: int,
    token: str,
    *where: sa.ColumnElement[bool],
) -> tuple[Sequence[Any], str]:
    """One page of rows and the token of the next page ('' at the end)."""
    limit = api.page_size(size)
    after = api.decode_page_token(token, 2)
    created_at, row_id = table.c.created_at, table.c.id
    query = sa.select(table).where(*where).order_by(created_at.desc(), row_id.desc())
    if after is not None:
        query = query.where(
            sa.tuple_(created_at, row_id)
            < sa.tuple_(sa.cast(after[0], created_at.type), sa.cast(after[1], row_id.type))
        )
    rows = (await session.execute(query.limit(limit + 1))).all()
    if len(rows) <= limit:
        return rows, ""
    rows = rows[:limit]
    return rows, api.encode_page_token(rows[-1].created_at.isoformat(), str(rows[-1].id))
