"""Event consumers of the campaign service: run reports, delivery outcomes, goal events and
visitors who signed in.

Only our services publish these events; still, a report is counted only for the account that owns
its campaign, so a wrong account in an event cannot move another account's numbers.
"""

from __future__ import annotations

from herald.events.v1 import events_pb2 as events
from herald_campaign.goals import Conversions
from herald_campaign.results import Results
from herald_common import api
from herald_common.auth import account_id_of
from herald_common.errors import InvalidArgument
from herald_common.runtime import Infrastructure


def _campaign_id_problem(campaign: str, account: str) -> str | None:
    try:
        api.parse_uuid_name(campaign, "campaigns", "campaign")
    except InvalidArgument as error:
        return error.message
    if account_id_of(account) is None:
        return f"names no account ({account!r})"
    return None


def _run_problem(event: events.RunChanged) -> str | None:
    if not event.run.name or event.version <= 0:
        return "RunChanged without run name or version"
    return _campaign_id_problem(event.run.campaign, event.account)


def _results_problem(
    event: events.DeliveryOutcomes | events.DeliveryReceipts | events.WebInteractions,
) -> str | None:
    if not event.event_id or not event.results:
        return f"{event.DESCRIPTOR.name} without event_id or results"
    return _campaign_id_problem(event.campaign, event.account)


def _waiting_problem(event: events.DestinationWaiting) -> str | None:
    if not event.HasField("occur_time"):
        return "DestinationWaiting without occur_time"
    return _campaign_id_problem(event.campaign, event.account)


async def start_consumers(infra: Infrastructure, results: Results, conversions: Conversions) -> None:
    await infra.consume(
        owner="scheduler",
        durable="campaign-runs",
        filter_subject=infra.subjects.run_changed,
        event_type=events.RunChanged,
        apply=results.record_runs,
        problem=_run_problem,
        verify=lambda runs: results.foreign_reports([(r.run.campaign, r.account) for r in runs]),
    )
    await infra.consume(
        owner="dispatch",
        durable="campaign-outcomes",
        filter_subject=infra.subjects.delivery_outcomes,
        event_type=events.DeliveryOutcomes,
        apply=results.record_outcomes,
        problem=_results_problem,
        verify=lambda outcomes: results.foreign_reports([(o.campaign, o.account) for o in outcomes]),
    )
    await infra.consume(
        owner="dispatch",
        durable="campaign-waiting",
        filter_subject=infra.subjects.destination_waiting,
        event_type=events.DestinationWaiting,
        apply=results.record_waiting,
        problem=_waiting_problem,
        verify=lambda waits: results.foreign_reports([(w.campaign, w.account) for w in waits]),
    )
    await infra.consume(
        owner="dispatch",
        durable="campaign-receipts",
        filter_subject=infra.subjects.delivery_receipts,
        event_type=events.DeliveryReceipts,
        apply=results.record_receipts,
        problem=_results_problem,
        verify=lambda found: results.foreign_reports([(r.campaign, r.account) for r in found]),
    )
    await infra.consume(
        owner="dispatch",
        durable="campaign-popup-interactions",
        filter_subject=infra.subjects.web_interactions,
        event_type=events.WebInteractions,
        apply=results.record_popup_interactions,
        problem=_results_problem,
        verify=lambda found: results.foreign_reports([(r.campaign, r.account) for r in found]),
    )
    await infra.consume(
        owner="segmentation",
        durable="campaign-goal-events",
        filter_subject=infra.subjects.goal_events,
        event_type=events.GoalEvents,
        apply=conversions.record,
        problem=_goal_events_problem,
    )
    await infra.consume(
        owner="segmentation",
        durable="campaign-visitor-merges",
        filter_subject=infra.subjects.visitor_merged,
        event_type=events.VisitorMerged,
        apply=conversions.visitors_merged,
    )


def _goal_events_problem(event: events.GoalEvents) -> str | None:
    if not event.event_id or not event.events:
        return "GoalEvents without event_id or events"
    if account_id_of(event.account) is None:
        return f"GoalEvents names no account ({event.account!r})"
    for campaign in {goal_event.campaign for goal_event in event.events}:
        problem = _campaign_id_problem(campaign, event.account)
        if problem is not None:
            return problem
    return None
