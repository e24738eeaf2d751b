"""Transactional outbox: events are written with the state change and published from PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
import sqlalchemy as sa
from google.protobuf.message import Message
from nats.js import JetStreamContext

from herald_common import tracing
from herald_common.db import Database, Statement, Target
from herald_common.logging import get_logger
from herald_common.loops import WakeableLoop
from herald_common.metrics import Metrics

log = get_logger(__name__)


def _outbox_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("msg_id", sa.Text, nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        # Set when the event can never be published (too large for NATS, say): it is kept with
        # the reason for an operator, and the relay goes on with the others.
        sa.Column("problem", sa.Text, nullable=True),
        # The W3C traceparent of the work that wrote it, sent on as a message header (when tracing).
        sa.Column("trace_context", sa.Text, nullable=True),
    ]


def outbox_table(metadata: sa.MetaData) -> sa.Table:
    return sa.Table("outbox", metadata, *_outbox_columns())


def create_outbox_table(schema: str) -> None:
    """For a service's first migration: the outbox has the same shape in every schema."""
    from alembic import op

    later = ("problem", "trace_context")  # added by their own migration steps
    op.create_table("outbox", *[c for c in _outbox_columns() if c.name not in later], schema=schema)


def add_outbox_problem_column(schema: str) -> None:
    """Migration step: outbox rows that can never be published are set aside with a reason."""
    from alembic import op

    op.add_column("outbox", sa.Column("problem", sa.Text, nullable=True), schema=schema)


def store_outbox_payloads(schema: str, *, compressed: bool) -> None:
    """Migration step: a payload (up to a few hundred KB of protobuf) is written once, read once
    and deleted within seconds, so compressing it costs PostgreSQL CPU and saves nothing (EXTERNAL
    stores it uncompressed; EXTENDED is PostgreSQL's default)."""
    from alembic import op

    storage = "EXTENDED" if compressed else "EXTERNAL"
    op.execute(f"ALTER TABLE {schema}.outbox ALTER COLUMN payload SET STORAGE {storage}")


def add_outbox_trace_column(schema: str) -> None:
    """Migration step: each outbox row keeps the trace context of the work that wrote it."""
    from alembic import op

    op.add_column("outbox", sa.Column("trace_context", sa.Text, nullable=True), schema=schema)


@dataclass(frozen=True)
class OutboxEvent:
    subject: str
    payload: bytes
    # Stable id: JetStream drops a republished duplicate, consumers de-duplicate on it too.
    msg_id: str
    # The trace it continues; None: the current span's (when tracing).
    trace_context: str | None = None

    @classmethod
    def of(cls, subject: str, message: Message, msg_id: str | None = None) -> OutboxEvent:
        return cls(subject, message.SerializeToString(), msg_id or str(uuid.uuid4()))


async def enqueue(target: Target, table: sa.Table, events: Sequence[OutboxEvent]) -> None:
    """Adds events to the outbox inside the caller's transaction, a session's or a direct
    connection's (one statement for the batch)."""
    if events:
        await _insert(_qualified(table)).execute(target, **_columns(events))


@functools.cache
def _insert(table: str) -> Statement:
    return Statement(
        f"INSERT INTO {table} (msg_id, subject, payload, trace_context)"
        " SELECT * FROM unnest(CAST(:msg_ids AS text[]), CAST(:subjects AS text[]),"
        " CAST(:payloads AS bytea[]), CAST(:trace_contexts AS text[]))"
    )


def _columns(events: Sequence[OutboxEvent]) -> dict[str, list[Any]]:
    current = tracing.current_traceparent()
    return {
        "msg_ids": [e.msg_id for e in events],
        "subjects": [e.subject for e in events],
        "payloads": [e.payload for e in events],
        "trace_contexts": [e.trace_context or current for e in events],
    }


def _qualified(table: sa.Table) -> str:
    return f'"{table.schema}"."{table.name}"' if table.schema else f'"{table.name}"'


# JetStream's answer when a message is larger than the stream accepts: retrying cannot help.
_MESSAGE_TOO_LARGE_ERR_CODE = 10054
# Headers and protocol overhead beside the payload (Nats-Msg-Id and the subject).
_PUBLISH_OVERHEAD_BYTES = 512


def _never_publishable(error: BaseException) -> bool:
    if isinstance(error, nats.errors.MaxPayloadError):
        return True
    return isinstance(error, nats.js.errors.APIError) and error.err_code == _MESSAGE_TOO_LARGE_ERR_CODE


# Every commit that adds events wakes its own process's relay; the poll only finds what another
# replica committed before it stopped, so it can be rare.
IDLE_POLL_SECONDS = 1.0


class OutboxRelay:
    """Publishes committed outbox rows to JetStream in batches, then deletes them.

    Several replicas may run a relay: rows are claimed with FOR UPDATE SKIP LOCKED. A row that can
    never be published is set aside with the reason; a row whose publish failed for a passing
    reason stays for the next round. Neither holds the others back.
    """

    def __init__(
        self,
        database: Database,
        table: sa.Table,
        js: JetStreamContext,
        *,
        batch_size: int = 1000,
        idle_poll_seconds: float = IDLE_POLL_SECONDS,
        publish_timeout_seconds: float = 10.0,
        stuck_after_seconds: float = 60.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.database = database
        self.metrics = metrics
        self.table = table
        self.js = js
        self.batch_size = batch_size
        self.publish_timeout_seconds = publish_timeout_seconds
        self.stuck_after_seconds = stuck_after_seconds
        self.set_aside_total = 0
        self._waiting_since: float | None = None
        self.loop = WakeableLoop("outbox-relay", self._step, idle_poll_seconds)

    @property
    def stuck(self) -> bool:
        """True when events have been waiting and none could be published for a while."""
        return (
            self._waiting_since is not None
            and time.monotonic() - self._waiting_since > self.stuck_after_seconds
        )

    def notify(self) -> None:
        """Called after a commit that added events, so they go out without waiting for a poll."""
        self.loop.notify()

    def start(self) -> None:
        self.loop.start()

    async def stop(self) -> None:
        await self.loop.stop()
        with contextlib.suppress(Exception):  # flush what committed just before shutdown
            await asyncio.wait_for(self.relay_once(), self.publish_timeout_seconds)

    async def _step(self) -> bool:
        try:
            published, complete = await self.relay_once()
        except Exception:
            if self._waiting_since is None:
                self._waiting_since = time.monotonic()
            raise
        return complete and published >= self.batch_size

    async def relay_once(self) -> tuple[int, bool]:
        """Publishes one batch; returns how many rows went out and whether all of the batch did."""
        table = _qualified(self.table)
        async with self.database.direct_transaction() as connection:
            rows = await connection.fetch(
                f"SELECT id, msg_id, subject, payload, trace_context FROM {table}"
                " WHERE problem IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                self.batch_size,
            )
            if not rows:
                self._waiting_since = None
                return 0, True
            max_payload = self.js._nc.max_payload
            problems: dict[int, str] = {}
            sent = []
            for row in rows:
                size = len(row.payload) + len(row.subject) + _PUBLISH_OVERHEAD_BYTES
                if size > max_payload:
                    problems[row.id] = f"{len(row.payload)} bytes; NATS accepts at most {max_payload}"
                    continue
                headers = {"Nats-Msg-Id": row.msg_id}
                if row.trace_context:
                    headers[tracing.TRACEPARENT] = row.trace_context
                ack = await self.js.publish_async(row.subject, row.payload, headers=headers)
                sent.append((row, ack))
            acks = await asyncio.wait_for(
                asyncio.gather(*(ack for _, ack in sent), return_exceptions=True),
                self.publish_timeout_seconds,
            )
            published = []
            for (row, _), result in zip(sent, acks, strict=True):
                if not isinstance(result, BaseException):
                    published.append(row.id)
                elif _never_publishable(result):
                    problems[row.id] = f"JetStream refused it: {result}"
                else:
                    log.warning("outbox_publish_failed", subject=row.subject, error=repr(result))
            if published:
                await connection.execute(f"DELETE FROM {table} WHERE id = ANY($1::bigint[])", published)
            for row_id, problem in problems.items():
                await connection.execute(f"UPDATE {table} SET problem = $2 WHERE id = $1", row_id, problem)
                log.error("outbox_event_set_aside", table=str(self.table), id=row_id, problem=problem)
            self.set_aside_total += len(problems)
        if self.metrics is not None:
            self.metrics.outbox_published.inc(len(published))
            self.metrics.outbox_set_aside.inc(len(problems))
        complete = len(published) + len(problems) == len(rows)
        self._waiting_since = None if complete else (self._waiting_since or time.monotonic())
        return len(published), complete
