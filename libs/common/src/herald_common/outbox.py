"""Transactional outbox: events are written with the state change and published from PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from google.protobuf.message import Message
from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncSession

from herald_common.db import Database
from herald_common.logging import get_logger
from herald_common.loops import WakeableLoop

log = get_logger(__name__)


def _outbox_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("msg_id", sa.Text, nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    ]


def outbox_table(metadata: sa.MetaData) -> sa.Table:
    return sa.Table("outbox", metadata, *_outbox_columns())


def create_outbox_table(schema: str) -> None:
    """For a service's first migration: the outbox has the same shape in every schema."""
    from alembic import op

    op.create_table("outbox", *_outbox_columns(), schema=schema)


@dataclass(frozen=True)
class OutboxEvent:
    subject: str
    payload: bytes
    # Stable id: JetStream drops a republished duplicate, consumers de-duplicate on it too.
    msg_id: str

    @classmethod
    def of(cls, subject: str, message: Message, msg_id: str | None = None) -> OutboxEvent:
        return cls(subject, message.SerializeToString(), msg_id or str(uuid.uuid4()))


async def enqueue(session: AsyncSession, table: sa.Table, events: Sequence[OutboxEvent]) -> None:
    """Adds events to the outbox inside the caller's transaction (one statement for the batch)."""
    if not events:
        return
    await session.execute(
        table.insert(),
        [{"msg_id": e.msg_id, "subject": e.subject, "payload": e.payload} for e in events],
    )


class OutboxRelay:
    """Publishes committed outbox rows to JetStream in batches, then deletes them.

    Several replicas may run a relay: rows are claimed with FOR UPDATE SKIP LOCKED.
    """

    def __init__(
        self,
        database: Database,
        table: sa.Table,
        js: JetStreamContext,
        *,
        batch_size: int = 1000,
        idle_poll_seconds: float = 0.2,
        publish_timeout_seconds: float = 10.0,
    ) -> None:
        self.database = database
        self.table = table
        self.js = js
        self.batch_size = batch_size
        self.publish_timeout_seconds = publish_timeout_seconds
        self._loop = WakeableLoop("outbox-relay", self._step, idle_poll_seconds)

    def notify(self) -> None:
        """Called after a commit that added events, so they go out without waiting for a poll."""
        self._loop.notify()

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
        await self.relay_once()  # flush what committed just before shutdown

    async def _step(self) -> bool:
        return await self.relay_once() >= self.batch_size

    async def relay_once(self) -> int:
        t = self.table
        async with self.database.transaction() as session:
            rows = (
                await session.execute(
                    sa.select(t.c.id, t.c.msg_id, t.c.subject, t.c.payload)
                    .order_by(t.c.id)
                    .limit(self.batch_size)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if not rows:
                return 0
            acks = [
                await self.js.publish_async(row.subject, row.payload, headers={"Nats-Msg-Id": row.msg_id})
                for row in rows
            ]
            await asyncio.wait_for(asyncio.gather(*acks), self.publish_timeout_seconds)
            await session.execute(sa.delete(t).where(t.c.id.in_([row.id for row in rows])))
        return len(rows)
