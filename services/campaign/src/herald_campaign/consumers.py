"""Event consumers of the campaign service: run reports and delivery outcomes."""

from __future__ import annotations

from herald.events.v1 import events_pb2 as events
from herald_campaign.domain import Campaigns
from herald_common import api
from herald_common.errors import InvalidArgument
from herald_common.runtime import Infrastructure


def _campaign_id_problem(campaign: str) -> str | None:
    try:
        api.parse_uuid_name(campaign, "campaigns", "campaign")
    except InvalidArgument as error:
        return error.message
    return None


def _run_problem(event: events.RunChanged) -> str | None:
    if not event.run.name or not event.HasField("occur_time"):
        return "RunChanged without run name or occur_time"
    return _campaign_id_problem(event.run.campaign)


def _outcome_problem(event: events.DeliveryOutcome) -> str | None:
    if not event.delivery_id:
        return "DeliveryOutcome without delivery_id"
    return _campaign_id_problem(event.campaign)


async def start_consumers(infra: Infrastructure, campaigns: Campaigns) -> None:
    await infra.consume(
        owner="scheduler",
        durable="campaign-runs",
        filter_subject=infra.subjects.run_changed,
        event_type=events.RunChanged,
        apply=campaigns.record_runs,
        problem=_run_problem,
    )
    await infra.consume(
        owner="dispatch",
        durable="campaign-outcomes",
        filter_subject=infra.subjects.delivery_outcome,
        event_type=events.DeliveryOutcome,
        apply=campaigns.record_outcomes,
        problem=_outcome_problem,
        batch_size=1000,
    )
