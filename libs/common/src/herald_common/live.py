"""Live campaigns' triggers and frequency: their shape, checked wherever a campaign is saved.

Whether a trigger's events and properties fit what the account has sent (types, dates) is
segmentation's to say; see the campaign service's references.
"""

from __future__ import annotations

from datetime import timedelta

from herald.campaign.v1 import campaign_service_pb2 as pb
from herald_common.errors import Validator
from herald_common.schedules import parse_time_of_day

# The events Herald records itself (see segmentation's system events), named as in the
# mParticle seed's list of events for live campaigns.
NOTIFICATION_DELIVERED = "Notification Delivered"
NOTIFICATION_REPLIED = "Notification Replied"
CONTROL_GROUP = "Control Group"
APP_VERSION_CHANGED = "App Version Changed"
RECORDED_SYSTEM_EVENTS = frozenset(
    {NOTIFICATION_DELIVERED, NOTIFICATION_REPLIED, CONTROL_GROUP, APP_VERSION_CHANGED}
)
# The rest of that list: system events of other products that Herald does not record, so a
# trigger on one would never fire.
UNRECORDED_SYSTEM_EVENTS = frozenset(
    {
        "AB Experiment Disqualified",
        "AB Experiment Rendered",
        "AB Experiment Rolled Out",
        "AB Experiment Stopped",
        "App Uninstalled",
        "Experiment Rendered",
        "Geocluster Entered",
        "Geocluster Exited",
        "Notification Clicked",
        "Notification Viewed",
        "Push Impressions",
        "Reply Sent",
        "UTM Visited",
        "wzrk_fetch",
    }
)
# Why a qualification made no delivery, in the words explanations show.
NOT_IN_AUDIENCE = "did not match the campaign's audience when they qualified"
ALREADY_ONCE = "already got this campaign once (frequency: once)"


def too_recent(every: timedelta) -> str:
    return f"got this campaign less than {every} before (frequency: at most every {every})"


MIN_WINDOW = timedelta(minutes=1)
MAX_WINDOW = timedelta(days=30)
MIN_REPEAT = timedelta(hours=1)
MAX_REPEAT = timedelta(days=365)
MAX_WHERE = 20
MAX_OFFSET = {
    pb.OFFSET_UNIT_MINUTES: 365 * 24 * 60,
    pb.OFFSET_UNIT_HOURS: 365 * 24,
    pb.OFFSET_UNIT_DAYS: 365,
}


def named_events(trigger: pb.LiveTrigger, path: str) -> list[tuple[pb.LiveEvent, str]]:
    """The trigger's events, each with its path."""
    kind = trigger.WhichOneof("kind")
    if kind == "action":
        found = [(trigger.action.event, f"{path}.action.event")]
        if trigger.action.HasField("earlier_event"):
            found.append((trigger.action.earlier_event, f"{path}.action.earlier_event"))
        return found
    if kind == "inaction":
        return [
            (trigger.inaction.event, f"{path}.inaction.event"),
            (trigger.inaction.awaited_event, f"{path}.inaction.awaited_event"),
        ]
    if kind == "date_property":
        return [(trigger.date_property.event, f"{path}.date_property.event")]
    return []


def check_live(live: pb.Live, path: str, check: Validator) -> None:
    """A live schedule's trigger and frequency (start, end and delay are checked with it)."""
    if check.require(live.HasField("trigger"), f"{path}.trigger", "required"):
        _check_trigger(live.trigger, f"{path}.trigger", check)
    rule = live.frequency.WhichOneof("rule")
    if rule in ("once", "every_time"):
        check.require(getattr(live.frequency, rule), f"{path}.frequency.{rule}", "must be true when set")
    elif rule == "at_most_every":
        every = live.frequency.at_most_every.ToTimedelta()
        check.require(
            MIN_REPEAT <= every <= MAX_REPEAT, f"{path}.frequency.at_most_every", "1 hour to 365 days"
        )


def _window(within: timedelta, path: str, check: Validator) -> None:
    check.require(MIN_WINDOW <= within <= MAX_WINDOW, path, "1 minute to 30 days")


def _check_trigger(trigger: pb.LiveTrigger, path: str, check: Validator) -> None:
    kind = trigger.WhichOneof("kind")
    if not check.require(kind is not None, path, "required: action, inaction or date_property"):
        return
    for event, where in named_events(trigger, path):
        anonymous_allowed = where == f"{path}.action.event"
        _check_event(event, where, anonymous_allowed, check)
    if kind == "action" and trigger.action.HasField("earlier_event"):
        action = trigger.action
        check.require(
            bool(action.constant_property.strip()),
            f"{path}.action.constant_property",
            "required with earlier_event",
        )
        _window(action.within.ToTimedelta(), f"{path}.action.within", check)
        check.require(
            bool(action.event.event_name) and action.earlier_event.event_name != action.event.event_name,
            f"{path}.action.earlier_event.event_name",
            "another event than the trigger's own, which must be named",
        )
    elif kind == "action":
        check.require(
            not action_extras(trigger.action),
            f"{path}.action.earlier_event",
            "required with constant_property or within",
        )
    elif kind == "inaction":
        inaction = trigger.inaction
        _window(inaction.within.ToTimedelta(), f"{path}.inaction.within", check)
        check.require(
            len(inaction.match_property) <= 200, f"{path}.inaction.match_property", "at most 200 characters"
        )
    else:
        dated = trigger.date_property
        here = f"{path}.date_property"
        check.require(
            0 < len(dated.date_property.strip()) <= 200, f"{here}.date_property", "required: 1-200 characters"
        )
        if check.require(dated.unit in MAX_OFFSET, f"{here}.unit", "required: minutes, hours or days"):
            most = MAX_OFFSET[dated.unit]
            check.require(
                abs(dated.offset) <= most, f"{here}.offset", f"at most {most:,} either way (365 days)"
            )
        if dated.unit == pb.OFFSET_UNIT_DAYS:
            check.require(
                parse_time_of_day(dated.time_of_day) is not None,
                f"{here}.time_of_day",
                "required with days: HH:MM",
            )
        else:
            check.require(not dated.time_of_day, f"{here}.time_of_day", "only with days")


def action_extras(action: pb.ActionTrigger) -> bool:
    return bool(action.constant_property) or action.HasField("within")


def _check_event(event: pb.LiveEvent, path: str, anonymous_allowed: bool, check: Validator) -> None:
    name = event.event_name
    if anonymous_allowed:
        check.require(len(name) <= 200, f"{path}.event_name", "at most 200 characters")
    else:
        check.require(
            0 < len(name) <= 200 and bool(name.strip()), f"{path}.event_name", "required: 1-200 characters"
        )
    check.require(
        name not in UNRECORDED_SYSTEM_EVENTS,
        f"{path}.event_name",
        f"Herald does not record {name!r}; its own events are {', '.join(sorted(RECORDED_SYSTEM_EVENTS))}",
    )
    check.require(len(event.where) <= MAX_WHERE, f"{path}.where", f"at most {MAX_WHERE} conditions")
    if not name:
        check.require(not event.where, f"{path}.where", "conditions on properties need an event name")
