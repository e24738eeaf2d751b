"""Segmentation use cases: saved segments, and who an audience selects (reach and members)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, aggregate_order_by, insert
from sqlalchemy.ext.asyncio import AsyncSession

from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_common import api
from herald_common.auth import SERVICE_ROLE, current_account_id, current_caller
from herald_common.campaign_usage import CampaignUsage
from herald_common.db import Built, Database, Statement, text_in
from herald_common.errors import FailedPrecondition, NotFound, Validator, invalid
from herald_common.hourly_quota import HourlyQuota
from herald_common.paging import keyset_page
from herald_common.validation import check_text_fields
from herald_segmentation.activity import add_best_hours
from herald_segmentation.audience_snapshots import AudienceSnapshot
from herald_segmentation.filters import (
    MAX_DEPTH,
    Context,
    in_list,
    property_keys,
    reachable,
    references,
    to_sql,
    validate_event_where,
    validate_filter,
)
from herald_segmentation.properties import PropertyType, event_subject, known_types
from herald_segmentation.storage import (
    LEFT_OUT_BY_SAMPLE,
    LEFT_OUT_UNREACHABLE,
    audience_snapshots,
    devices,
    events,
    hourly_use,
    lists,
    property_types,
    segments,
    users,
)

# What key holders may read of audiences per account and hour (a stream copies a whole audience).
ESTIMATES_PER_HOUR = 3600
AUDIENCE_STREAMS_PER_HOUR = 60
MAX_AUDIENCE_PAGE = 5000
MAX_AUDIENCE_PAGE_BYTES = 1 << 20
DEFAULT_AUDIENCE_PAGE = 500
# The first page of a stream holds at most this many members: a campaign plans and hands over its
# first deliveries while the pages after it are read.
FIRST_AUDIENCE_PAGE = 100
MAX_MATCHED_USERS = 1000
_PROPERTY_TYPES = {
    PropertyType.STRING: pb.PROPERTY_TYPE_STRING,
    PropertyType.NUMBER: pb.PROPERTY_TYPE_NUMBER,
    PropertyType.BOOLEAN: pb.PROPERTY_TYPE_BOOLEAN,
    PropertyType.DATETIME: pb.PROPERTY_TYPE_DATETIME,
    PropertyType.LIST: pb.PROPERTY_TYPE_LIST,
}
# Conditions on events group and join sets of hundreds of thousands of rows: in memory, not on
# disk; and without JIT compilation, which costs these sub-second queries more than it saves.
_AUDIENCE_SETTINGS = (sa.text("SET LOCAL work_mem = '64MB'"), sa.text("SET LOCAL jit = off"))
# System fields a campaign can ask for with each member, besides custom properties.
_SYSTEM_ATTRIBUTES: dict[str, Any] = {
    "email": users.c.email,
    "phone": users.c.phone,
    "gender": users.c.gender,
    "country": users.c.country,
    "region": users.c.region,
    "city": users.c.city,
    "date_of_birth": sa.func.coalesce(sa.cast(users.c.date_of_birth, sa.Text), ""),
    "timezone": users.c.timezone,
}
# The last known position, as numbers.
_SYSTEM_NUMBERS: dict[str, Any] = {"latitude": users.c.latitude, "longitude": users.c.longitude}
# A user's devices, most recently seen first.
_DEVICES = (
    sa.select(
        sa.func.jsonb_agg(
            aggregate_order_by(
                sa.func.jsonb_build_object(
                    "device_id",
                    devices.c.device_id,
                    "platform",
                    devices.c.platform,
                    "app_version",
                    devices.c.app_version,
                    "make",
                    devices.c.make,
                    "model",
                    devices.c.model,
                    "os_version",
                    devices.c.os_version,
                    "sdk_version",
                    devices.c.sdk_version,
                    "push_token",
                    devices.c.push_token,
                    "push_token_type",
                    devices.c.push_token_type,
                    "last_seen_time",
                    devices.c.last_seen_at,
                ),
                devices.c.last_seen_at.desc().nulls_last(),
                devices.c.device_id,
            )
        )
    )
    .where(devices.c.account_id == users.c.account_id, devices.c.user_id == users.c.user_id)
    .scalar_subquery()
)


def _segment_message(row: Any) -> pb.Segment:
    return pb.Segment(
        name=f"segments/{row.id}",
        display_name=row.display_name,
        filter=pb.SegmentFilter.FromString(row.filter),
        create_time=api.timestamp(row.created_at),
    )


def _owned(segment_id: uuid.UUID) -> sa.ColumnElement[bool]:
    """The segment, if the caller's account owns it: another account's answers NOT_FOUND."""
    return sa.and_(segments.c.id == segment_id, segments.c.account_id == current_account_id())


def _attribute(key: str) -> Any:
    """A member attribute: a system field when the profile has it, else the custom property."""
    if key == "devices":
        return sa.func.coalesce(_DEVICES, users.c.properties[key])
    if key in _SYSTEM_NUMBERS:
        return sa.func.coalesce(sa.func.to_jsonb(_SYSTEM_NUMBERS[key]), users.c.properties[key])
    system = _SYSTEM_ATTRIBUTES.get(key)
    if system is None:
        return users.c.properties[key]
    return sa.func.coalesce(sa.func.to_jsonb(sa.func.nullif(system, "")), users.c.properties[key])


async def refuse_if_in_saved_segments(session: AsyncSession, account_id: uuid.UUID, name: str) -> None:
    """FAILED_PRECONDITION naming them when saved segments refer to this segment or list."""
    referring = (
        await session.scalars(
            sa.select(segments.c.id).where(
                segments.c.account_id == account_id, sa.literal(name) == sa.any_(segments.c.uses)
            )
        )
    ).all()
    if referring:
        named = ", ".join(f"segments/{s}" for s in referring)
        raise FailedPrecondition(name, f"{name} is used by saved segments: {named}")


class Segmentation:
    def __init__(self, database: Database, campaign_usage: CampaignUsage) -> None:
        self.database = database
        self.campaign_usage = campaign_usage
        self.audience_reads = HourlyQuota(database, hourly_use)

    async def _count_read(self, kind: str, limit: int, what: str) -> None:
        """Audiences read by key holders are counted per account and hour; our own services
        (the scheduler planning a run, with the service token) are not."""
        caller = current_caller()
        if caller is not None and caller.role != SERVICE_ROLE:
            account_id = current_account_id()
            await self.audience_reads.take(account_id, f"{kind}:{account_id}", 1, limit, what)

    # --- filters: checked, with everything they refer to ---------------------------------------

    async def _prepare(
        self, session: AsyncSession, segment_filter: pb.SegmentFilter, path: str, ctx: Context, depth: int = 0
    ) -> None:
        """Checks the filter against the account's property types and loads the segments it refers
        to into ctx; a list or segment that is not the account's answers NOT_FOUND at its path."""
        types = await known_types(session, ctx.account_id, property_keys(segment_filter))
        ctx.types.update(types)
        if depth == 0:
            check = Validator()
            validate_filter(segment_filter, path, check, ctx.types)
            check.raise_if_any()
        for name, where in references(segment_filter, path):
            if name in ctx.segments:
                continue
            if name.startswith("lists/"):
                list_id = api.parse_uuid_name(name, "lists", where)
                found = await session.scalar(
                    sa.select(lists.c.id).where(lists.c.id == list_id, lists.c.account_id == ctx.account_id)
                )
                if found is None:
                    raise NotFound(name, where)
                continue
            segment_id = api.parse_uuid_name(name, "segments", where)
            blob = await session.scalar(
                sa.select(segments.c.filter).where(
                    segments.c.id == segment_id, segments.c.account_id == ctx.account_id
                )
            )
            if blob is None:
                raise NotFound(name, where)
            if depth >= MAX_DEPTH:
                raise invalid(where, f"segments refer to segments more than {MAX_DEPTH} deep")
            nested = pb.SegmentFilter.FromString(blob)
            ctx.segments[name] = nested
            await self._prepare(session, nested, where, ctx, depth + 1)

    async def _audience(
        self,
        session: AsyncSession,
        audience: pb.Audience,
        path: str,
        now: datetime,
        only_users: list[str] | None = None,
    ) -> sa.ColumnElement[bool]:
        """The audience as a condition on the caller's users (on these users only, if given)."""
        ctx = Context(account_id=current_account_id(), now=now, types={}, only_users=only_users)
        source = audience.WhichOneof("source")
        if source == "segment":
            segment_id = api.parse_uuid_name(audience.segment, "segments", f"{path}.segment")
            blob = await session.scalar(sa.select(segments.c.filter).where(_owned(segment_id)))
            if blob is None:
                raise NotFound(audience.segment, f"{path}.segment")
            saved = pb.SegmentFilter.FromString(blob)
            await self._prepare(session, saved, f"{path}.segment", ctx, depth=1)
            condition = to_sql(saved, ctx)
        elif source == "filter":
            await self._prepare(session, audience.filter, f"{path}.filter", ctx)
            condition = to_sql(audience.filter, ctx)
        elif source == "list":
            list_id = api.parse_uuid_name(audience.list, "lists", f"{path}.list")
            found = await session.scalar(
                sa.select(lists.c.id).where(lists.c.id == list_id, lists.c.account_id == ctx.account_id)
            )
            if found is None:
                raise NotFound(audience.list, f"{path}.list")
            condition = in_list(list_id, ctx)
        else:
            raise invalid(path, "one of segment, filter or list is required")
        return sa.and_(users.c.account_id == ctx.account_id, condition)

    # --- saved segments ----------------------------------------------------------------------

    async def create_segment(self, segment: pb.Segment, request_id: str) -> pb.Segment:
        check = Validator()
        check.require(bool(segment.display_name.strip()), "segment.display_name", "required")
        check_text_fields(pb.Segment(display_name=segment.display_name), "segment", check)
        check.require(segment.HasField("filter"), "segment.filter", "required")
        check.require(len(request_id) <= 200, "request_id", "at most 200 characters")
        check.raise_if_any()
        account_id = current_account_id()
        same_request = sa.and_(segments.c.account_id == account_id, segments.c.request_id == request_id)
        async with self.database.transaction() as session:
            if request_id:
                existing = (await session.execute(sa.select(segments).where(same_request))).first()
                if existing is not None:
                    return _segment_message(existing)
            ctx = Context(account_id=account_id, now=api.utcnow(), types={})
            await self._prepare(session, segment.filter, "segment.filter", ctx)
            statement = (
                insert(segments)
                .values(
                    id=uuid.uuid4(),
                    account_id=account_id,
                    display_name=segment.display_name.strip(),
                    filter=segment.filter.SerializeToString(),
                    uses=sorted({name for name, _ in references(segment.filter, "")}),
                    request_id=request_id or None,
                )
                .on_conflict_do_nothing(index_elements=[segments.c.account_id, segments.c.request_id])
                .returning(*segments.c)
            )
            row = (await session.execute(statement)).first()
            if row is None:  # a concurrent create with the same request_id won
                row = (await session.execute(sa.select(segments).where(same_request))).one()
        return _segment_message(row)

    async def get_segment(self, name: str) -> pb.Segment:
        segment_id = api.parse_uuid_name(name, "segments")
        async with self.database.transaction() as session:
            row = (await session.execute(sa.select(segments).where(_owned(segment_id)))).first()
        if row is None:
            raise NotFound(name)
        return _segment_message(row)

    async def list_segments(self, size: int, token: str) -> tuple[list[pb.Segment], str]:
        async with self.database.transaction() as session:
            rows, next_token = await keyset_page(
                session, segments, size, token, segments.c.account_id == current_account_id()
            )
        return [_segment_message(r) for r in rows], next_token

    async def delete_segment(self, name: str) -> None:
        segment_id = api.parse_uuid_name(name, "segments")
        await self.campaign_usage.refuse_if_used(name)
        async with self.database.transaction() as session:
            await refuse_if_in_saved_segments(session, current_account_id(), name)
            result = await session.execute(sa.delete(segments).where(_owned(segment_id)))
        if result.rowcount == 0:  # type: ignore[attr-defined]
            raise NotFound(name)

    # --- reach and members -------------------------------------------------------------------

    async def estimate_reach(self, request: pb.EstimateReachRequest) -> tuple[int, int]:
        """(users the audience selects, of them the users the channel reaches)."""
        _check_channel(request.channel)
        await self._count_read("estimate", ESTIMATES_PER_HOUR, "reach estimates per account")
        async with self.database.transaction() as session:
            for setting in _AUDIENCE_SETTINGS:
                await session.execute(setting)
            condition = await self._audience(session, request.audience, "audience", api.utcnow())
            row = (
                await session.execute(
                    sa.select(sa.func.count(), sa.func.count().filter(reachable(request.channel)))
                    .select_from(users)
                    .where(condition)
                )
            ).one()
        return int(row[0]), int(row[1])

    async def stream_audience(
        self, request: pb.StreamAudienceRequest
    ) -> AsyncIterator[pb.StreamAudienceResponse]:
        """Pages of reachable members in user id order.

        The members are fixed once, when the stream starts (a snapshot table in PostgreSQL, not
        in memory, its first members written ahead of the rest); each page is then read in its
        own short transaction and the connection goes back to the pool before the page is sent,
        so a slow reader holds nothing. A page also ends early once it holds
        MAX_AUDIENCE_PAGE_BYTES, so large profiles stay within gRPC's limit, and the first one holds
        at most FIRST_AUDIENCE_PAGE members.
        """
        _check_channel(request.channel)
        if request.page_size < 0 or request.page_size > MAX_AUDIENCE_PAGE:
            raise invalid("page_size", f"between 0 and {MAX_AUDIENCE_PAGE}")
        if request.sample_size < 0:
            raise invalid("sample_size", "zero (everyone) or more")
        if request.sample_size and not request.sample_seed:
            raise invalid("sample_seed", "required with sample_size")
        await self._count_read("stream", AUDIENCE_STREAMS_PER_HOUR, "audience streams per account")
        limit = request.page_size or DEFAULT_AUDIENCE_PAGE
        now = (
            api.from_timestamp(request.evaluation_time)
            if request.HasField("evaluation_time")
            else api.utcnow()
        )
        attributes = _attributes(list(dict.fromkeys(k for k in request.attribute_keys if k)))
        account_id = current_account_id()

        async def choose(session: AsyncSession) -> sa.Select[Any]:
            condition = await self._audience(session, request.audience, "audience", now)
            return _snapshot_members(request, condition)

        snapshot = AudienceSnapshot(self.database, account_id, _AUDIENCE_SETTINGS)
        try:
            await snapshot.fill(choose, request.start_after_user_id, in_order=not request.sample_size)
            after = request.start_after_user_id
            size = min(limit, FIRST_AUDIENCE_PAGE)
            members = _page_members(snapshot.snapshot_id, account_id, attributes)
            while True:
                complete = snapshot.complete  # before the read: a read after it sees every member
                page = await self._page(
                    members, account_id, after, size, request.attributes_as_json, request.with_best_hour
                )
                if page.members:
                    yield page
                    after = page.members[-1].user_id
                    size = limit
                    continue
                await snapshot.wait()  # raises if writing the members failed
                if complete:
                    return
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(snapshot.forget())

    async def match_users(self, request: pb.MatchUsersRequest) -> list[pb.AudienceMember]:
        """The given users the audience selects now, with their attributes as JSON; a user the
        channel cannot reach is flagged `unreachable`."""
        _check_channel(request.channel)
        ids = sorted(set(request.user_ids))
        check = Validator()
        check.require(0 < len(ids) <= MAX_MATCHED_USERS, "user_ids", f"1 to {MAX_MATCHED_USERS:,} user ids")
        check.require(
            all(api.is_valid_id(i) for i in ids), "user_ids", "user ids: 1-200 letters, digits or ._:@+-"
        )
        check.raise_if_any()
        attributes = _attributes(list(dict.fromkeys(k for k in request.attribute_keys if k)))
        account_id = current_account_id()
        async with self.database.transaction() as session:
            condition: sa.ColumnElement[bool] = users.c.account_id == account_id
            if request.HasField("audience"):
                condition = await self._audience(session, request.audience, "audience", api.utcnow(), ids)
            rows = (
                await session.execute(
                    sa.select(
                        users.c.user_id,
                        users.c.timezone,
                        sa.cast(attributes, sa.Text).label("attributes"),
                        reachable(request.channel).label("reachable"),
                    )
                    .where(users.c.account_id == account_id, text_in(users.c.user_id, ids), condition)
                    .order_by(users.c.user_id)
                )
            ).all()
            members = [
                pb.AudienceMember(
                    user_id=row.user_id,
                    timezone=row.timezone,
                    attributes_json=row.attributes.encode(),
                    unreachable=not row.reachable,
                )
                for row in rows
            ]
            if request.with_best_hour:
                await add_best_hours(session, account_id, members)
        return members

    async def describe_event(self, request: pb.DescribeEventRequest) -> pb.EventDescription:
        """Whether the event was ever ingested, its properties' types, and whether `where` tests
        fit them."""
        check = Validator()
        name = request.event_name
        check.require(0 < len(name) <= 200 and bool(name.strip()), "event_name", "required: 1-200 characters")
        check.raise_if_any()
        account_id = current_account_id()
        subject = event_subject(name)
        async with self.database.transaction() as session:
            seen = await session.scalar(
                sa.select(sa.literal(True))
                .where(events.c.account_id == account_id, events.c.name == name)
                .limit(1)
            )
            rows = (
                await session.execute(
                    sa.select(property_types.c.key, property_types.c.type).where(
                        property_types.c.account_id == account_id, property_types.c.subject == subject
                    )
                )
            ).all()
        types = {(subject, row.key): PropertyType(row.type) for row in rows}
        validate_event_where(request.where, name, "where", check, types)
        check.raise_if_any()
        described = pb.EventDescription(event_name=name, seen=bool(seen))
        for (_, key), kind in types.items():
            if kind in _PROPERTY_TYPES:
                described.property_types[key] = _PROPERTY_TYPES[kind]
        return described

    async def _page(
        self,
        members: Built,
        account_id: uuid.UUID,
        after: str,
        limit: int,
        as_json: bool,
        with_best_hour: bool,
    ) -> pb.StreamAudienceResponse:
        # On a direct connection: a large audience is read a page every few milliseconds.
        async with self.database.direct_transaction() as connection:
            await _PLAN_BY_KEY.execute(connection)
            rows = await members.fetch(connection, after=after, limit=limit)
            # Members are added to the response in place: a list of members handed to the response
            # would be copied into it member by member.
            page = pb.StreamAudienceResponse()
            add = page.members.add
            size = 0
            for user_id, timezone, attributes, left_out in rows:
                if as_json:
                    member = add(user_id=user_id, timezone=timezone, attributes_json=attributes.encode())
                else:
                    member = add(user_id=user_id, timezone=timezone)
                    member.attributes.update(json.loads(attributes))
                if left_out:
                    member.unreachable = left_out == LEFT_OUT_UNREACHABLE
                    member.outside_sample = left_out == LEFT_OUT_BY_SAMPLE
                size += len(attributes) + len(user_id)
                if size > MAX_AUDIENCE_PAGE_BYTES:
                    break
            if with_best_hour:
                await add_best_hours(connection, account_id, page.members)
        return page


# The page of the snapshot read in its key's order, then each member's row by its key: a plan that
# holds however stale the statistics of a snapshot just written are (planned on them, each page
# would read and sort every remaining member).
_PLAN_BY_KEY = Statement(
    "SELECT set_config('enable_sort', 'off', true), set_config('enable_bitmapscan', 'off', true)"
)


def _page_members(snapshot_id: uuid.UUID, account_id: uuid.UUID, attributes: Any) -> Built:
    """A page of a snapshot's members after :after (at most :limit), with their profiles' time zone
    and attributes."""
    chosen = (
        sa.select(audience_snapshots.c.user_id, audience_snapshots.c.left_out)
        .where(
            audience_snapshots.c.snapshot_id == snapshot_id,
            audience_snapshots.c.user_id > sa.bindparam("after", type_=sa.Text),
        )
        .order_by(audience_snapshots.c.user_id)
        .limit(sa.bindparam("limit", type_=sa.Integer))
        .subquery("chosen")
    )
    profile = (
        sa.select(users.c.user_id, users.c.timezone, sa.cast(attributes, sa.Text).label("attributes"))
        .where(users.c.account_id == account_id, users.c.user_id == chosen.c.user_id)
        .limit(1)  # keeps the lookup per member: the planner does not fold a limited subquery
        .lateral("profile")
    )
    return Built(
        sa.select(profile.c.user_id, profile.c.timezone, profile.c.attributes, chosen.c.left_out)
        .select_from(chosen.join(profile, sa.true()))
        .order_by(chosen.c.user_id)
    )


def _attributes(keys: list[str]) -> Any:
    """The profile attributes a delivery carries, as one JSONB object per user."""
    if not keys:
        return sa.literal({}, JSONB)
    return sa.func.jsonb_strip_nulls(
        sa.func.jsonb_build_object(*[x for k in keys for x in (k, _attribute(k))])
    )


def _snapshot_members(request: pb.StreamAudienceRequest, condition: Any) -> sa.Select[Any]:
    """(user_id, left_out) of the users a stream holds: the reachable ones, drawn by the sample
    when there is one, and with include_left_out the others too, flagged."""
    reach = reachable(request.channel)
    # A uniform random sample, the same for the same seed: a resumed stream picks the same
    # members and goes on after the last one sent.
    rank = sa.func.md5(sa.literal(request.sample_seed) + users.c.user_id)
    if not request.include_left_out:
        members = sa.select(users.c.user_id, sa.literal(0, sa.SmallInteger).label("left_out")).where(
            condition, reach
        )
        return members.order_by(rank).limit(request.sample_size) if request.sample_size else members
    if not request.sample_size:
        flagged = sa.case((sa.not_(reach), LEFT_OUT_UNREACHABLE), else_=0)
        return sa.select(users.c.user_id, flagged.label("left_out")).where(condition)
    qualified = sa.select(
        users.c.user_id,
        reach.label("reach"),
        sa.func.row_number().over(partition_by=reach, order_by=rank).label("draw"),
    ).where(condition)
    ranked = qualified.subquery()
    cases: list[tuple[Any, int]] = [(sa.not_(ranked.c.reach), LEFT_OUT_UNREACHABLE)]
    if request.sample_size:
        cases.append((ranked.c.draw > request.sample_size, LEFT_OUT_BY_SAMPLE))
    return sa.select(ranked.c.user_id, sa.case(*cases, else_=0).label("left_out"))


def _check_channel(channel: int) -> None:
    if channel not in pb.Channel.values():
        raise invalid("channel", f"one of {', '.join(pb.Channel.keys())}")
