"""An audience stream's members, fixed when the stream starts and kept in PostgreSQL.

The first members in user id order are written at once, so the first page goes out without
waiting for the whole of a large audience; the others are written meanwhile, in a transaction
that imports the PostgreSQL snapshot the first one was chosen in. All are chosen from the data of
one moment, as if written together.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from herald_common.db import Database
from herald_segmentation.storage import audience_snapshots, users

# The users considered before the first page is read: a few pages' worth, quick to choose from.
FIRST_MEMBERS = 10_000
# A snapshot left behind by a stream that ended without cleaning up is removed after this long.
SNAPSHOT_HOURS = 24
# What pg_export_snapshot() returns (SET TRANSACTION SNAPSHOT takes no bound parameter).
_SNAPSHOT_NAME = re.compile(r"[0-9A-F]+-[0-9A-F]+(-[0-9]+)?")

# Chooses the members, as (user_id, left_out), reading what it needs in the given session.
Chooser = Callable[[AsyncSession], Awaitable[sa.Select[Any]]]


class AudienceSnapshot:
    """One stream's members: `fill` writes them, `wait` until all are written, `forget` removes them."""

    def __init__(
        self, database: Database, account_id: uuid.UUID, settings: tuple[sa.TextClause, ...]
    ) -> None:
        self.database = database
        self.account_id = account_id
        self.snapshot_id = uuid.uuid4()
        self.settings = settings  # SET LOCAL statements for the statements that choose members
        self._first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._filling: asyncio.Task[None] | None = None

    async def fill(self, choose: Chooser, after: str, *, in_order: bool) -> None:
        """Starts writing the members with user ids after `after`; returns once the first of them
        are written. `in_order`: members can be chosen a user id range at a time (no sample to
        draw), so the first ones go ahead of the rest."""
        self._filling = asyncio.create_task(self._fill(choose, after, in_order))
        await asyncio.wait({self._first, self._filling}, return_when=asyncio.FIRST_COMPLETED)
        if not self._first.done():
            self._filling.result()  # raises what went wrong (an unknown segment, say)

    @property
    def complete(self) -> bool:
        """Every member is written (or writing them failed, which `wait` raises)."""
        return self._filling is not None and self._filling.done()

    async def wait(self) -> None:
        """Until every member is written; raises what went wrong."""
        if self._filling is not None:
            await self._filling

    async def forget(self) -> None:
        if self._filling is not None:
            self._filling.cancel()
            with contextlib.suppress(BaseException):
                await self._filling
        async with self.database.transaction() as session:
            await session.execute(
                sa.delete(audience_snapshots).where(audience_snapshots.c.snapshot_id == self.snapshot_id)
            )

    async def _fill(self, choose: Chooser, after: str, in_order: bool) -> None:
        # The transaction whose snapshot the members are chosen in, open until all are written.
        async with self.database.engine.connect() as connection:
            holder = await connection.execution_options(isolation_level="REPEATABLE READ")
            async with holder.begin():
                exported = str(await holder.scalar(sa.text("SELECT pg_export_snapshot()")))
                if not _SNAPSHOT_NAME.fullmatch(exported):
                    raise RuntimeError(f"unexpected snapshot name {exported!r}")
                async with AsyncSession(bind=holder) as session:
                    members = await choose(session)
                # The first members are those among the account's next FIRST_MEMBERS users: a
                # range of the users' key, quick to choose however few of them the audience holds.
                until = (
                    await holder.scalar(
                        sa.select(users.c.user_id)
                        .where(users.c.account_id == self.account_id, users.c.user_id > after)
                        .order_by(users.c.user_id)
                        .offset(FIRST_MEMBERS - 1)
                        .limit(1)
                    )
                    if in_order
                    else None
                )
                await self._write(exported, members, after, until, first=True)
                self._first.set_result(None)
                if until is not None:
                    await self._write(exported, members, until, None)

    async def _write(
        self, exported: str, members: sa.Select[Any], after: str, until: str | None, *, first: bool = False
    ) -> None:
        """Writes the members with user ids after `after` (up to `until`), in the exported snapshot."""
        async with self.database.engine.connect() as connection:
            writer = await connection.execution_options(isolation_level="REPEATABLE READ")
            async with writer.begin():
                await writer.execute(sa.text(f"SET TRANSACTION SNAPSHOT '{exported}'"))
                for setting in self.settings:
                    await writer.execute(setting)
                if first:
                    await _remove_abandoned(writer)
                chosen = members.subquery()
                picked = sa.select(
                    sa.literal(self.snapshot_id),
                    sa.literal(self.account_id),
                    chosen.c.user_id,
                    chosen.c.left_out,
                ).where(chosen.c.user_id > after)
                if until is not None:
                    picked = picked.where(chosen.c.user_id <= until)
                await writer.execute(
                    sa.insert(audience_snapshots).from_select(
                        ["snapshot_id", "account_id", "user_id", "left_out"], picked
                    )
                )


async def _remove_abandoned(connection: AsyncConnection) -> None:
    await connection.execute(
        sa.delete(audience_snapshots).where(
            audience_snapshots.c.created_at < sa.func.now() - sa.text(f"interval '{SNAPSHOT_HOURS} hours'")
        )
    )
