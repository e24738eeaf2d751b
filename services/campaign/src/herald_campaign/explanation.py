"""Why a user did or did not get a campaign (ExplainDelivery)."""

from __future__ import annotations

import uuid
from datetime import date, datetime, time, timedelta
from typing import Any

import sqlalchemy as sa

from herald.campaign.v1 import campaign_service_pb2 as pb
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from herald_campaign.accounts import settings_of
from herald_campaign.records import State, owned, state_name
from herald_campaign.references import References
from herald_campaign.storage import campaigns, runs
from herald_common import api
from herald_common.db import Database
from herald_common.errors import NotFound
from herald_common.live import NOT_IN_AUDIENCE
from herald_common.schedules import account_zone, best_time_days, best_time_fallback, wall_clock
from herald_common.skips import SkipReason
from herald_common.timing import best_local_time, local_instant, zone_named

_RESULT_DECISIONS = {
    "sent": (pb.DECISION_SENT, pb.RULE_DELIVERED),
    "failed": (pb.DECISION_FAILED, pb.RULE_DESTINATION),
    "unknown": (pb.DECISION_UNKNOWN, pb.RULE_DESTINATION),
}


# The rule behind each reason the scheduler skips a delivery for; other skips are the campaign's
# state (stopped).
_SKIP_RULES = {
    SkipReason.CONTROL_GROUP: pb.RULE_CONTROL_GROUP,
    SkipReason.NOT_REACHABLE: pb.RULE_NOT_REACHABLE,
    SkipReason.TARGETING_CAP: pb.RULE_TARGETING_CAP,
    SkipReason.QUIET_HOURS: pb.RULE_QUIET_HOURS,
    SkipReason.CUTOFF: pb.RULE_CUTOFF,
    SkipReason.FREQUENCY_CAP: pb.RULE_FREQUENCY_CAP,
    SkipReason.THROTTLED_CUTOFF: pb.RULE_THROTTLE,
    SkipReason.SEND_TIME_PASSED: pb.RULE_SCHEDULE,
    SkipReason.CAMPAIGN_STOPPED: pb.RULE_CAMPAIGN_STATE,
    SkipReason.LIVE_LIMIT: pb.RULE_LIVE_LIMIT,
    SkipReason.DAILY_LIMIT: pb.RULE_TARGETING_CAP,
    SkipReason.DATE_PASSED: pb.RULE_TRIGGER_DATE,
    SkipReason.MALFORMED_DATE: pb.RULE_TRIGGER_DATE,
}


def _result_decision(result: dispatch_pb.Delivery) -> tuple[Any, Any, str]:
    """(decision, rule, reason) of a delivery's recorded result."""
    if result.status == "skipped":
        rule = _SKIP_RULES.get(result.reason, pb.RULE_CAMPAIGN_STATE)  # type: ignore[call-overload]
        return pb.DECISION_SKIPPED, rule, result.reason or result.status
    decision, rule = _RESULT_DECISIONS.get(result.status, (pb.DECISION_FAILED, pb.RULE_DESTINATION))
    return decision, rule, result.reason or result.status


def _decision(run: Any, result: dispatch_pb.Delivery | None, settled: bool) -> pb.RunDecision:
    """One run's decision for a user, and the rule behind it."""
    if result is not None:
        decision, rule, reason = _result_decision(result)
        return pb.RunDecision(run=run.run, decision=decision, rule=rule, reason=reason)
    if run.state == "RUN_STATE_FAILED":
        return pb.RunDecision(run=run.run, decision=pb.DECISION_SKIPPED, rule=pb.RULE_RUN, reason=run.error)
    if run.state == "RUN_STATE_DISPATCHED" and settled:
        reason = "not in this run's audience: did not qualify"
        return pb.RunDecision(
            run=run.run, decision=pb.DECISION_NOT_TARGETED, rule=pb.RULE_AUDIENCE, reason=reason
        )
    if run.state == "RUN_STATE_CANCELLED":
        reason = "the run was cancelled when the campaign stopped"
        return pb.RunDecision(
            run=run.run, decision=pb.DECISION_SKIPPED, rule=pb.RULE_CAMPAIGN_STATE, reason=reason
        )
    reason = "no result yet: the run is to come, under way, or its deliveries are on their way"
    return pb.RunDecision(run=run.run, decision=pb.DECISION_PENDING, rule=pb.RULE_SCHEDULE, reason=reason)


def _live_decision(found: scheduler_pb.Qualification, result: dispatch_pb.Delivery | None) -> pb.LiveDecision:
    """What became of one time the user qualified for a live campaign."""
    decided = pb.LiveDecision(
        event_name=found.event_name,
        event_time=found.event_time,
        client_event_id=found.client_event_id,
        via=found.via,
    )
    if not found.delivery_id:  # not in the audience, or held back by the campaign's frequency
        decided.decision, decided.rule = (
            (pb.DECISION_NOT_TARGETED, pb.RULE_AUDIENCE)
            if found.outcome == NOT_IN_AUDIENCE
            else (pb.DECISION_SKIPPED, pb.RULE_LIVE_FREQUENCY)
        )
        decided.reason = found.outcome
        return decided
    if result is None and found.outcome:  # skipped, and dispatch has yet to record it
        result = dispatch_pb.Delivery(status="skipped", reason=found.outcome)
    if result is None:
        decided.decision, decided.rule = pb.DECISION_PENDING, pb.RULE_SCHEDULE
        decided.reason = (
            "qualified: the message is on its way (a delay, do-not-disturb hours or the throttle)"
        )
        return decided
    decided.decision, decided.rule, decided.reason = _result_decision(result)
    return decided


def _live_run_decision(run: Any, explanation: pb.DeliveryExplanation) -> pb.RunDecision:
    """A live run's decision for the user: their latest qualification's, else why none came."""
    if explanation.live_decisions:
        latest = explanation.live_decisions[0]
        return pb.RunDecision(run=run.run, decision=latest.decision, rule=latest.rule, reason=latest.reason)
    if explanation.waits:
        wait = explanation.waits[0]
        reason = (
            f"waiting: {wait.event_name} at {api.from_timestamp(wait.event_time).isoformat()} started a wait "
            f"that runs out at {api.from_timestamp(wait.fire_time).isoformat()}"
        )
        return pb.RunDecision(
            run=run.run, decision=pb.DECISION_PENDING, rule=pb.RULE_LIVE_TRIGGER, reason=reason
        )
    reason = (
        "has not qualified: no event of the trigger's has matched for this user since the campaign started"
    )
    return pb.RunDecision(
        run=run.run, decision=pb.DECISION_NOT_TARGETED, rule=pb.RULE_LIVE_TRIGGER, reason=reason
    )


class Explanations:
    def __init__(self, database: Database, references: References) -> None:
        self.database = database
        self.references = references

    async def explain(self, campaign_name: str, user_id: str) -> pb.DeliveryExplanation:
        """Why a user did or did not get the campaign: per run, from the delivery results dispatch
        recorded and the runs the scheduler reported."""
        campaign_id = api.parse_uuid_name(campaign_name, "campaigns", "campaign")
        async with self.database.transaction() as session:
            found = (
                await session.execute(
                    sa.select(
                        campaigns.c.state, campaigns.c.spec, campaigns.c.account_id, campaigns.c.published_at
                    ).where(owned(campaign_id))
                )
            ).first()
            if found is None:
                raise NotFound(campaign_name, "campaign")
            state = found.state
            reported = (
                await session.execute(
                    sa.select(runs)
                    .where(runs.c.campaign_id == campaign_id)
                    .order_by(runs.c.scheduled_at.nulls_last(), runs.c.run)
                )
            ).all()
        delivered = await self.references.deliveries(campaign_name, user_id)
        results = {d.run: d for d in delivered}
        explanation = pb.DeliveryExplanation(campaign=campaign_name, user_id=user_id)
        # Once the campaign has ended, every delivery has its result: no result means not targeted.
        settled = state not in (state_name(State.STATE_SCHEDULED), state_name(State.STATE_RUNNING))
        if pb.Campaign.FromString(found.spec).schedule.WhichOneof("when") == "live":
            listed = await self.references.qualifications(campaign_name, user_id)
            by_id = {d.delivery_id: d for d in delivered}
            explanation.live_decisions.extend(
                _live_decision(q, by_id.get(q.delivery_id)) for q in listed.qualifications
            )
            explanation.waits.extend(listed.waits)
            for run in reported:
                explanation.decisions.append(_live_run_decision(run, explanation))
            return explanation
        for run in reported:
            explanation.decisions.append(_decision(run, results.get(run.run), settled))
        spec = pb.Campaign.FromString(found.spec)
        if spec.delivery.HasField("best_time"):
            sent = [api.from_timestamp(d.complete_time) for d in delivered if d.status == "sent"]
            explanation.best_time = await self._best_time(
                spec, found.account_id, user_id, found.published_at, min(sent, default=None)
            )
        return explanation

    async def _best_time(
        self,
        spec: pb.Campaign,
        account_id: uuid.UUID,
        user_id: str,
        published_at: datetime | None,
        sent_at: datetime | None,
    ) -> str:
        """The hour Best Time picks for the user, on the day of the window it falls on, and why."""
        async with self.database.transaction() as session:
            settings, _ = await settings_of(session, account_id)
        member = await self.references.best_hour(user_id)
        default_zone = account_zone(settings)
        zone = (zone_named(member.timezone) if member and member.timezone else None) or default_zone
        first, _ = wall_clock(spec, api.from_timestamp(spec.schedule.send_later.send_time), default_zone)
        known = member is not None and member.HasField("best_hour_utc")
        hour = member.best_hour_utc if member is not None and known else None
        fallback = best_time_fallback(spec, settings)
        window = []
        for offset in range(best_time_days(spec)):
            day = first + timedelta(days=offset)
            at = best_local_time(day, hour, zone, fallback)
            window.append((day, at, local_instant(day, at, zone)))
        day, at, _ = _day_of_window(window, published_at, sent_at)
        when = f"{at:%H:%M} on {day.isoformat()} in {zone.key}"
        if day != first:
            when += f" (day {(day - first).days + 1} of the window)"
        if member is not None and hour is not None:
            return (
                f"{when}: their best hour, with {member.best_hour_count:,} of their sessions, opens and "
                "clicks, more than any other hour of the day"
            )
        return f"{when}: the fallback time, since no sessions, opens or clicks of theirs are recorded"


def _day_of_window(
    window: list[tuple[date, time, datetime]], published_at: datetime | None, sent_at: datetime | None
) -> tuple[date, time, datetime]:
    """The day of a Best Time window a user's delivery falls on: once sent, the last day whose
    time had come by then (do-not-disturb hours only delay it; a per-day limit moves it to a
    later day); before, the first day whose time was still ahead at publishing, as the scheduler
    plans it (else the last)."""
    if sent_at is not None:
        return next((d for d in reversed(window) if d[2] <= sent_at), window[0])
    if published_at is None:
        return window[0]
    return next((d for d in window if d[2] >= published_at), window[-1])
