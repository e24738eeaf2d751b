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
    if not event.run.name or event.version <= 0:
        return "RunChanged without run name or version"
    return _campaign_id_problem(event.run.campaign)


def _outcomes_problem(event: events.DeliveryOutcomes) -> str | None:
    if not event.event_id or not event.results:
        return "DeliveryOutcomes without event_id or results"
    return _campaign_id_problem(event.campaign)


def _waiting_problem(event: events.DestinationWaiting) -> str | None:
    if not event.HasField("occur_time"):
        return "DestinationWaiting without occur_time"
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
        filter_subject=infra.subjects.delivery_outcomes,
        event_type=events.DeliveryOutcomes,
        apply=campaigns.record_outcomes,
        problem=_outcomes_problem,
    )
    await infra.consume(
        owner="dispatch",
        durable="campaign-waiting",
        filter_subject=infra.subjects.destination_waiting,
        event_type=events.DestinationWaiting,
        apply=campaigns.record_waiting,
        problem=_waiting_problem,
    )
