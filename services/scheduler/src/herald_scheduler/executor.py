"""Executes due runs: resolves the audience page by page and plans one delivery per member.

Each page's deliveries and their DeliveryJob events commit together; a delivery id is derived
from (run, user), so a run resumed after a crash plans nobody twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import grpc
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.events.v1 import events_pb2 as events
from herald.scheduler.v1 import scheduler_service_pb2 as pb
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald.segmentation.v1 import segmentation_service_pb2_grpc as segmentation_grpc
from herald_common import api, personalization
from herald_common.bus import Subjects
from herald_common.db import Database
from herald_common.logging import get_logger
from herald_common.loops import WakeableLoop
from herald_common.outbox import OutboxEvent, enqueue
from herald_scheduler.runs import RunEvents, run_name
from herald_scheduler.storage import campaigns, deliveries, outbox, runs

log = get_logger(__name__)

RunState = pb.RunState
LEASE = timedelta(seconds=60)
AUDIENCE_PAGE_SIZE = 1000
# The destination type (and so the job subject) each kind of content is delivered through.
CONTENT_DESTINATION_TYPE = {"segment_export": "segment"}
_PENDING = RunState.Name(RunState.RUN_STATE_PENDING)
_RUNNING = RunState.Name(RunState.RUN_STATE_RUNNING)


def delivery_id(run_id: uuid.UUID, user_id: str) -> str:
    return str(uuid.uuid5(run_id, user_id))


def _attribute_keys(campaign: campaign_pb.Campaign) -> list[str]:
    """Profile properties the content sends or personalizes with."""
    if campaign.WhichOneof("content") == "segment_export":
        export = campaign.segment_export
        needed = personalization.profile_properties(export.custom_properties.values())
        return sorted(needed.union(export.profile_attributes))
    return []


class RunCancelled(Exception):
    pass


class RunExecutor:
    def __init__(
        self,
        database: Database,
        subjects: Subjects,
        run_events: RunEvents,
        segmentation: grpc.aio.Channel,
        notify_outbox: Callable[[], None],
        poll_seconds: float = 0.5,
    ) -> None:
        self.database = database
        self.subjects = subjects
        self.run_events = run_events
        self.audiences = segmentation_grpc.SegmentationServiceStub(segmentation)
        self.notify_outbox = notify_outbox
        self._loop = WakeableLoop("run-executor", self.execute_next, poll_seconds)

    def notify(self) -> None:
        self._loop.notify()

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def _claim(self) -> tuple[Any, campaign_pb.Campaign] | None:
        """Takes one due run (or one abandoned by a crashed replica) and leases it."""
        async with self.database.transaction() as session:
            due = (
                sa.select(runs.c.id)
                .where(
                    sa.or_(
                        sa.and_(runs.c.state == _PENDING, runs.c.scheduled_time <= sa.func.now()),
                        sa.and_(runs.c.state == _RUNNING, runs.c.lease_until < sa.func.now()),
                    )
                )
                .order_by(runs.c.scheduled_time)
                .limit(1)
                .with_for_update(skip_locked=True)
                .scalar_subquery()
            )
            row = (
                await session.execute(
                    sa.update(runs)
                    .where(runs.c.id == due)
                    .values(
                        state=_RUNNING,
                        lease_until=sa.func.now() + LEASE,
                        started_at=sa.func.coalesce(runs.c.started_at, sa.func.now()),
                    )
                    .returning(*runs.c)
                )
            ).first()
            if row is None:
                return None
            snapshot = await session.scalar(
                sa.select(campaigns.c.snapshot).where(campaigns.c.name == row.campaign)
            )
            await self.run_events.changed(session, [row])
        self.notify_outbox()
        if snapshot is None:
            await self._finish(row.id, RunState.RUN_STATE_FAILED, 0, "the campaign of this run is unknown")
            return None
        return row, campaign_pb.Campaign.FromString(snapshot)

    async def execute_next(self) -> bool:
        claimed = await self._claim()
        if claimed is None:
            return False
        row, campaign = claimed
        log.info("run_started", run=run_name(row))
        try:
            audience_size = await self._plan(row.id, campaign)
        except RunCancelled:
            log.info("run_cancelled", run=run_name(row))
            return True
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                # Transient: the lease runs out and the run is resumed.
                log.warning("run_interrupted", run=run_name(row), error=error.details())
                return True
            await self._finish(
                row.id, RunState.RUN_STATE_FAILED, 0, f"audience: {error.code().name} {error.details()}"
            )
            return True
        except Exception as error:
            # Retrying cannot help a run its own definition breaks: fail it, with the reason.
            log.exception("run_failed", run=run_name(row))
            await self._finish(row.id, RunState.RUN_STATE_FAILED, 0, repr(error))
            return True
        await self._finish(row.id, RunState.RUN_STATE_DISPATCHED, audience_size, "")
        return True

    async def _plan(self, run_id: uuid.UUID, campaign: campaign_pb.Campaign) -> int:
        content = campaign.WhichOneof("content") or ""
        subject = self.subjects.delivery_job(CONTENT_DESTINATION_TYPE[content])
        request = segmentation_pb.StreamAudienceRequest(
            segment=campaign.audience.segment,
            attribute_keys=_attribute_keys(campaign),
            page_size=AUDIENCE_PAGE_SIZE,
        )
        audience_size = 0
        async for page in self.audiences.StreamAudience(request):
            audience_size += len(page.members)
            async with self.database.transaction() as session:
                await self._plan_page(session, run_id, campaign, subject, page.members)
            self.notify_outbox()
        return audience_size

    async def _plan_page(
        self,
        session: AsyncSession,
        run_id: uuid.UUID,
        campaign: campaign_pb.Campaign,
        subject: str,
        members: Sequence[segmentation_pb.AudienceMember],
    ) -> None:
        # Renewing the lease also checks the run was not cancelled meanwhile.
        renewed = await session.execute(
            sa.update(runs)
            .where(runs.c.id == run_id, runs.c.state == _RUNNING)
            .values(lease_until=sa.func.now() + LEASE)
            .returning(runs.c.id)
        )
        if renewed.first() is None:
            raise RunCancelled()
        by_id = {delivery_id(run_id, m.user_id): m for m in members}
        new_ids = await session.scalars(
            insert(deliveries)
            .on_conflict_do_nothing(index_elements=[deliveries.c.delivery_id])
            .returning(deliveries.c.delivery_id),
            [{"delivery_id": d, "run_id": run_id, "user_id": m.user_id} for d, m in by_id.items()],
        )
        now = api.timestamp(api.utcnow())
        name = f"{campaign.name}/runs/{run_id}"
        jobs = []
        for d in new_ids:
            member = by_id[d]
            job = events.DeliveryJob(
                delivery_id=d,
                campaign=campaign.name,
                run=name,
                destination=campaign.destination,
                user_id=member.user_id,
                attributes=member.attributes,
                plan_time=now,
            )
            if campaign.WhichOneof("content") == "segment_export":
                job.segment_export.CopyFrom(campaign.segment_export)
            jobs.append(OutboxEvent.of(subject, job, d))
        await enqueue(session, outbox, jobs)
        if jobs:
            # Report progress, so campaign stats count what is planned while the run goes on.
            progressed = (
                await session.execute(
                    sa.update(runs)
                    .where(runs.c.id == run_id)
                    .values(targeted=runs.c.targeted + len(jobs))
                    .returning(*runs.c)
                )
            ).all()
            await self.run_events.changed(session, progressed)

    async def _finish(
        self, run_id: uuid.UUID, state: RunState.ValueType, audience_size: int, error: str
    ) -> None:
        async with self.database.transaction() as session:
            targeted = await session.scalar(
                sa.select(sa.func.count()).select_from(deliveries).where(deliveries.c.run_id == run_id)
            )
            row = (
                await session.execute(
                    sa.update(runs)
                    .where(runs.c.id == run_id, runs.c.state == _RUNNING)
                    .values(
                        state=RunState.Name(state),
                        audience_size=audience_size,
                        targeted=targeted or 0,
                        ended_at=sa.func.now(),
                        lease_until=None,
                        error=error,
                    )
                    .returning(*runs.c)
                )
            ).first()
            if row is not None:
                await self.run_events.changed(session, [row])
                log.info("run_finished", run=run_name(row), state=row.state, targeted=row.targeted)
        self.notify_outbox()
