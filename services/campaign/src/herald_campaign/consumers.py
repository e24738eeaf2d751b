"""Event consumers of the campaign service: run reports and delivery outcomes."""

from __future__ import annotations

import uuid

from nats.aio.msg import Msg

from herald.events.v1 import events_pb2 as events
from herald_campaign.domain import Campaigns
from herald_common.bus import decode_batch
from herald_common.runtime import Infrastructure


def _campaign_id_problem(campaign: str) -> str | None:
    try:
        uuid.UUID(campaign.removeprefix("campaigns/"))
    except ValueError:
        return f"campaign {campaign!r} is not a campaign name"
    return None if campaign.startswith("campaigns/") else f"campaign {campaign!r} is not a campaign name"


def _run_problem(event: events.RunChanged) -> str | None:
    if not event.run.name or not event.HasField("occur_time"):
        return "RunChanged without run name or occur_time"
    return _campaign_id_problem(event.run.campaign)


def _outcome_problem(event: events.DeliveryOutcome) -> str | None:
    if not event.delivery_id:
        return "DeliveryOutcome without delivery_id"
    return _campaign_id_problem(event.campaign)


async def start_consumers(infra: Infrastructure, campaigns: Campaigns) -> None:
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

    await infra.consume(
        owner="scheduler", durable="campaign-runs", filter_subject=subjects.run_changed, handler=on_runs
    )
    await infra.consume(
        owner="dispatch",
        durable="campaign-outcomes",
        filter_subject=subjects.delivery_outcome,
        handler=on_outcomes,
        batch_size=1000,
    )
