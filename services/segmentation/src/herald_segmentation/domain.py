"""Segmentation use cases: user profiles, saved segments, audiences."""

from __future__ import annotations

import json
import uuid
import zoneinfo
from collections.abc import AsyncIterator, Sequence
from typing import Any

import sqlalchemy as sa
from google.protobuf import json_format
from sqlalchemy.dialects.postgresql import JSONB, insert

from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_common import api
from herald_common.auth import current_account_id, current_caller
from herald_common.campaign_usage import CampaignUsage
from herald_common.db import Database
from herald_common.errors import FailedPrecondition, NotFound, ResourceExhausted, Validator, invalid
from herald_common.paging import keyset_page
from herald_common.validation import check_text_fields
from herald_segmentation.filters import to_sql, validate_filter
from herald_segmentation.storage import segments, users

MAX_UPSERT = 1000
# A profile's properties, as JSON, are at most this large: a page of an audience, a delivery batch
# and a destination's event all stay within their limits.
MAX_PROFILE_BYTES = 256 * 1024
_DELIVERING = {"STATE_SCHEDULED", "STATE_RUNNING"}
MAX_AUDIENCE_PAGE = 5000
MAX_AUDIENCE_PAGE_BYTES = 1 << 20
DEFAULT_AUDIENCE_PAGE = 500
# More than a tenth of the profiles changed since the last ANALYZE (autovacuum's own threshold).
_STATISTICS_STALE = sa.text(
    """
    SELECT n_mod_since_analyze > 1000 + 0.1 * n_live_tup
    FROM pg_stat_user_tables WHERE schemaname = 'segmentation' AND relname = 'users'
    """
)


def _valid_timezone(name: str) -> bool:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _user_message(row: Any) -> pb.User:
    user = pb.User(
        name=f"users/{row.user_id}",
        user_id=row.user_id,
        timezone=row.timezone,
        create_time=api.timestamp(row.created_at),
        update_time=api.timestamp(row.updated_at),
    )
    user.properties.update(row.properties)
    return user


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


class Segmentation:
    def __init__(self, database: Database, campaign_usage: CampaignUsage) -> None:
        self.database = database
        self.campaign_usage = campaign_usage

    async def upsert_users(self, batch: Sequence[pb.User]) -> int:
        caller = current_caller()
        quota = caller.max_batch_size if caller is not None and caller.max_batch_size else MAX_UPSERT
        if quota < len(batch) <= MAX_UPSERT:
            raise ResourceExhausted(
                caller.account if caller else "",
                f"this account may send at most {quota} users per call; split the batch",
            )
        check = Validator()
        check.require(0 < len(batch) <= MAX_UPSERT, "users", f"between 1 and {MAX_UPSERT} users")
        seen: set[str] = set()
        for i, user in enumerate(batch):
            if not api.is_valid_id(user.user_id):
                check.add(f"users[{i}].user_id", "required: 1-200 letters, digits or ._:@+-")
            elif user.user_id in seen:
                check.add(f"users[{i}].user_id", f"{user.user_id!r} appears twice in the request")
            seen.add(user.user_id)
            if user.timezone and not _valid_timezone(user.timezone):
                check.add(f"users[{i}].timezone", f"unknown IANA timezone {user.timezone!r}")
            check_text_fields(user, f"users[{i}]", check)
            size = user.properties.ByteSize()
            check.require(
                size <= MAX_PROFILE_BYTES,
                f"users[{i}].properties",
                f"{size} bytes; a profile holds at most {MAX_PROFILE_BYTES // 1024} KB",
            )
        check.raise_if_any()
        account_id = current_account_id()
        rows = [
            {
                "account_id": account_id,
                "user_id": user.user_id,
                "properties": json_format.MessageToDict(user.properties),
                "timezone": user.timezone,
            }
            for user in batch
        ]
        statement = insert(users)
        statement = statement.on_conflict_do_update(
            index_elements=[users.c.account_id, users.c.user_id],
            set_={
                "properties": statement.excluded.properties,
                "timezone": statement.excluded.timezone,
                "updated_at": sa.func.now(),
            },
        )
        async with self.database.transaction() as session:
            await session.execute(statement, rows)  # executemany: compiled once, sent in batches
        return len(rows)

    async def get_user(self, name: str) -> pb.User:
        user_id = api.parse_name(name, "users")
        async with self.database.transaction() as session:
            row = (
                await session.execute(
                    sa.select(users).where(
                        users.c.account_id == current_account_id(), users.c.user_id == user_id
                    )
                )
            ).first()
        if row is None:
            raise NotFound(name)
        return _user_message(row)

    async def create_segment(self, segment: pb.Segment, request_id: str) -> pb.Segment:
        check = Validator()
        check.require(bool(segment.display_name.strip()), "segment.display_name", "required")
        check_text_fields(pb.Segment(display_name=segment.display_name), "segment", check)
        if check.require(segment.HasField("filter"), "segment.filter", "required"):
            validate_filter(segment.filter, "segment.filter", check)
        check.require(len(request_id) <= 200, "request_id", "at most 200 characters")
        check.raise_if_any()
        account_id = current_account_id()
        same_request = sa.and_(segments.c.account_id == account_id, segments.c.request_id == request_id)
        async with self.database.transaction() as session:
            if request_id:
                existing = (await session.execute(sa.select(segments).where(same_request))).first()
                if existing is not None:
                    return _segment_message(existing)
            statement = (
                insert(segments)
                .values(
                    id=uuid.uuid4(),
                    account_id=account_id,
                    display_name=segment.display_name.strip(),
                    filter=segment.filter.SerializeToString(),
                    request_id=request_id or None,
                )
                .on_conflict_do_nothing(index_elements=[segments.c.account_id, segments.c.request_id])
                .returning(*segments.c)
            )
            row = (await session.execute(statement)).first()
            if row is None:  # a concurrent create with the same request_id won
                row = (await session.execute(sa.select(segments).where(same_request))).one()
        return _segment_message(row)

    async def _load_segment(self, name: str, field: str) -> pb.Segment:
        segment_id = api.parse_uuid_name(name, "segments", field)
        async with self.database.transaction() as session:
            row = (await session.execute(sa.select(segments).where(_owned(segment_id)))).first()
        if row is None:
            raise NotFound(name, field)
        return _segment_message(row)

    async def get_segment(self, name: str) -> pb.Segment:
        return await self._load_segment(name, "name")

    async def list_segments(self, size: int, token: str) -> tuple[list[pb.Segment], str]:
        async with self.database.transaction() as session:
            rows, next_token = await keyset_page(
                session, segments, size, token, segments.c.account_id == current_account_id()
            )
        return [_segment_message(r) for r in rows], next_token

    async def delete_segment(self, name: str) -> None:
        segment_id = api.parse_uuid_name(name, "segments")
        users_of = await self.campaign_usage.live_campaigns_using(segment=name)
        if users_of:
            raise FailedPrecondition(
                name, f"{name} is the audience of scheduled or running campaigns: {', '.join(users_of)}"
            )
        async with self.database.transaction() as session:
            result = await session.execute(sa.delete(segments).where(_owned(segment_id)))
        if result.rowcount == 0:  # type: ignore[attr-defined]
            raise NotFound(name)

    async def estimate_reach(self, segment_name: str) -> int:
        segment = await self._load_segment(segment_name, "segment")
        async with self.database.transaction() as session:
            count = await session.scalar(
                sa.select(sa.func.count())
                .select_from(users)
                .where(users.c.account_id == current_account_id(), to_sql(segment.filter))
            )
        return int(count or 0)

    async def _refresh_statistics_if_stale(self) -> None:
        """Profiles loaded just before a campaign runs leave the planner's statistics behind until
        autovacuum catches up, and with them it may read the whole table for every page. An
        audience read starts with statistics that describe the table."""
        async with self.database.transaction() as session:
            stale = await session.scalar(_STATISTICS_STALE)
            if stale and await session.scalar(
                sa.text("SELECT pg_try_advisory_xact_lock(hashtext('analyze:users'))")
            ):
                await session.execute(sa.text("ANALYZE segmentation.users"))

    async def stream_audience(
        self, request: pb.StreamAudienceRequest
    ) -> AsyncIterator[list[pb.AudienceMember]]:
        """Pages of members in user id order.

        Each page is read in its own short transaction and the connection goes back to the pool
        before the page is sent, so a slow reader holds nothing; a page also ends early once it
        holds MAX_AUDIENCE_PAGE_BYTES, so large profiles cannot push it past gRPC's message limit.
        """
        segment = await self._load_segment(request.segment, "segment")
        if request.page_size < 0 or request.page_size > MAX_AUDIENCE_PAGE:
            raise invalid("page_size", f"between 0 and {MAX_AUDIENCE_PAGE}")
        limit = request.page_size or DEFAULT_AUDIENCE_PAGE
        keys = list(dict.fromkeys(k for k in request.attribute_keys if k))
        attributes = (
            sa.func.jsonb_strip_nulls(
                sa.func.jsonb_build_object(*[x for k in keys for x in (k, users.c.properties[k])])
            )
            if keys
            else sa.literal({}, JSONB)
        )
        condition = sa.and_(users.c.account_id == current_account_id(), to_sql(segment.filter))
        await self._refresh_statistics_if_stale()
        after = request.start_after_user_id
        while True:
            async with self.database.transaction() as session:
                # Walk the primary key in order and stop at a page: a bitmap scan would gather
                # every member and sort them again for each page, quadratic in the audience.
                await session.execute(sa.text("SET LOCAL enable_bitmapscan = off"))
                rows = (
                    await session.execute(
                        sa.select(
                            users.c.user_id,
                            users.c.timezone,
                            sa.cast(attributes, sa.Text).label("attributes"),
                        )
                        .where(condition, users.c.user_id > after)
                        .order_by(users.c.user_id)
                        .limit(limit)
                    )
                ).all()
            page: list[pb.AudienceMember] = []
            size = 0
            for row in rows:
                member = pb.AudienceMember(user_id=row.user_id, timezone=row.timezone)
                if request.attributes_as_json:
                    member.attributes_json = row.attributes.encode()
                else:
                    member.attributes.update(json.loads(row.attributes))
                page.append(member)
                size += len(row.attributes) + len(row.user_id)
                if size > MAX_AUDIENCE_PAGE_BYTES:
                    break
            if not page:
                return
            yield page
            if len(rows) < limit and len(page) == len(rows):
                return
            after = page[-1].user_id
