"""Live campaigns' triggers and frequency: their shape, checked wherever a campaign is saved.

Whether a trigger's events and properties fit what the account has sent (types, dates) is
segmentation's to say; see the campaign service's references.
"""

from __future__ import annotations

import re
from datetime import timedelta

from herald.campaign.v1 import campaign_service_pb2 as pb
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald_common.errors import Validator
from herald_common.schedules import parse_time_of_day

# The events Herald records itself (see segmentation's system events), named as in the
# mParticle seed's list of events for live campaigns.
NOTIFICATION_DELIVERED = "Notification Delivered"
NOTIFICATION_REPLIED = "Notification Replied"
CONTROL_GROUP = "Control Group"
APP_VERSION_CHANGED = "App Version Changed"
NOTIFICATION_VIEWED = "Notification Viewed"
NOTIFICATION_CLICKED = "Notification Clicked"
RECORDED_SYSTEM_EVENTS = frozenset(
    {
        NOTIFICATION_DELIVERED,
        NOTIFICATION_REPLIED,
        CONTROL_GROUP,
        APP_VERSION_CHANGED,
        NOTIFICATION_VIEWED,
        NOTIFICATION_CLICKED,
    }
)
# What the web SDK sends for each page view, with the properties page triggers test.
PAGE_VIEWED = "Page Viewed"
MAX_URL = 2_000
MAX_PAGE_COUNT = 1_000
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


def _condition(key: str, operator: int, value: str | int) -> segmentation_pb.PropertyCondition:
    condition = segmentation_pb.PropertyCondition(property=key, operator=operator)  # type: ignore[arg-type]
    if isinstance(value, str):
        condition.value.string_value = value
    else:
        condition.value.number_value = value
    return condition


_URL_OPERATORS = {
    pb.URL_MATCH_EQUALS: segmentation_pb.OPERATOR_EQUALS,
    pb.URL_MATCH_CONTAINS: segmentation_pb.OPERATOR_CONTAINS,
    pb.URL_MATCH_PATTERN: segmentation_pb.OPERATOR_MATCHES,
}


def _url_condition(key: str, test: pb.UrlTest) -> segmentation_pb.PropertyCondition:
    return _condition(key, _URL_OPERATORS[test.match], test.value)


def url_passes(test: pb.UrlTest, url: str) -> bool:
    """Whether a URL passes a test, as segmentation's conditions judge it: EQUALS exactly,
    CONTAINS and PATTERN case-insensitively."""
    if test.match == pb.URL_MATCH_EQUALS:
        return url == test.value
    if test.match == pb.URL_MATCH_CONTAINS:
        return test.value.lower() in url.lower()
    return _glob(test.value.lower(), url.lower())


def _fixed(part: str) -> re.Pattern[str]:
    """A run of a pattern between `*`s: literal characters and `?`s, of fixed length."""
    return re.compile("".join("." if c == "?" else re.escape(c) for c in part), re.DOTALL)


def _glob(pattern: str, text: str) -> bool:
    """`*`/`?` matching without backtracking: the runs between `*`s are found leftmost in turn
    (the first at the start, the last at the end), so a hostile URL costs at most one scan per run."""
    if "*" not in pattern:
        return _fixed(pattern).fullmatch(text) is not None
    first, *middle, last = pattern.split("*")
    start, end = len(first), len(text) - len(last)
    if end < start or not _fixed(first).match(text) or not _fixed(last).fullmatch(text, end):
        return False
    for part in middle:
        found = _fixed(part).search(text, start, end)
        if found is None:
            return False
        start = found.end()
    return True


def shown_on(trigger: pb.LiveTrigger, url: str) -> bool:
    """Whether a pop-up of this trigger shows on a page: one a page visit qualified for shows on
    such pages only; the others on any."""
    if trigger.WhichOneof("kind") != "page" or trigger.page.WhichOneof("rule") != "visit":
        return True
    return url_passes(trigger.page.visit, url)


def as_action(trigger: pb.LiveTrigger) -> pb.LiveTrigger:
    """The trigger as segmentation and the scheduler act on it: a page trigger is an action
    trigger on the web SDK's `Page Viewed` event, its test a condition on the event's
    properties."""
    if trigger.WhichOneof("kind") != "page":
        return trigger
    page = trigger.page
    rule = page.WhichOneof("rule")
    if rule == "visit":
        where = _url_condition("url", page.visit)
    elif rule == "referrer":
        where = _url_condition("referrer", page.referrer)
    elif rule == "utm_source":
        where = _condition("utm_source", segmentation_pb.OPERATOR_MATCHES, page.utm_source)
    else:
        at_least = segmentation_pb.OPERATOR_GREATER_THAN_OR_EQUAL
        where = _condition("session_page_count", at_least, page.page_count)
    event = pb.LiveEvent(event_name=PAGE_VIEWED, where=[where])
    return pb.LiveTrigger(action=pb.ActionTrigger(event=event))


def _check_page(page: pb.PageTrigger, path: str, check: Validator) -> None:
    rule = page.WhichOneof("rule")
    if not check.require(rule is not None, path, "required: visit, referrer, utm_source or page_count"):
        return
    if rule in ("visit", "referrer"):
        test: pb.UrlTest = getattr(page, rule)
        check.require(
            test.match in _URL_OPERATORS, f"{path}.{rule}.match", "required: EQUALS, CONTAINS or PATTERN"
        )
        check.require(
            0 < len(test.value) <= MAX_URL and test.value.isprintable(),
            f"{path}.{rule}.value",
            f"required: 1 to {MAX_URL:,} characters, no control characters",
        )
    elif rule == "utm_source":
        check.require(
            0 < len(page.utm_source) <= 200
            and page.utm_source.isprintable()
            and not {"*", "?"} & set(page.utm_source),
            f"{path}.utm_source",
            "required: 1 to 200 characters, none of them a control character, * or ?",
        )
    else:
        check.require(
            1 <= page.page_count <= MAX_PAGE_COUNT, f"{path}.page_count", f"1 to {MAX_PAGE_COUNT:,} pages"
        )


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
    if not check.require(kind is not None, path, "required: action, inaction, date_property or page"):
        return
    if kind == "page":
        _check_page(trigger.page, f"{path}.page", check)
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


def check_named_event(event: pb.LiveEvent, path: str, check: Validator) -> None:
    """An event with a name (a goal's, say), and conditions on its properties."""
    _check_event(event, path, False, check)


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
