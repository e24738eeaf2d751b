"""Campaign use cases: definition, lifecycle, results."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from google.protobuf import field_mask_pb2, json_format
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from herald.accounts.v1 import account_service_pb2 as pb_accounts
from herald.campaign.v1 import campaign_service_pb2 as pb
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald.events.v1 import events_pb2 as events
from herald.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald_campaign.accounts import settings_of
from herald_campaign.references import References
from herald_campaign.storage import (
    campaigns,
    failure_reasons,
    hourly_use,
    outbox,
    outcome_events,
    runs,
    stats,
)
from herald_common import api, channels, personalization, sms
from herald_common.auth import account_id_of, current_account_id, current_caller
from herald_common.bus import Subjects
from herald_common.db import Database
from herald_common.errors import FailedPrecondition, NotFound, Validator, invalid
from herald_common.hourly_quota import HourlyQuota
from herald_common.live import NOT_IN_AUDIENCE, check_live
from herald_common.outbox import OutboxEvent, enqueue
from herald_common.paging import keyset_page
from herald_common.popups import check_popup, rendered, variant_for
from herald_common.schedules import (
    account_zone,
    check_delivery,
    check_schedule,
    occurrences_after,
    parse_time_of_day,
)
from herald_common.skips import SkipReason
from herald_common.sms import check_sms_content
from herald_common.validation import check_text_fields

State = pb.State
_RUN_ENDED = {"RUN_STATE_DISPATCHED", "RUN_STATE_FAILED", "RUN_STATE_CANCELLED"}
MAX_DISPLAY_NAME = 200
_STATUS_COLUMNS = {
    events.DeliveryStatus.DELIVERY_STATUS_SENT: "sent",
    events.DeliveryStatus.DELIVERY_STATUS_FAILED: "failed",
    events.DeliveryStatus.DELIVERY_STATUS_SKIPPED: "skipped",
    events.DeliveryStatus.DELIVERY_STATUS_UNKNOWN: "unknown",
}
_RECEIPT_COLUMNS = {
    events.ReceiptStatus.RECEIPT_STATUS_DELIVERED: "delivered",
    events.ReceiptStatus.RECEIPT_STATUS_UNDELIVERED: "undelivered",
    events.ReceiptStatus.RECEIPT_STATUS_FAILED: "receipt_failed",
}
_POPUP_COLUMNS = {
    events.WebInteractionKind.WEB_INTERACTION_KIND_VIEWED: "viewed",
    events.WebInteractionKind.WEB_INTERACTION_KIND_CLICKED: "clicked",
    events.WebInteractionKind.WEB_INTERACTION_KIND_CLOSED: "closed",
    events.WebInteractionKind.WEB_INTERACTION_KIND_EXPIRED: "expired",
}
# Reasons kept per campaign, and users kept as examples of each.
MAX_REASON_LENGTH = 300
MAX_EXAMPLES = 5
_UPDATABLE = {
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
}
MAX_CONTROL_PERCENT = 90
MAX_TEST_MESSAGES = 5
# Test messages one API key may send an hour (they are real texts, and cost money).
TEST_MESSAGES_PER_KEY_HOUR = 50
# SMS providers that carry India's DLT ids: each needs the campaign's template id to reach +91
# numbers, and those named here also their destination's principal entity id.
DLT_PROVIDERS = {"exotel", "msg91", "netcore", "vonage"}
ENTITY_ID_PROVIDERS = {"netcore", "vonage"}
# Caps below this are refused: a sample that small says little, a limit that small is a typo.
MIN_CAP = 100
_OUTPUT_ONLY = ("name", "state", "create_time", "update_time", "publish_time", "failure_reason", "warnings")


def _state_name(state: State.ValueType) -> str:
    return State.Name(state)


def _message(row: Any) -> pb.Campaign:
    campaign = pb.Campaign.FromString(row.spec)
    campaign.name = f"campaigns/{row.id}"
    campaign.state = State.Value(row.state)
    campaign.create_time.CopyFrom(api.timestamp(row.created_at))
    campaign.update_time.CopyFrom(api.timestamp(row.updated_at))
    if row.published_at is not None:
        campaign.publish_time.CopyFrom(api.timestamp(row.published_at))
    campaign.failure_reason = row.failure_reason
    return campaign


def _validate_shape(campaign: pb.Campaign, check: Validator) -> None:
    check_text_fields(_spec(campaign), "campaign", check)
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
    _check_targeting(campaign.targeting, live, check)
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


def _check_targeting(targeting: pb.Targeting, live: bool, check: Validator) -> None:
    check.require(
        0 <= targeting.control_group_percent <= MAX_CONTROL_PERCENT,
        "campaign.targeting.control_group_percent",
        f"0 to {MAX_CONTROL_PERCENT} percent",
    )
    cap = targeting.WhichOneof("cap")
    field = f"campaign.targeting.{cap}"
    if cap in _LIVE_CAPS:
        if check.require(live, field, "for live campaigns only (a run's cap is random_cap)"):
            check.require(getattr(targeting, cap) >= 1, field, "at least 1 message")
    elif cap is not None and check.require(
        not live, field, "a live campaign's cap is total_limit or daily_limit"
    ):
        check.require(getattr(targeting, cap) >= MIN_CAP, field, f"at least {MIN_CAP} users")


_LIVE_CAPS = ("total_limit", "daily_limit")


def _check_ahead(
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


def _spec_columns(spec: pb.Campaign) -> dict[str, Any]:
    """The stored spec and the references it holds, kept in columns so campaigns can be found by
    what they use."""
    return {
        "spec": spec.SerializeToString(),
        # The saved segment or list the audience is, if it is one.
        "segment": spec.audience.segment or spec.audience.list,
        "destination": spec.destination,
    }


def _spec(campaign: pb.Campaign) -> pb.Campaign:
    """The campaign as stored: what the user defined, without output-only fields."""
    spec = pb.Campaign()
    spec.CopyFrom(campaign)
    for field in _OUTPUT_ONLY:
        spec.ClearField(field)  # type: ignore[arg-type]
    spec.display_name = campaign.display_name.strip()
    return spec


def _owned(campaign_id: uuid.UUID) -> sa.ColumnElement[bool]:
    """The campaign, if the caller's account owns it: another account's answers NOT_FOUND."""
    return sa.and_(campaigns.c.id == campaign_id, campaigns.c.account_id == current_account_id())


def _stoppable(name: str, state: str) -> None:
    if state not in (_state_name(State.STATE_SCHEDULED), _state_name(State.STATE_RUNNING)):
        raise FailedPrecondition(
            name, f"only a scheduled or running campaign can be stopped; {name} is {state}"
        )


class Campaigns:
    def __init__(
        self, database: Database, subjects: Subjects, references: References, notify: Callable[[], None]
    ) -> None:
        self.database = database
        self.subjects = subjects
        self.references = references
        self._notify = notify
        self.test_messages = HourlyQuota(database, hourly_use)

    async def _changed(self, session: AsyncSession, row: Any) -> None:
        event = events.CampaignChanged(
            event_id=str(uuid.uuid4()),
            occur_time=api.timestamp(api.utcnow()),
            campaign=_message(row),
            version=row.version,
            account=f"accounts/{row.account_id}" if row.account_id else "",
        )
        settings, version = await settings_of(session, row.account_id)
        event.account_settings.CopyFrom(settings)
        event.account_settings_version = version
        await enqueue(
            session, outbox, [OutboxEvent.of(self.subjects.campaign_changed, event, event.event_id)]
        )

    async def create(self, campaign: pb.Campaign, request_id: str) -> pb.Campaign:
        check = Validator()
        _validate_shape(campaign, check)
        check.require(len(request_id) <= 200, "request_id", "at most 200 characters")
        check.raise_if_any()
        account_id = current_account_id()
        same_request = sa.and_(campaigns.c.account_id == account_id, campaigns.c.request_id == request_id)
        if request_id:
            async with self.database.transaction() as session:
                existing = (await session.execute(sa.select(campaigns).where(same_request))).first()
            if existing is not None:
                return _message(existing)
        warnings = await self._check_references(campaign)
        spec = _spec(campaign)
        async with self.database.transaction() as session:
            row = (
                await session.execute(
                    insert(campaigns)
                    .values(
                        id=uuid.uuid4(),
                        account_id=account_id,
                        state=_state_name(State.STATE_DRAFT),
                        request_id=request_id or None,
                        **_spec_columns(spec),
                    )
                    .on_conflict_do_nothing(index_elements=[campaigns.c.account_id, campaigns.c.request_id])
                    .returning(*campaigns.c)
                )
            ).first()
            if row is None:  # a concurrent create with the same request_id won
                row = (await session.execute(sa.select(campaigns).where(same_request))).one()
            else:
                await session.execute(insert(stats).values(campaign_id=row.id, account_id=account_id))
                await self._changed(session, row)
        self._notify()
        created = _message(row)
        created.warnings.extend(warnings)
        return created

    async def _check_references(self, campaign: pb.Campaign) -> list[str]:
        """The segment and destination exist, and the destination takes this kind of content;
        the campaign records the destination's kind. Answers warnings (a live trigger on events
        never sent)."""
        warnings = []
        if campaign.audience.WhichOneof("source") is not None:
            await self.references.audience(campaign.audience, "campaign.audience")
        if campaign.schedule.WhichOneof("when") == "live":
            warnings = await self.references.live_trigger(
                campaign.schedule.live.trigger, "campaign.schedule.live.trigger"
            )
        destination = await self.references.destination(campaign.destination, "campaign.destination")
        content = campaign.WhichOneof("content") or ""
        kinds = channels.for_content(content)
        kind = next((k for k in kinds if k.destination_enum == destination.type), None)
        if kind is None:
            type_name = dispatch_pb.DestinationType.Name
            raise invalid(
                f"campaign.{content}",
                f"{campaign.destination} is a {type_name(destination.type)} destination; "
                f"{content} content needs {' or '.join(type_name(k.destination_enum) for k in kinds)}",
            )
        campaign.destination_type = kind.destination_type
        if kind.destination_type == "mparticle" and campaign.schedule.live.delay.ToTimedelta():
            raise invalid(
                "campaign.schedule.live.delay",
                "an mParticle export is not triggered for live campaigns with a delay: "
                "send it as the user acts (no delay)",
            )
        return warnings

    async def update(self, campaign: pb.Campaign, update_mask: field_mask_pb2.FieldMask) -> pb.Campaign:
        api.parse_uuid_name(campaign.name, "campaigns", "campaign.name")
        current = await self.get(campaign.name)
        paths = list(update_mask.paths)
        if not paths:
            paths = [field.name for field, _ in campaign.ListFields() if field.name in _UPDATABLE]
        elif paths == ["*"]:
            paths = sorted(_UPDATABLE)
        refused = [p for p in paths if p.split(".")[0] not in _UPDATABLE]
        if refused or not paths:
            raise invalid(
                "update_mask", f"can change only {', '.join(sorted(_UPDATABLE))}; got {refused or 'nothing'}"
            )
        merged = pb.Campaign()
        merged.CopyFrom(current)
        try:
            field_mask_pb2.FieldMask(paths=paths).MergeMessage(campaign, merged, True, True)
        except ValueError as error:
            raise invalid("update_mask", str(error)) from None
        check = Validator()
        _validate_shape(merged, check)
        check.raise_if_any()
        warnings = await self._check_references(merged)
        async with self.database.transaction() as session:
            row = await self._locked(session, campaign.name)
            if row.state != _state_name(State.STATE_DRAFT):
                raise FailedPrecondition(campaign.name, f"only a draft can be changed; it is {row.state}")
            row = (
                await session.execute(
                    sa.update(campaigns)
                    .where(campaigns.c.id == row.id)
                    .values(
                        **_spec_columns(_spec(merged)),
                        updated_at=sa.func.now(),
                        version=campaigns.c.version + 1,
                    )
                    .returning(*campaigns.c)
                )
            ).one()
            await self._changed(session, row)
        self._notify()
        updated = _message(row)
        updated.warnings.extend(warnings)
        return updated

    async def delete(self, name: str) -> None:
        async with self.database.transaction() as session:
            row = await self._locked(session, name)
            if row.state != _state_name(State.STATE_DRAFT):
                raise FailedPrecondition(name, f"only a draft can be deleted; {name} is {row.state}")
            await session.execute(sa.delete(stats).where(stats.c.campaign_id == row.id))
            await session.execute(sa.delete(campaigns).where(campaigns.c.id == row.id))

    async def _locked(self, session: AsyncSession, name: str) -> Any:
        campaign_id = api.parse_uuid_name(name, "campaigns")
        row = (
            await session.execute(sa.select(campaigns).where(_owned(campaign_id)).with_for_update())
        ).first()
        if row is None:
            raise NotFound(name)
        return row

    async def _set_state(
        self, session: AsyncSession, campaign_id: uuid.UUID, state: State.ValueType, **values: Any
    ) -> Any:
        row = (
            await session.execute(
                sa.update(campaigns)
                .where(campaigns.c.id == campaign_id)
                .values(
                    state=_state_name(state),
                    updated_at=sa.func.now(),
                    version=campaigns.c.version + 1,
                    **values,
                )
                .returning(*campaigns.c)
            )
        ).one()
        await self._changed(session, row)
        return row

    async def get(self, name: str) -> pb.Campaign:
        campaign_id = api.parse_uuid_name(name, "campaigns")
        async with self.database.transaction() as session:
            row = (
                await session.execute(
                    sa.select(campaigns, stats.c.waiting_reason)
                    .outerjoin(stats, stats.c.campaign_id == campaigns.c.id)
                    .where(_owned(campaign_id))
                )
            ).first()
        if row is None:
            raise NotFound(name)
        found = _message(row)
        under_way = row.state in (_state_name(State.STATE_SCHEDULED), _state_name(State.STATE_RUNNING))
        found.state_reason = row.failure_reason or (row.waiting_reason if under_way else "") or ""
        return found

    async def list(self, request: pb.ListCampaignsRequest) -> tuple[list[pb.Campaign], str]:
        """A page of campaigns, newest first, narrowed to those using a segment or destination or
        in given states (how segmentation and dispatch learn whether what they delete is in use)."""
        check = Validator()
        check_text_fields(request, "", check)
        check.raise_if_any()
        where = [campaigns.c.account_id == current_account_id()]
        if request.segment:
            api.parse_uuid_name(request.segment, "segments", "segment")
            where.append(campaigns.c.segment == request.segment)
        if request.destination:
            api.parse_uuid_name(request.destination, "destinations", "destination")
            where.append(campaigns.c.destination == request.destination)
        if request.list:
            api.parse_uuid_name(request.list, "lists", "list")
            where.append(campaigns.c.segment == request.list)
        if request.states:
            where.append(campaigns.c.state.in_([_state_name(s) for s in request.states]))
        async with self.database.transaction() as session:
            rows, next_token = await keyset_page(
                session, campaigns, request.page_size, request.page_token, *where
            )
        return [_message(r) for r in rows], next_token

    async def publish(self, name: str) -> pb.Campaign:
        async with self.database.transaction() as session:
            row = await self._locked(session, name)
            if row.state != _state_name(State.STATE_DRAFT):
                raise FailedPrecondition(name, f"only a draft can be published; {name} is {row.state}")
            spec = pb.Campaign.FromString(row.spec)
            now = api.utcnow()
            account, _ = await settings_of(session, row.account_id)
            notes = _check_ahead(name, spec, now, account)
            await self._check_dlt(name, spec)
            row = await self._set_state(session, row.id, State.STATE_SCHEDULED, published_at=now)
        self._notify()
        published = _message(row)
        published.publish_notes.extend(notes)
        return published

    async def _check_dlt(self, name: str, spec: pb.Campaign) -> None:
        """India's DLT rules: an SMS campaign that reaches +91 numbers through a provider carrying
        DLT ids (or a group with one) needs its content template id, and the provider's
        destination its principal entity id."""
        if spec.WhichOneof("content") != "sms":
            return
        destination = await self.references.destination(spec.destination, "campaign.destination")
        providers = [destination]
        if destination.WhichOneof("config") == "sms_provider_group":
            providers = [
                await self.references.destination(member, "campaign.destination")
                for member in destination.sms_provider_group.destinations
            ]
        kinds = {p.WhichOneof("config") or "" for p in providers}
        no_entity = [
            p.name
            for p in providers
            if p.WhichOneof("config") in ENTITY_ID_PROVIDERS
            and not getattr(p, p.WhichOneof("config") or "").dlt_entity_id
        ]
        if not (kinds & DLT_PROVIDERS) or not await self.references.reaches_india(spec.audience):
            return
        if not spec.sms.dlt_template_id:
            raise FailedPrecondition(
                name,
                f"campaign.sms.dlt_template_id is required: {name} sends to +91 numbers through "
                f"{', '.join(sorted(kinds & DLT_PROVIDERS))}, and India's DLT rules need the approved "
                "template's id",
            )
        if no_entity:
            raise FailedPrecondition(
                name,
                f"{name} sends to +91 numbers through {', '.join(no_entity)}, which has no "
                "dlt_entity_id: India's DLT rules need the principal entity's id",
            )

    async def stop(self, name: str) -> pb.Campaign:
        """Stops the campaign (its pending runs are cancelled), then has dispatch halt its
        deliveries on every replica: once this returns, no new provider request of it starts.
        Stopping a stopped campaign halts again, so a stop whose halt failed can be retried."""
        async with self.database.transaction() as session:
            row = await self._locked(session, name)
            if row.state != _state_name(State.STATE_STOPPED):
                _stoppable(name, row.state)
                row = await self._set_state(session, row.id, State.STATE_STOPPED)
        self._notify()
        await self.references.halt_deliveries(name)
        return _message(row)

    async def explain(self, campaign_name: str, user_id: str) -> pb.DeliveryExplanation:
        """Why a user did or did not get the campaign: per run, from the delivery results dispatch
        recorded and the runs the scheduler reported."""
        campaign_id = api.parse_uuid_name(campaign_name, "campaigns", "campaign")
        async with self.database.transaction() as session:
            found = (
                await session.execute(
                    sa.select(campaigns.c.state, campaigns.c.spec).where(_owned(campaign_id))
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
        settled = state not in (_state_name(State.STATE_SCHEDULED), _state_name(State.STATE_RUNNING))
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
        return explanation

    async def preview(self, body: str, user_id: str) -> pb.MessagePreview:
        """An SMS body rendered for one user, with how it travels (encoding, length, segments)."""
        check = Validator()
        problem = sms.body_problem(body)
        if problem:
            check.add("body", problem)
        check.require(bool(user_id), "user_id", "required")
        check.raise_if_any()
        user = await self.references.user(user_id, "user_id")
        try:
            text = await personalization.render_off_loop(body, _profile_of(user))
        except personalization.PersonalizationError as error:
            reason = f"the body cannot be rendered for {user_id}: {error}"
            raise FailedPrecondition(f"users/{user_id}", reason) from None
        measured = sms.measure(text)
        return pb.MessagePreview(
            text=text,
            encoding=_ENCODINGS[measured.encoding],
            characters=measured.characters,
            units=measured.units,
            segments=measured.segments,
        )

    async def preview_popup(self, content: pb.WebPopupContent, user_id: str) -> pb.MessagePreview:
        """A web pop-up's messages rendered for one user, and the variant they would get."""
        check = Validator()
        check_popup(content, "web_popup", check)
        check.require(bool(user_id), "user_id", "required")
        check.raise_if_any()
        profile = _profile_of(await self.references.user(user_id, "user_id"))
        chosen, _ = variant_for(content, profile)
        previews = []
        for value, message in [("", content.message), *((v.value, v.message) for v in content.variants)]:
            try:
                shown = rendered(message, profile)
            except personalization.PersonalizationError as error:
                reason = f"the pop-up cannot be rendered for {user_id}: {error}"
                raise FailedPrecondition(f"users/{user_id}", reason) from None
            previews.append(
                pb.PopupPreview(
                    variant=value,
                    title=shown["title"],
                    body=shown["body"],
                    button_text=shown.get("button", {}).get("text", ""),
                    image_url=shown.get("image_url", ""),
                )
            )
        return pb.MessagePreview(popups=previews, chosen_variant=chosen)

    async def send_test(self, request: pb.SendTestMessageRequest) -> pb.SendTestMessageResponse:
        """The campaign's SMS, rendered for each number (empty profile) or test user (their own),
        sent now through its destination; never counted in its stats."""
        check = Validator()
        count = len(request.phone_numbers) + len(request.user_ids)
        check.require(
            1 <= count <= MAX_TEST_MESSAGES,
            "phone_numbers",
            f"1 to {MAX_TEST_MESSAGES} numbers and users in all",
        )
        for i, phone in enumerate(request.phone_numbers):
            check.require(
                bool(sms.E164.match(phone)),
                f"phone_numbers[{i}]",
                "an E.164 number, for example +14155550100",
            )
        for i, user_id in enumerate(request.user_ids):
            check.require(bool(user_id), f"user_ids[{i}]", "required")
        check.raise_if_any()
        caller, account_id = current_caller(), current_account_id()
        sender = f"key:{caller.key_id}" if caller and caller.key_id else f"account:{account_id}"
        await self.test_messages.take(
            account_id, sender, count, TEST_MESSAGES_PER_KEY_HOUR, "test messages per key"
        )
        campaign = await self.get(request.campaign)
        if campaign.WhichOneof("content") != "sms":
            raise FailedPrecondition(request.campaign, f"{request.campaign} is not an SMS campaign")
        body = campaign.sms.body
        results = [pb.TestMessageResult(phone=phone) for phone in request.phone_numbers]
        profiles: list[dict[str, Any]] = [{} for _ in request.phone_numbers]
        for i, user_id in enumerate(request.user_ids):
            user = await self.references.user(user_id, f"user_ids[{i}]")
            results.append(pb.TestMessageResult(phone=user.phone, user_id=user_id))
            profiles.append(_profile_of(user))
        sending: list[pb.TestMessageResult] = []
        for result, profile in zip(results, profiles, strict=True):
            if not result.phone:
                result.detail = "the user has no phone number"
                continue
            try:
                result.text = await personalization.render_off_loop(body, profile)
            except personalization.PersonalizationError as error:
                result.detail = f"personalization failed: {error}"
                continue
            sending.append(result)
        if sending:
            answers = await self.references.send_test_messages(
                campaign.destination, [(r.phone, r.text) for r in sending], campaign.sms.dlt_template_id
            )
            for result, answer in zip(sending, answers, strict=True):
                result.sent, result.detail = answer.sent, answer.detail
        return pb.SendTestMessageResponse(results=results)

    async def stats(self, name: str) -> pb.CampaignStats:
        if not name.endswith("/stats"):
            raise invalid("name", "must look like campaigns/<id>/stats")
        campaign_name = name.removesuffix("/stats")
        campaign_id = api.parse_uuid_name(campaign_name, "campaigns")
        async with self.database.transaction() as session:
            if await session.scalar(sa.select(campaigns.c.id).where(_owned(campaign_id))) is None:
                raise NotFound(campaign_name)
            counts = (
                await session.execute(sa.select(stats).where(stats.c.campaign_id == campaign_id))
            ).first()
            targeted = await session.scalar(
                sa.select(sa.func.coalesce(sa.func.sum(runs.c.targeted), 0)).where(
                    runs.c.campaign_id == campaign_id
                )
            )
            reasons = (
                await session.execute(
                    sa.select(failure_reasons)
                    .where(failure_reasons.c.campaign_id == campaign_id)
                    .order_by(failure_reasons.c.count.desc(), failure_reasons.c.reason)
                    .limit(50)
                )
            ).all()
        if counts is None:
            raise NotFound(campaign_name)
        return pb.CampaignStats(
            name=name,
            targeted=int(targeted or 0),
            sent=counts.sent,
            failed=counts.failed,
            skipped=counts.skipped,
            unknown=counts.unknown,
            resent=counts.resent,
            waiting_reason=counts.waiting_reason,
            receipts=pb.ReceiptCounts(
                delivered=counts.delivered, undelivered=counts.undelivered, failed=counts.receipt_failed
            ),
            popups=pb.PopupCounts(
                viewed=counts.viewed, clicked=counts.clicked, closed=counts.closed, expired=counts.expired
            ),
            failure_reasons=[
                pb.FailureReason(
                    reason=r.reason, count=r._mapping["count"], example_user_ids=r.example_user_ids
                )
                for r in reasons
            ],
        )

    # --- progress reported by the scheduler and dispatch -------------------------------------

    async def foreign_reports(self, claims: Sequence[tuple[str, str]]) -> dict[int, str]:
        """Which (campaign, account) claims of a batch of reports name an account that does not own
        the campaign, with why: those reports are set aside, never counted."""
        ids = {_campaign_id(campaign) for campaign, _ in claims}
        async with self.database.transaction() as session:
            found = await session.execute(
                sa.select(campaigns.c.id, campaigns.c.account_id).where(campaigns.c.id.in_(ids))
            )
            owners = {row.id: row.account_id for row in found}
        foreign = {}
        for i, (campaign, account) in enumerate(claims):
            owner = owners.get(_campaign_id(campaign))
            if owner is not None and owner != account_id_of(account):
                foreign[i] = f"{account or 'no account'} does not own {campaign}"
        return foreign

    async def record_runs(self, changes: Sequence[events.RunChanged]) -> None:
        """Stores run reports, newest version wins; moves the campaigns they belong to forward."""
        touched: set[uuid.UUID] = set()
        async with self.database.transaction() as session:
            for change in sorted(changes, key=lambda c: (c.run.name, c.version)):
                run = change.run
                campaign_id = uuid.UUID(run.campaign.removeprefix("campaigns/"))
                statement = insert(runs).values(
                    run=run.name,
                    account_id=account_id_of(change.account),
                    campaign_id=campaign_id,
                    state=scheduler_pb.RunState.Name(run.state),
                    targeted=run.targeted,
                    final=run.final,
                    error=run.error,
                    scheduled_at=api.from_timestamp(run.scheduled_time)
                    if run.HasField("scheduled_time")
                    else None,
                    version=change.version,
                )
                await session.execute(
                    statement.on_conflict_do_update(
                        index_elements=[runs.c.run],
                        set_={
                            "state": statement.excluded.state,
                            "targeted": statement.excluded.targeted,
                            "final": statement.excluded.final,
                            "error": statement.excluded.error,
                            "scheduled_at": statement.excluded.scheduled_at,
                            "version": statement.excluded.version,
                        },
                        where=runs.c.version < statement.excluded.version,
                    )
                )
                touched.add(campaign_id)
            await self._advance(session, touched)
        self._notify()

    async def record_outcomes(self, received: Sequence[events.DeliveryOutcomes]) -> None:
        """Counts each DeliveryOutcomes event once; completes campaigns whose deliveries all have one."""
        if not received:
            return
        async with self.database.transaction() as session:
            counted = await _count_results(session, received, _OUTCOME_COUNTS, _outcome_counts)
            await self._advance(session, counted)
        self._notify()

    async def record_receipts(self, received: Sequence[events.DeliveryReceipts]) -> None:
        """Counts each DeliveryReceipts event once (each delivery is in one such event)."""
        if not received:
            return
        async with self.database.transaction() as session:
            await _count_results(session, received, tuple(_RECEIPT_COLUMNS.values()), _receipt_counts)

    async def record_popup_interactions(self, received: Sequence[events.WebInteractions]) -> None:
        """Counts what visitors did with web pop-ups (each event once; each (delivery, kind) is in
        one event)."""
        if not received:
            return
        async with self.database.transaction() as session:
            await _count_results(session, received, tuple(_POPUP_COLUMNS.values()), _popup_counts)

    async def record_waiting(self, received: Sequence[events.DestinationWaiting]) -> None:
        """Shows on each campaign whether a destination holds its deliveries back; newest report wins."""
        async with self.database.transaction() as session:
            for event in sorted(received, key=lambda e: e.occur_time.ToNanoseconds()):
                when = api.from_timestamp(event.occur_time)
                await session.execute(
                    sa.update(stats)
                    .where(
                        stats.c.campaign_id == _campaign_id(event.campaign),
                        sa.or_(stats.c.waiting_changed_at.is_(None), stats.c.waiting_changed_at < when),
                    )
                    .values(
                        waiting_reason=f"{event.destination}: {event.reason}"[:MAX_REASON_LENGTH]
                        if event.reason
                        else "",
                        waiting_changed_at=when,
                    )
                )

    async def _advance(self, session: AsyncSession, campaign_ids: set[uuid.UUID]) -> None:
        """Moves campaigns forward: SCHEDULED → RUNNING when a run starts; → COMPLETED when every run
        ended and every delivery has an outcome; → FAILED when a run could not finish."""
        for campaign_id in sorted(campaign_ids):
            row = (
                await session.execute(
                    sa.select(campaigns).where(campaigns.c.id == campaign_id).with_for_update()
                )
            ).first()
            if row is None or row.state not in (
                _state_name(State.STATE_SCHEDULED),
                _state_name(State.STATE_RUNNING),
            ):
                continue
            reported = (await session.execute(sa.select(runs).where(runs.c.campaign_id == campaign_id))).all()
            if not reported:
                continue
            failed = [r for r in reported if r.state == "RUN_STATE_FAILED"]
            if failed:
                await self._set_state(
                    session, campaign_id, State.STATE_FAILED, failure_reason=failed[0].error
                )
                continue
            ended = [r for r in reported if r.state in _RUN_ENDED]
            final_done = any(r.final for r in ended) and len(ended) == len(reported)
            counts = (await session.execute(sa.select(stats).where(stats.c.campaign_id == campaign_id))).one()
            outcomes = counts.sent + counts.failed + counts.skipped + counts.unknown
            if final_done and outcomes >= sum(r.targeted for r in ended):
                await self._set_state(session, campaign_id, State.STATE_COMPLETED)
            elif row.state == _state_name(State.STATE_SCHEDULED):
                await self._set_state(session, campaign_id, State.STATE_RUNNING)


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


_ENCODINGS = {sms.Encoding.GSM7: pb.SMS_ENCODING_GSM7, sms.Encoding.UCS2: pb.SMS_ENCODING_UCS2}


def _profile_of(user: segmentation_pb.User) -> dict[str, Any]:
    """A user's profile as templates see it: custom properties, and system fields where set (as
    dispatch's recipients carry them)."""
    profile: dict[str, Any] = json_format.MessageToDict(user.properties)
    system = {
        "email": user.email,
        "phone": user.phone,
        "country": user.location.country,
        "region": user.location.region,
        "city": user.location.city,
        "date_of_birth": user.date_of_birth,
    }
    if user.gender:
        system["gender"] = segmentation_pb.Gender.Name(user.gender)
    profile.update({key: value for key, value in system.items() if value})
    return profile


def _campaign_id(name: str) -> uuid.UUID:
    return uuid.UUID(name.removeprefix("campaigns/"))


async def _not_counted_before(session: AsyncSession, received: Iterable[_ResultEvent[Any]]) -> set[str]:
    """The ids of the events not counted before, now marked counted."""
    return set(
        await session.scalars(
            insert(outcome_events)
            .on_conflict_do_nothing(index_elements=[outcome_events.c.event_id])
            .returning(outcome_events.c.event_id),
            [
                {
                    "event_id": e.event_id,
                    "campaign_id": _campaign_id(e.campaign),
                    "account_id": account_id_of(e.account),
                }
                for e in received
            ],
        )
    )


# The stats columns each kind of result event counts.
_OUTCOME_COUNTS = ("sent", "failed", "skipped", "unknown", "resent")


def _outcome_counts(result: events.DeliveryResult) -> tuple[list[str], str | None]:
    """The stats columns a delivery result adds one to, and its reason when it was not sent."""
    columns = [_STATUS_COLUMNS.get(result.status, "failed")] + ["resent"] * int(result.resent)
    if result.status == events.DeliveryStatus.DELIVERY_STATUS_SENT:
        return columns, None
    return columns, result.reason[:MAX_REASON_LENGTH] or "no reason given"


def _popup_counts(result: events.WebInteraction) -> tuple[list[str], str | None]:
    column = _POPUP_COLUMNS.get(result.kind)
    return ([column] if column else []), None


def _receipt_counts(result: events.ReceiptResult) -> tuple[list[str], str | None]:
    """The stats column a receipt adds one to (none for a status not counted), and its reason
    when the message was not delivered."""
    column = _RECEIPT_COLUMNS.get(result.status)
    if column is None:
        return [], None
    if result.status == events.ReceiptStatus.RECEIPT_STATUS_DELIVERED:
        return [column], None
    word = "undelivered" if column == "undelivered" else "failed after sending"
    reason = f"{word} ({result.error_code})" if result.error_code else word
    return [column], reason[:MAX_REASON_LENGTH]


_Result = TypeVar("_Result", covariant=True)


class _ResultEvent(Protocol[_Result]):
    """An event of delivery results (DeliveryOutcomes, DeliveryReceipts, WebInteractions) for one
    campaign."""

    @property
    def event_id(self) -> str: ...
    @property
    def campaign(self) -> str: ...
    @property
    def account(self) -> str: ...
    @property
    def results(self) -> Sequence[_Result]: ...


_R = TypeVar("_R", events.DeliveryResult, events.ReceiptResult, events.WebInteraction)


async def _count_results(
    session: AsyncSession,
    received: Sequence[_ResultEvent[_R]],
    columns: Sequence[str],
    counts_of: Callable[[_R], tuple[list[str], str | None]],
) -> set[uuid.UUID]:
    """Adds the results of the events not counted before to their campaigns' stats and failure
    reasons; returns the campaigns counted."""
    by_event = {e.event_id: e for e in received}
    new = await _not_counted_before(session, by_event.values())
    counts: dict[uuid.UUID, Counter[str]] = {}
    reasons: dict[tuple[uuid.UUID, str], list[str]] = {}
    owners: dict[uuid.UUID, uuid.UUID | None] = {}
    for event in (by_event[e] for e in sorted(new)):
        campaign_id = _campaign_id(event.campaign)
        owners[campaign_id] = account_id_of(event.account)
        tally = counts.setdefault(campaign_id, Counter())
        for result in event.results:
            added, reason = counts_of(result)
            tally.update(added)
            if reason is not None:
                reasons.setdefault((campaign_id, reason), []).append(result.user_id)
    for campaign_id, tally in sorted(counts.items()):
        await session.execute(
            sa.update(stats)
            .where(stats.c.campaign_id == campaign_id)
            .values({c: stats.c[c] + tally[c] for c in columns})
        )
    await _count_reasons(session, reasons, owners)
    return set(counts)


async def _count_reasons(
    session: AsyncSession,
    reasons: dict[tuple[uuid.UUID, str], list[str]],
    owners: Mapping[uuid.UUID, uuid.UUID | None],
) -> None:
    if not reasons:
        return
    statement = insert(failure_reasons)
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[failure_reasons.c.campaign_id, failure_reasons.c.reason],
            set_={
                "count": failure_reasons.c.count + statement.excluded.count,
                "example_user_ids": sa.literal_column(
                    f"(failure_reasons.example_user_ids || excluded.example_user_ids)[1:{MAX_EXAMPLES}]"
                ),
            },
        ),
        [
            {
                "campaign_id": campaign_id,
                "account_id": owners[campaign_id],
                "reason": reason,
                "count": len(users),
                "example_user_ids": users[:MAX_EXAMPLES],
            }
            for (campaign_id, reason), users in sorted(reasons.items())
        ],
    )
