"""A destination worker: delivers the DeliveryBatches of one destination type.

Each destination is a lane of its own (its own subject, its own concurrency), so one
destination's outage or rate limit never holds back another. Every recipient of a batch ends with
exactly one recorded outcome: sent, failed or skipped with a reason, or unknown.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from nats.aio.msg import Msg

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.events.v1 import events_pb2 as events
from herald_common import api, bus
from herald_common.auth import account_id_of, account_name
from herald_common.errors import DomainError
from herald_common.faults import NotReady
from herald_common.logging import get_logger
from herald_common.outbox import OutboxEvent, enqueue
from herald_common.runtime import Infrastructure
from herald_dispatch.campaigns import CampaignBook, KnownCampaign
from herald_dispatch.channels import FAILED, SKIPPED, UNKNOWN, Channel, Outcome
from herald_dispatch.destinations import Destinations
from herald_dispatch.gate import Admission, SendGate
from herald_dispatch.ledger import Attempt, DeliveryLedger
from herald_dispatch.ratelimit import SharedRateLimiter
from herald_dispatch.storage import outbox

log = get_logger(__name__)


def batch_problem(batch: events.DeliveryBatch) -> str | None:
    missing = [f for f in ("batch_id", "campaign", "run", "destination") if not getattr(batch, f)]
    if missing:
        return f"DeliveryBatch without {', '.join(missing)}"
    if not batch.recipients:
        return "DeliveryBatch without recipients"
    if any(not r.delivery_id or not r.user_id for r in batch.recipients):
        return "DeliveryBatch with a recipient lacking delivery_id or user_id"
    if account_id_of(batch.account) is None:
        return f"DeliveryBatch names no account ({batch.account!r})"
    return None


@dataclass
class WorkerOptions:
    # Batches of one destination sent at once, and batches held by this worker in all.
    lane_concurrency: int = 8
    max_in_flight: int = 64


@dataclass
class DeliveryWorker:
    infra: Infrastructure
    destinations: Destinations
    campaigns: CampaignBook
    channel: Channel
    options: WorkerOptions = field(default_factory=WorkerOptions)

    def __post_init__(self) -> None:
        self.ledger = DeliveryLedger(self.infra.database, self.infra.subjects)
        self.limiter = SharedRateLimiter(self.infra.database)
        self.gate = SendGate(self.infra.database)
        self.consumer_name = f"dispatch-{self.channel.kind.destination_type}"
        self._waiting: dict[tuple[str, str], str] = {}
        # Batches being delivered here: a second copy (redelivered while the first is still being
        # worked on) waits for the first instead of sending alongside it.
        self._in_flight: set[str] = set()

    async def start(self) -> None:
        await self.infra.consume_lanes(
            owner="jobs",
            durable=self.consumer_name,
            filter_subject=self.infra.subjects.delivery_batches(self.channel.kind.destination_type),
            handler=self.handle,
            lane_concurrency=self.options.lane_concurrency,
            max_in_flight=self.options.max_in_flight,
        )

    async def handle(self, msg: Msg) -> None:
        decoded = await bus.decode_batch(
            self.infra.js, self.infra.subjects, self.consumer_name, [msg], events.DeliveryBatch, batch_problem
        )
        if not decoded:  # dead-lettered with the reason
            return
        [(_, batch)] = decoded
        known = await self.campaigns.get(batch.campaign, batch.campaign_version)
        if known.account_id != account_id_of(batch.account):
            # Only the campaign service says who owns a campaign; a batch claiming otherwise is
            # set aside, not delivered with another account's destination or content.
            reason = f"{batch.account} does not own {batch.campaign}"
            await bus.dead_letter(self.infra.js, self.infra.subjects, self.consumer_name, msg, reason)
            return
        if batch.batch_id in self._in_flight:
            raise NotReady(f"{batch.batch_id} is being delivered already")
        self._in_flight.add(batch.batch_id)
        try:
            complete = await self.deliver(batch, known)
        finally:
            self._in_flight.discard(batch.batch_id)
        if complete:
            await msg.ack()
        else:  # shutting down: another replica sends the recipients not reached
            await msg.nak()

    async def deliver(self, batch: events.DeliveryBatch, known: KnownCampaign) -> bool:
        """Delivers what of the batch has no result yet; False when this process began shutting
        down before every recipient had an outcome."""
        attempt = await self.ledger.begin(batch, known.account_id)
        pending = list(
            {r.delivery_id: r for r in batch.recipients if r.delivery_id not in attempt.finished}.values()
        )
        if not pending:
            return True
        # The scheduler's rules (control group, do-not-disturb hours, cut-off, caps) decided these.
        decided = [Outcome(r, SKIPPED, reason=r.skip_reason) for r in pending if r.skip_reason]
        pending = [r for r in pending if not r.skip_reason]
        if not pending:
            outcomes = decided
        elif not known.delivering or await self.gate.halted(batch.campaign):
            state = campaign_pb.State.Name(known.campaign.state).removeprefix("STATE_").lower()
            if known.delivering:  # halted by StopCampaign before this replica heard of it
                state = "stopped"
            outcomes = decided + [Outcome(r, SKIPPED, reason=f"campaign {state}") for r in pending]
        else:
            outcomes = decided + await self._send(batch, known, pending, attempt)
        recorded = await self.ledger.record(
            batch, known.account_id, attempt.number, outcomes, forget_intents=not self.channel.resend_unknown
        )
        if recorded:
            self.infra.relay.notify()
        return len({o.recipient.delivery_id for o in outcomes}) >= len(pending) + len(decided)

    async def _send(
        self,
        batch: events.DeliveryBatch,
        known: KnownCampaign,
        pending: list[events.Recipient],
        attempt: Attempt,
    ) -> list[Outcome]:
        try:
            destination = await self.destinations.for_delivery(batch.destination, known.account_id)
        except DomainError:
            return [Outcome(r, FAILED, reason=f"{batch.destination} does not exist") for r in pending]
        if destination.type != self.channel.kind.destination_enum:
            reason = f"{batch.destination} is not a {self.channel.kind.destination_type} destination"
            return [Outcome(r, FAILED, reason=reason) for r in pending]
        resent: set[str] = set()
        unknown: list[Outcome] = []
        if attempt.number > 1:
            if self.channel.resend_unknown:
                resent = {r.delivery_id for r in pending}
            else:
                # Only the deliveries whose request was about to be made may have been sent; the
                # others were never attempted and go out now.
                reason = "attempted before a restart; result unknown and not sent again"
                unknown = [
                    Outcome(r, UNKNOWN, reason=reason) for r in pending if r.delivery_id in attempt.intended
                ]
                pending = [r for r in pending if r.delivery_id not in attempt.intended]
                if not pending:
                    return unknown
        key = (batch.campaign, batch.destination)
        account_id = known.account_id

        async def wanted() -> bool:
            return (await self.campaigns.get(batch.campaign)).delivering and not await self.gate.halted(
                batch.campaign
            )

        async def admit(wave: Sequence[tuple[str, str]]) -> Admission:
            return await self.gate.admit(account_id, batch.campaign, wave)

        async def waiting(reason: str | None) -> None:
            if self._waiting.get(key, "") != (reason or ""):
                self._waiting[key] = reason or ""
                await self._report_waiting(batch, known.account_id, reason or "")

        context = self.destinations.send_context(
            known.account_id,
            destination,
            self.channel,
            self.limiter,
            campaign=known.campaign,
            plan_time=api.from_timestamp(batch.plan_time),
            wanted=wanted,
            waiting=waiting,
            resent=resent,
            admit=admit,
            draining=self.infra.stopping.is_set,
        )
        return unknown + await self.channel.deliver(context, pending)

    async def _report_waiting(self, batch: events.DeliveryBatch, account_id: uuid.UUID, reason: str) -> None:
        event = events.DestinationWaiting(
            event_id=str(uuid.uuid4()),
            account=account_name(account_id),
            campaign=batch.campaign,
            destination=batch.destination,
            reason=reason,
            occur_time=api.timestamp(api.utcnow()),
        )
        async with self.infra.database.transaction() as session:
            await enqueue(
                session,
                outbox,
                [OutboxEvent.of(self.infra.subjects.destination_waiting, event, event.event_id)],
            )
        self.infra.relay.notify()
