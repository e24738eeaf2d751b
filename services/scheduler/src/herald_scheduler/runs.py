"""Run resources: their API shape and the RunChanged events announcing them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import sqlalchemy as sa

from herald.events.v1 import events_pb2 as events
from herald.scheduler.v1 import scheduler_service_pb2 as pb
from herald_common import api
from herald_common.auth import account_name, current_account_id
from herald_common.bus import Subjects
from herald_common.db import Database, Target
from herald_common.errors import NotFound
from herald_common.outbox import OutboxEvent, enqueue
from herald_common.paging import keyset_page
from herald_scheduler.storage import outbox, runs

_ENDED = {pb.RunState.Name(s) for s in (pb.RUN_STATE_DISPATCHED, pb.RUN_STATE_FAILED, pb.RUN_STATE_CANCELLED)}


def run_name(row: Any) -> str:
    return f"{row.campaign}/runs/{row.id}"


def run_message(row: Any) -> pb.Run:
    return pb.Run(
        name=run_name(row),
        campaign=row.campaign,
        state=pb.RunState.Value(row.state),
        scheduled_time=api.timestamp(row.scheduled_time),
        start_time=api.optional_timestamp(row.started_at),
        end_time=api.optional_timestamp(row.ended_at),
        audience_size=row.audience_size,
        targeted=row.targeted,
        final=row.final,
        error=row.error,
        attempts=row.attempts,
        sample_seed=row.sample_seed,
        planned_time=api.optional_timestamp(row.planned_time),
        waiting=row.waiting,
        released=row.released,
        first_release_time=api.optional_timestamp(row.first_release_at),
        last_release_time=api.optional_timestamp(row.last_release_at),
        max_release_lateness_seconds=row.max_lateness_seconds,
    )


class RunEvents:
    """Queues a RunChanged event for each changed run, in the caller's transaction."""

    def __init__(self, subjects: Subjects) -> None:
        self.subjects = subjects

    async def changed(self, target: Target, rows: Sequence[Any]) -> None:
        now = api.timestamp(api.utcnow())
        queued = []
        for row in rows:
            event = events.RunChanged(
                event_id=str(uuid.uuid4()),
                occur_time=now,
                run=run_message(row),
                version=row.version,
                account=account_name(row.account_id),
            )
            queued.append(OutboxEvent.of(self.subjects.run_changed, event, event.event_id))
        await enqueue(target, outbox, queued)


def _of_callers_account() -> sa.ColumnElement[bool]:
    """Runs that the calling account owns: another account's answer NOT_FOUND."""
    return runs.c.account_id == current_account_id()


class RunQueries:
    def __init__(self, database: Database) -> None:
        self.database = database

    async def _row(self, name: str) -> Any:
        """The caller's run of that name; another account's answers NOT_FOUND."""
        _, run_id = api.parse_run_name(name)
        async with self.database.transaction() as session:
            row = (
                await session.execute(sa.select(runs).where(runs.c.id == run_id, _of_callers_account()))
            ).first()
        if row is None or run_name(row) != name:
            raise NotFound(name)
        return row

    async def get(self, name: str) -> pb.Run:
        return run_message(await self._row(name))

    async def watch(self, name: str, poll_seconds: float = 0.25) -> AsyncIterator[pb.Run]:
        """The run now, then each new version of it, until it has ended. Another account's run
        answers NOT_FOUND, as GetRun does."""
        version = 0
        while True:
            row = await self._row(name)
            if row.version != version:
                version = row.version
                yield run_message(row)
            if row.state in _ENDED:
                return
            await asyncio.sleep(poll_seconds)

    async def list(self, parent: str, size: int, token: str) -> tuple[list[pb.Run], str]:
        api.parse_uuid_name(parent, "campaigns", "parent")
        async with self.database.transaction() as session:
            rows, next_token = await keyset_page(
                session,
                runs,
                size,
                token,
                runs.c.campaign == parent,
                _of_callers_account(),
                time_column="scheduled_time",
                newest_first=False,
            )
        return [run_message(r) for r in rows], next_token
