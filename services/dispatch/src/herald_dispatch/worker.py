"""A destination worker: consumes DeliveryJobs of one destination type and records their results."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol

from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald.events.v1 import events_pb2 as events
from herald_common.logging import get_logger
from herald_common.runtime import Infrastructure
from herald_dispatch.destinations import TYPE_NAMES, Destinations
from herald_dispatch.ledger import FAILED, DeliveryLedger, DeliveryResult

log = get_logger(__name__)


class Channel(Protocol):
    """Sends a batch of jobs to one destination of its type and reports every job's result."""

    destination_type: str
    content_field: str

    async def deliver(
        self, destination: pb.Destination, jobs: Sequence[events.DeliveryJob]
    ) -> list[DeliveryResult]: ...


def _job_problem(job: events.DeliveryJob) -> str | None:
    missing = [f for f in ("delivery_id", "campaign", "run", "destination", "user_id") if not getattr(job, f)]
    if missing:
        return f"DeliveryJob without {', '.join(missing)}"
    if job.WhichOneof("content") is None:
        return "DeliveryJob without content"
    return None


class DeliveryWorker:
    def __init__(
        self, infra: Infrastructure, destinations: Destinations, channel: Channel, batch_size: int = 500
    ) -> None:
        self.infra = infra
        self.destinations = destinations
        self.channel = channel
        self.ledger = DeliveryLedger(infra.database, infra.subjects)
        self.batch_size = batch_size
        self.consumer_name = f"dispatch-{channel.destination_type}"

    async def start(self) -> None:
        await self.infra.consume(
            owner="scheduler",
            durable=self.consumer_name,
            filter_subject=self.infra.subjects.delivery_job(self.channel.destination_type),
            event_type=events.DeliveryJob,
            apply=self.deliver,
            problem=_job_problem,
            batch_size=self.batch_size,
        )

    async def deliver(self, jobs: list[events.DeliveryJob]) -> None:
        """Sends the jobs not finished before (a redelivered job is a no-op) and records results."""
        finished = await self.ledger.finished(job.delivery_id for job in jobs)
        pending: dict[str, events.DeliveryJob] = {}
        for job in jobs:
            if job.delivery_id not in finished:
                pending.setdefault(job.delivery_id, job)
        results = await self._deliver(list(pending.values()))
        if await self.ledger.record(results):
            self.infra.relay.notify()
        if finished:
            log.info("redelivered_jobs_skipped", count=len(finished))

    async def _deliver(self, jobs: list[events.DeliveryJob]) -> list[DeliveryResult]:
        by_destination: dict[str, list[events.DeliveryJob]] = defaultdict(list)
        for job in jobs:
            by_destination[job.destination].append(job)
        configs = await self.destinations.load_many(set(by_destination))
        results: list[DeliveryResult] = []
        for name, group in by_destination.items():
            destination = configs.get(name)
            problem = None
            if destination is None:
                problem = f"{name} does not exist"
            elif TYPE_NAMES.get(destination.type) != self.channel.destination_type:
                problem = f"{name} is not a {self.channel.destination_type} destination"
            elif any(job.WhichOneof("content") != self.channel.content_field for job in group):
                problem = f"content is not {self.channel.content_field}"
            if problem is not None or destination is None:
                results.extend(DeliveryResult(job, FAILED, 0, problem or "") for job in group)
                continue
            results.extend(await self.channel.deliver(destination, group))
        return results
