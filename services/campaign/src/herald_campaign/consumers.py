"""Event consumers of the campaign service: run reports and delivery outcomes."""

from __future__ import annotations

from nats.aio.msg import Msg

from herald.events.v1 import events_pb2 as events
from herald_campaign.domain import Campaigns
from herald_common.bus import PullConsumer, decode_batch
from herald_common.runtime import Infrastructure


def _run_problem(event: events.RunChanged) -> str | None:
    if not event.run.name or not event.run.campaign.startswith("campaigns/"):
        return "RunChanged without run name or campaign"
    return None


def _outcome_problem(event: events.DeliveryOutcome) -> str | None:
    if not event.delivery_id or not event.campaign.startswith("campaigns/"):
        return "DeliveryOutcome without delivery_id or campaign"
    return None


def consumers(infra: Infrastructure, campaigns: Campaigns) -> list[PullConsumer]:
    js, subjects = infra.js, infra.subjects

    async def on_runs(msgs: list[Msg]) -> None:
        decoded = await decode_batch(js, subjects, "campaign-runs", msgs, events.RunChanged, _run_problem)
        await campaigns.record_runs([event for _, event in decoded])
        for msg, _ in decoded:
            await msg.ack()

    async def on_outcomes(msgs: list[Msg]) -> None:
        decoded = await decode_batch(
            js, subjects, "campaign-outcomes", msgs, events.DeliveryOutcome, _outcome_problem
        )
        await campaigns.record_outcomes([event for _, event in decoded])
        for msg, _ in decoded:
            await msg.ack()

    return [
        PullConsumer(
            js,
            stream=subjects.stream("scheduler"),
            durable="campaign-runs",
            filter_subject=subjects.run_changed,
            handler=on_runs,
        ),
        PullConsumer(
            js,
            stream=subjects.stream("dispatch"),
            durable="campaign-outcomes",
            filter_subject=subjects.delivery_outcome,
            handler=on_outcomes,
            batch_size=1000,
        ),
    ]
