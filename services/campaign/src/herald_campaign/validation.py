"""What a campaign must be to be saved, and to be published."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from google.protobuf.timestamp_pb2 import Timestamp

from herald.accounts.v1 import account_service_pb2 as pb_accounts
from herald.campaign.v1 import campaign_service_pb2 as pb
from herald_common import api, personalization
from herald_common.errors import FailedPrecondition, Validator, invalid
from herald_common.live import check_live, check_named_event
from herald_common.popups import check_popup
from herald_common.schedules import (
    account_zone,
    check_delivery,
    check_schedule,
    occurrences_after,
    parse_time_of_day,
)
from herald_common.sms import check_sms_content
from herald_common.validation import check_text_fields

MAX_DISPLAY_NAME = 200


UPDATABLE = {
    "display_name",
    "audience",
    "destination",
    "schedule",
    "targeting",
    "delivery",
    "segment_export",
    "sms",
    "mparticle_export",
    "web_popup",
    "goal",
}
# A goal's conversion window.
MIN_CONVERSION_WINDOW = timedelta(hours=1)
MAX_CONVERSION_WINDOW = timedelta(days=30)


MAX_CONTROL_PERCENT = 90


# SMS providers that carry India's DLT ids: each needs the campaign's template id to reach +91
# numbers, and those named here also their destination's principal entity id.
DLT_PROVIDERS = {"exotel", "msg91", "netcore", "vonage"}


ENTITY_ID_PROVIDERS = {"netcore", "vonage"}


# Caps below this are refused: a sample that small says little, a limit that small is a typo.
MIN_CAP = 100


_OUTPUT_ONLY = ("name", "state", "create_time", "update_time", "publish_time", "failure_reason", "warnings")


def validate_shape(campaign: pb.Campaign, check: Validator) -> None:
    check_text_fields(stored_spec(campaign), "campaign", check)
    check.require(bool(campaign.display_name.strip()), "campaign.display_name", "required")
    check.require(
        len(campaign.display_name) <= MAX_DISPLAY_NAME,
        "campaign.display_name",
        f"at most {MAX_DISPLAY_NAME} characters",
    )
    live = campaign.schedule.WhichOneof("when") == "live"
    if live:
        check_live(campaign.schedule.live, "campaign.schedule.live", check)
    source = campaign.audience.WhichOneof("source")
    if source is None:
        # A live campaign without one reaches everyone who qualifies.
        check.require(live, "campaign.audience", "required: a segment, a filter or a list")
    elif source == "segment":
        check.require(
            campaign.audience.segment.startswith("segments/"),
            "campaign.audience.segment",
            "must look like segments/<id>",
        )
    elif source == "list":
        check.require(
            campaign.audience.list.startswith("lists/"),
            "campaign.audience.list",
            "must look like lists/<id>",
        )
    if check.require(bool(campaign.destination), "campaign.destination", "required"):
        check.require(
            campaign.destination.startswith("destinations/"),
            "campaign.destination",
            "must look like destinations/<id>",
        )
    check_schedule(campaign.schedule, "campaign.schedule", check)
    _check_targeting(campaign.targeting, live, campaign.delivery.HasField("best_time"), check)
    if campaign.HasField("goal"):
        _check_goal(campaign.goal, "campaign.goal", check)
    check_delivery(campaign, "campaign.delivery", check)
    content = campaign.WhichOneof("content")
    check.require(content is not None, "campaign.content", "required: exactly one kind of content")
    if content == "segment_export":
        export = campaign.segment_export
        _check_export(
            "campaign.segment_export",
            export.event_name,
            export.profile_attributes,
            ("custom_properties", export.custom_properties),
            SEGMENT_LIMITS,
            check,
        )
    if content == "mparticle_export":
        mparticle = campaign.mparticle_export
        _check_export(
            "campaign.mparticle_export",
            mparticle.event_name,
            mparticle.profile_attributes,
            ("custom_attributes", mparticle.custom_attributes),
            MPARTICLE_LIMITS,
            check,
        )
        check.require(
            mparticle.custom_event_type in ("", *MPARTICLE_EVENT_TYPES),
            "campaign.mparticle_export.custom_event_type",
            f"one of {', '.join(MPARTICLE_EVENT_TYPES)}",
        )
    if content == "sms":
        check_sms_content(campaign.sms, "campaign.sms", check)
    if content == "web_popup":
        check_popup(campaign.web_popup, "campaign.web_popup", check)
        check.require(
            live, "campaign.schedule.live", "required: a web pop-up is shown as visitors qualify (live)"
        )
    if live and campaign.schedule.live.trigger.WhichOneof("kind") == "page":
        check.require(content == "web_popup", "campaign.schedule.live.trigger.page", "only for web pop-ups")


@dataclass(frozen=True)
class ExportLimits:
    """What an export's destination takes: counts, and lengths in characters."""

    profile_attributes: int
    pairs: int
    event_name: int = 0  # 0: no limit
    key: int = 0
    static_value: int = 0


SEGMENT_LIMITS = ExportLimits(profile_attributes=50, pairs=50)


# mParticle's documented limits: 100 user attributes per batch and 100 attributes per event,
# names of 256 characters, values of 4,096.
MPARTICLE_LIMITS = ExportLimits(profile_attributes=100, pairs=100, event_name=256, key=256, static_value=4096)


MPARTICLE_EVENT_TYPES = (
    "attribution",
    "location",
    "media",
    "navigation",
    "search",
    "social",
    "transaction",
    "user_content",
    "user_preference",
    "other",
)


def _check_export(
    path: str,
    event_name: str,
    profile_attributes: Sequence[str],
    pairs: tuple[str, Mapping[str, str]],
    limits: ExportLimits,
    check: Validator,
) -> None:
    """An export's event name, profile attributes and custom key-value pairs (Liquid)."""
    if check.require(bool(event_name.strip()), f"{path}.event_name", "required"):
        check.require(
            not limits.event_name or len(event_name) <= limits.event_name,
            f"{path}.event_name",
            f"at most {limits.event_name} characters",
        )
    check.require(
        len(profile_attributes) <= limits.profile_attributes,
        f"{path}.profile_attributes",
        f"at most {limits.profile_attributes} profile attributes",
    )
    for i, key in enumerate(profile_attributes):
        field = f"{path}.profile_attributes[{i}]"
        if check.require(bool(key.strip()), field, "empty"):
            check.require(not limits.key or len(key) <= limits.key, field, f"at most {limits.key} characters")
    pairs_name, values = pairs
    check.require(
        len(values) <= limits.pairs, f"{path}.{pairs_name}", f"at most {limits.pairs} custom key-value pairs"
    )
    for key, template in values.items():
        field = f"{path}.{pairs_name}[{key}]"
        if not check.require(bool(key.strip()), field, "empty key"):
            continue
        check.require(
            not limits.key or len(key) <= limits.key, field, f"a key of at most {limits.key} characters"
        )
        check.require(
            not limits.static_value or len(template) <= limits.static_value,
            field,
            f"a value of at most {limits.static_value:,} characters",
        )
        problem = personalization.problem(template)
        if problem:
            check.add(field, problem)


def _check_goal(goal: pb.Goal, path: str, check: Validator) -> None:
    check_named_event(goal.event, f"{path}.event", check)
    window = goal.conversion_window.ToTimedelta()
    check.require(
        goal.HasField("conversion_window") and MIN_CONVERSION_WINDOW <= window <= MAX_CONVERSION_WINDOW,
        f"{path}.conversion_window",
        "required: 1 hour to 30 days",
    )
    check.require(len(goal.revenue_property) <= 200, f"{path}.revenue_property", "at most 200 characters")


def _check_targeting(targeting: pb.Targeting, live: bool, best_time: bool, check: Validator) -> None:
    check.require(
        0 <= targeting.control_group_percent <= MAX_CONTROL_PERCENT,
        "campaign.targeting.control_group_percent",
        f"0 to {MAX_CONTROL_PERCENT} percent",
    )
    cap = targeting.WhichOneof("cap")
    field = f"campaign.targeting.{cap}"
    if cap == "daily_limit" and best_time:
        check.require(targeting.daily_limit >= 1, field, "at least 1 message")
    elif cap in _LIVE_CAPS:
        if check.require(live, field, "for live campaigns only (a run's cap is random_cap)"):
            check.require(getattr(targeting, cap) >= 1, field, "at least 1 message")
    elif cap is not None and check.require(
        not live, field, "a live campaign's cap is total_limit or daily_limit"
    ):
        check.require(getattr(targeting, cap) >= MIN_CAP, field, f"at least {MIN_CAP} users")


_LIVE_CAPS = ("total_limit", "daily_limit")


def check_ahead(
    name: str, spec: pb.Campaign, now: datetime, account: pb_accounts.AccountSettings
) -> list[str]:
    """At publish, a schedule's fixed time must be ahead (with delivery in users' zones, ahead in
    the last zone), several times must have one ahead (those past are dropped: returned as notes),
    a recurring schedule an occurrence ahead, a cut-off must come after the send time, and a
    throttle needs the account's limit."""
    schedule = spec.schedule
    when = schedule.WhichOneof("when")
    zone = account_zone(account)

    def ahead(send_time: Timestamp) -> bool:
        return bool(occurrences_after(_single(spec, send_time), zone, now, 1, under_way=True))

    if when == "send_later" and not ahead(schedule.send_later.send_time):
        raise invalid("campaign.schedule.send_later.send_time", _PAST)
    notes: list[str] = []
    if when == "send_multiple":
        times = schedule.send_multiple.send_times
        past = [i for i, send_time in enumerate(times) if not ahead(send_time)]
        if len(past) == len(times):
            check = Validator()
            for i in past:
                check.add(f"campaign.schedule.send_multiple.send_times[{i}]", _PAST)
            check.raise_if_any()
        notes += [
            f"campaign.schedule.send_multiple.send_times[{i}] "
            f"({api.from_timestamp(times[i]).isoformat()}) was past: dropped"
            for i in past
        ]
    _check_cutoff(spec, zone)
    if (
        when == "live"
        and schedule.live.HasField("end_time")
        and api.from_timestamp(schedule.live.end_time) <= now
    ):
        raise invalid("campaign.schedule.live.end_time", "is in the past")
    if when == "recurring" and not occurrences_after(spec, zone, now, 1, under_way=True):
        raise FailedPrecondition(name, f"the recurring schedule of {name} has no occurrence after now")
    if spec.delivery.throttle and account.throttle_per_five_minutes <= 0:
        raise FailedPrecondition(
            name,
            "campaign.delivery.throttle needs the account's throttle limit: set "
            "AccountSettings.throttle_per_five_minutes first",
        )
    return notes


def _check_cutoff(spec: pb.Campaign, zone: ZoneInfo) -> None:
    """A cut-off at the very time of day a schedule sends would skip every delivery: it must come
    after it."""
    cutoff = parse_time_of_day(spec.delivery.cutoff_time) if spec.delivery.cutoff_time else None
    if cutoff is None:
        return
    schedule = spec.schedule
    when = schedule.WhichOneof("when")
    if when == "recurring":
        send_times = [parse_time_of_day(schedule.recurring.time_of_day)]
    elif when == "send_later":
        send_times = [api.from_timestamp(schedule.send_later.send_time).astimezone(zone).time()]
    elif when == "send_multiple":
        send_times = [
            api.from_timestamp(t).astimezone(zone).time() for t in schedule.send_multiple.send_times
        ]
    else:
        return
    if any(t is not None and t.replace(second=0, microsecond=0) == cutoff for t in send_times):
        raise invalid(
            "campaign.delivery.cutoff_time",
            f"{spec.delivery.cutoff_time} is the send time itself: a cut-off must come after it",
        )


_PAST = (
    "is in the past (with delivery in users' time zones: already past in every zone, the last being UTC-12)"
)


def _single(spec: pb.Campaign, send_time: Timestamp) -> pb.Campaign:
    """The campaign as if it had only this send time."""
    single = pb.Campaign()
    single.delivery.CopyFrom(spec.delivery)
    single.schedule.send_later.send_time.CopyFrom(send_time)
    return single


def spec_columns(spec: pb.Campaign) -> dict[str, Any]:
    """The stored spec and the references it holds, kept in columns so campaigns can be found by
    what they use."""
    return {
        "spec": spec.SerializeToString(),
        # The saved segment or list the audience is, if it is one.
        "segment": spec.audience.segment or spec.audience.list,
        "destination": spec.destination,
    }


def stored_spec(campaign: pb.Campaign) -> pb.Campaign:
    """The campaign as stored: what the user defined, without output-only fields."""
    spec = pb.Campaign()
    spec.CopyFrom(campaign)
    for field in _OUTPUT_ONLY:
        spec.ClearField(field)  # type: ignore[arg-type]
    spec.display_name = campaign.display_name.strip()
    return spec
