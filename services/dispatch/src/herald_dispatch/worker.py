"""A destination worker: delivers the DeliveryBatches of one destination type.

Each destination is a lane of its own (its own subject, its own concurrency), so one
destination's outage or rate limit never holds back another. Every recipient of a batch ends with
exactly one recorded outcome: sent, failed or skipped with a reason, or unknown.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald.events.v1 import events_pb2 as events
from herald_common import api, bus
from herald_common.auth import account_id_of, account_name
from herald_common.errors import DomainError
from herald_common.faults import NotReady
from herald_common.logging import get_logger
from herald_common.loops import WakeableLoop
from herald_common.outbox import OutboxEvent, enqueue
from herald_common.runtime import Infrastructure
from herald_dispatch.campaigns import CampaignBook, KnownCampaign
from herald_dispatch.channels import FAILED, SENT, SKIPPED, UNKNOWN, Channel, Outcome, Settlement, sms
from herald_dispatch.channels.sms import CANNOT_TELL, Lookup, SmsChannel
from herald_dispatch.destinations import Destinations
from herald_dispatch.gate import Admission, Sender, SendGate, Superseded, WaveEntry
from herald_dispatch.ledger import SETTLING, Attempt, DeliveryLedger
from herald_dispatch.provider_calls import DESTINATION_TYPE
from herald_dispatch.ratelimit import SharedRateLimiter
from herald_dispatch.storage import outbox

log = get_logger(__name__)
# Unknown deliveries looked up at a time, how long one is held while it is, how often the
# settler looks by itself for due ones (it also wakes when the next it knows of comes due), and
# how many times a provider that cannot tell is asked.
SETTLE_BATCH = 100
SETTLE_LEASE_SECONDS = 60.0
SETTLE_POLL_SECONDS = 5.0
SETTLE_ROUNDS = 5


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
    max_in_flight: int = 256


@dataclass
class DeliveryWorker:
    infra: Infrastructure
    destinations: Destinations
    campaigns: CampaignBook
    channel: Channel
    # The process's send gate, shared by its workers (they hear of halts through it).
    gate: SendGate
    options: WorkerOptions = field(default_factory=WorkerOptions)

    def __post_init__(self) -> None:
        self.ledger = DeliveryLedger(
            self.infra.database,
            self.infra.subjects,
            self.channel.kind.destination_type,
            self.infra.settings.sms_settle_seconds,
            self.infra.metrics,
        )
        # Unknown deliveries that their provider can be asked about are settled in the background.
        self.settler = WakeableLoop(
            f"settle-{self.channel.kind.destination_type}", self.settle_unknown, SETTLE_POLL_SECONDS
        )
        self.limiter = SharedRateLimiter(self.infra.database)
        self.consumer_name = f"dispatch-{self.channel.kind.destination_type}"
        self._waiting: dict[tuple[str, str], str] = {}
        # Batches being delivered here: a second copy (redelivered while the first is still being
        # worked on) waits for the first instead of sending alongside it.
        self._in_flight: set[str] = set()

    async def start(self) -> None:
        if self.channel.kind.content_field == "sms":
            self.settler.start()
        await self.infra.consume_lanes(
            owner="jobs",
            durable=self.consumer_name,
            filter_subject=self.infra.subjects.delivery_batches(self.channel.kind.destination_type),
            handler=self.handle,
            lane_concurrency=self.options.lane_concurrency,
            max_in_flight=self.options.max_in_flight,
            dead_lettered=self._dead_lettered,
        )

    async def stop(self) -> None:
        await self.settler.stop()

    async def _dead_lettered(self, msg: Msg, reason: str) -> None:
        """A batch set aside after failing every attempt: its campaign says it waits on it."""
        try:
            batch = events.DeliveryBatch.FromString(msg.data)
        except DecodeError:
            return
        account_id = account_id_of(batch.account)
        if account_id is None:
            return
        waiting = (
            f"{len(batch.recipients)} deliveries were dead-lettered ({reason[:200]}); an operator "
            "replays them with ReplayDeadLetters once the cause is fixed"
        )
        await self._report_waiting(batch, account_id, waiting)

    async def handle(self, msg: Msg) -> None:
        # The provider requests made for this batch are counted under its destination type.
        DESTINATION_TYPE.set(self.channel.kind.destination_type)
        decoded = await bus.decode_batch(
            self.infra.js,
            self.infra.subjects,
            self.consumer_name,
            [msg],
            events.DeliveryBatch,
            batch_problem,
            self.infra.metrics,
        )
        if not decoded:  # dead-lettered with the reason
            return
        [(_, batch)] = decoded
        known = await self.campaigns.get(batch.campaign, batch.campaign_version)
        if known.account_id != account_id_of(batch.account):
            # Only the campaign service says who owns a campaign; a batch claiming otherwise is
            # set aside, not delivered with another account's destination or content.
            reason = f"{batch.account} does not own {batch.campaign}"
            await bus.dead_letter(
                self.infra.js, self.infra.subjects, self.consumer_name, msg, reason, self.infra.metrics
            )
            return
        if batch.batch_id in self._in_flight:
            raise NotReady(f"{batch.batch_id} is being delivered already")
        self._in_flight.add(batch.batch_id)
        try:
            complete = await self.deliver(batch, known)
        except Superseded as superseded:
            # Another replica took the batch over while this one stalled: it sends the rest (an
            # export counts what this one may have sent as resent; an SMS delivery stays with the
            # attempt that claimed it).
            log.warning("batch_superseded", batch=batch.batch_id, reason=str(superseded))
            return
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
            # What an earlier attempt had under way may have been sent: unknown, never skipped.
            under_way = [r for r in pending if attempt.again and r.delivery_id in attempt.intended]
            outcomes = decided + await self._attempted_before(known, under_way, attempt.intended)
            outcomes += [
                Outcome(r, SKIPPED, reason=f"campaign {state}") for r in pending if r not in under_way
            ]
        else:
            outcomes = decided + await self._send(batch, known, pending, attempt)
        recorded = await self.ledger.record(
            batch,
            known.account_id,
            attempt.number,
            outcomes,
            destination_type=self.channel.kind.destination_type,
            claimed=not self.channel.resend_unknown,
        )
        if recorded:
            self.infra.relay.notify()
        if not self.channel.resend_unknown and any(o.status == UNKNOWN for o in outcomes):
            self.settler.due_in(self.ledger.settle_seconds)  # the settler looks them up when due
        return len({o.recipient.delivery_id for o in outcomes}) >= len(pending) + len(decided)

    async def _send(
        self,
        batch: events.DeliveryBatch,
        known: KnownCampaign,
        pending: list[events.Recipient],
        attempt: Attempt,
        held_until: float = math.inf,
    ) -> list[Outcome]:
        """Sends `pending`; the settler passes when its lease on them runs out (monotonic)."""
        try:
            destination = await self.destinations.for_delivery(batch.destination, known.account_id)
        except DomainError:
            return [Outcome(r, FAILED, reason=f"{batch.destination} does not exist") for r in pending]
        if destination.type != self.channel.kind.destination_enum:
            reason = f"{batch.destination} is not a {self.channel.kind.destination_type} destination"
            return [Outcome(r, FAILED, reason=reason) for r in pending]
        resent: set[str] = set()
        unknown: list[Outcome] = []
        if attempt.again:
            if self.channel.resend_unknown:
                resent = {r.delivery_id for r in pending}
            else:
                # Only the deliveries whose request was about to be made may have been sent; the
                # others were never attempted and go out now.
                unknown = await self._attempted_before(
                    known, [r for r in pending if r.delivery_id in attempt.intended], attempt.intended
                )
                pending = [r for r in pending if r.delivery_id not in attempt.intended]
                if not pending:
                    return unknown
        key = (batch.campaign, batch.destination)
        account_id = known.account_id

        sender = Sender(
            account_id,
            batch.campaign,
            batch.batch_id,
            attempt.number,
            fenced=not attempt.settling,
            held_until=held_until,
        )

        async def wanted() -> bool:
            return (await self.campaigns.get(batch.campaign)).delivering and await self.gate.may_send(sender)

        async def admit(provider: str, wave: Sequence[WaveEntry]) -> Admission:
            return await self.gate.admit(sender, provider, wave)

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
            run=batch.run,
            wanted=wanted,
            waiting=waiting,
            resent=resent,
            admit=admit,
            draining=self.infra.stopping.is_set,
            halted=lambda: batch.campaign in self.gate.halted_here,
        )
        return unknown + await self.channel.deliver(context, pending)

    async def _attempted_before(
        self, known: KnownCampaign, recipients: list[events.Recipient], providers: dict[str, str]
    ) -> list[Outcome]:
        """Deliveries whose request was under way when an earlier attempt ended: unknown, and
        waiting to be looked up where the provider they went to can tell."""
        reason = "attempted before a restart; result unknown and not sent again"
        settles: dict[str, bool] = {}
        outcomes = []
        messages = await sms.messages_of(recipients, known.campaign.sms.body)
        for recipient, prepared in zip(recipients, messages, strict=True):
            provider = providers[recipient.delivery_id]
            if provider not in settles:
                settles[provider] = await self._settling_provider(provider, known.account_id) is not None
            if settles[provider] and not isinstance(prepared, Outcome):
                settle = Settlement(provider, *prepared)
                outcomes.append(Outcome(recipient, UNKNOWN, reason=reason, settle=settle))
            else:
                outcomes.append(Outcome(recipient, UNKNOWN, reason=reason))
        return outcomes

    async def _settling_provider(
        self, provider: str, account_id: uuid.UUID
    ) -> tuple[pb.Destination, SmsChannel] | None:
        """The provider destination a delivery went to, and its channel, when it can be asked
        whether a message was made; None when it cannot (or no longer exists)."""
        try:
            destination = await self.destinations.for_delivery(provider, account_id)
        except DomainError:
            return None
        channel = self.destinations.channel_of(destination)
        if not getattr(channel, "can_settle", False):
            return None
        return destination, cast(SmsChannel, channel)

    async def settle_unknown(self) -> bool:
        """Looks up due unknown deliveries with the provider each went to: one it made is sent
        (with its id), one it did not make is sent now, once; one it cannot tell of is asked
        again later, until SETTLE_ROUNDS. True when more may be due."""
        DESTINATION_TYPE.set(self.channel.kind.destination_type)
        # Held from before the claim: the lease runs out no later here than in the database.
        held_until = time.monotonic() + SETTLE_LEASE_SECONDS
        claimed, next_in = await self.ledger.claim_unsettled(SETTLE_BATCH, SETTLE_LEASE_SECONDS)
        if next_in is not None:
            self.settler.due_in(next_in)
        by_batch: dict[bytes, list[Any]] = {}
        for row in claimed:
            by_batch.setdefault(row.batch, []).append(row)
        for header, rows in by_batch.items():
            await self._settle_batch(events.DeliveryBatch.FromString(header), rows, held_until)
        return len(claimed) == SETTLE_BATCH

    async def _settle_batch(self, batch: events.DeliveryBatch, rows: list[Any], held_until: float) -> None:
        account_id = rows[0].account_id
        outcomes: list[Outcome] = []
        not_sent: list[events.Recipient] = []
        for row in rows:
            recipient = events.Recipient.FromString(row.recipient)
            found = await self._look_up(row)
            if found.sent is None:
                if row.rounds + 1 >= SETTLE_ROUNDS:
                    reason = f"{row.provider_destination} could not tell whether it was sent; not sent again"
                    outcomes.append(Outcome(recipient, UNKNOWN, row.attempts, reason))
                continue  # asked again once its lease runs out
            if found.sent:
                outcomes.append(Outcome(recipient, SENT, row.attempts, provider_message_id=found.message_id))
            else:
                not_sent.append(recipient)
        if not_sent:
            known = await self.campaigns.get(batch.campaign, batch.campaign_version)
            if known.delivering and not await self.gate.halted(batch.campaign):
                try:
                    outcomes += await self._send(
                        batch, known, not_sent, Attempt(SETTLING, set(), {}), held_until
                    )
                except Superseded as lapsed:
                    # This settler stalled past its lease: another claims these, asks the provider
                    # again (it sees what this one sent before the lease ran out) and sends the rest.
                    log.warning("settle_lease_lapsed", batch=batch.batch_id, reason=str(lapsed))
            else:
                outcomes += [Outcome(r, SKIPPED, reason="campaign stopped") for r in not_sent]
        if outcomes and await self.ledger.record(
            batch,
            account_id,
            SETTLING,
            outcomes,
            destination_type=self.channel.kind.destination_type,
            claimed=True,
        ):
            self.infra.relay.notify()

    async def _look_up(self, row: Any) -> Lookup:
        found = await self._settling_provider(row.provider_destination, row.account_id)
        if found is None:
            return CANNOT_TELL
        destination, provider = found
        return await provider.look_up(destination, row.phone, row.text, row.attempted_at)

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
