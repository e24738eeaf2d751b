"""Custom lists: uploaded identities, resolved to the account's users."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_common import api
from herald_common.auth import current_account_id
from herald_common.campaign_usage import CampaignUsage
from herald_common.db import Database
from herald_common.errors import NotFound, Validator, invalid
from herald_common.paging import keyset_page
from herald_common.sms import E164
from herald_common.validation import check_text_fields
from herald_segmentation.domain import refuse_if_in_saved_segments
from herald_segmentation.profiles import EMAIL
from herald_segmentation.storage import SCHEMA, list_members, lists

MAX_ROWS = 1_000_000
MAX_ROWS_PER_MESSAGE = 10_000
MAX_REJECTED_SHOWN = 100
Kind = pb.IdentityKind
_USER_COLUMN = {
    Kind.IDENTITY_KIND_USER_ID: "u.user_id",
    Kind.IDENTITY_KIND_EMAIL: "lower(u.email)",
    Kind.IDENTITY_KIND_PHONE: "u.phone",
}


def _match_statement(kind: pb.IdentityKind.ValueType) -> sa.TextClause:
    """Adds the users a chunk of identities names to the list; returns how many rows matched."""
    return sa.text(
        f"""
        WITH v AS (SELECT unnest(CAST(:values AS text[])) AS value),
        matched AS (
            SELECT DISTINCT v.value, u.user_id FROM v
            JOIN {SCHEMA}.users u ON u.account_id = :account_id AND {_USER_COLUMN[kind]} = v.value
        ),
        added AS (
            INSERT INTO {SCHEMA}.list_members (account_id, list_id, user_id)
            SELECT :account_id, :list_id, user_id FROM matched
            ON CONFLICT DO NOTHING
        )
        SELECT count(*) FROM v WHERE v.value IN (SELECT value FROM matched)
        """
    )


def _normalized(kind: pb.IdentityKind.ValueType, row: str) -> tuple[str | None, str]:
    """(identity as stored, '') or (None, why the row is unusable)."""
    value = row.strip()
    if not value:
        return None, "empty row"
    if kind == Kind.IDENTITY_KIND_EMAIL:
        return (
            (value.lower(), "")
            if EMAIL.match(value) and len(value) <= 254
            else (None, "not an email address")
        )
    if kind == Kind.IDENTITY_KIND_PHONE:
        return (value, "") if E164.match(value) else (None, "not an E.164 phone number")
    return (value, "") if api.is_valid_id(value) else (None, "not a user id: 1-200 letters, digits or ._:@+-")


def list_message(row: Any) -> pb.CustomList:
    return pb.CustomList(
        name=f"lists/{row.id}",
        display_name=row.display_name,
        identity_kind=Kind.Value(row.identity_kind),
        row_count=row.row_count,
        matched_count=row.matched_count,
        unmatched_count=row.unmatched_count,
        rejected_count=row.rejected_count,
        rejected_rows=[pb.RejectedRow(line=r["line"], reason=r["reason"]) for r in row.rejected_rows],
        create_time=api.timestamp(row.created_at),
    )


def _owned(list_id: uuid.UUID) -> sa.ColumnElement[bool]:
    return sa.and_(lists.c.id == list_id, lists.c.account_id == current_account_id())


class Lists:
    def __init__(self, database: Database, campaign_usage: CampaignUsage) -> None:
        self.database = database
        self.campaign_usage = campaign_usage

    async def upload(self, requests: AsyncIterator[pb.UploadListRequest]) -> pb.CustomList:
        """Creates the list the first message describes from the rows of every message, in one
        transaction: the list appears whole or not at all."""
        first = await anext(aiter(requests), None)
        if first is None:
            raise invalid("list", "the first message must describe the list")
        check = Validator()
        described = first.list
        check.require(bool(described.display_name.strip()), "list.display_name", "required")
        check.require(len(described.display_name) <= 200, "list.display_name", "at most 200 characters")
        check_text_fields(pb.CustomList(display_name=described.display_name), "list", check)
        check.require(described.identity_kind in _USER_COLUMN, "list.identity_kind", "required")
        check.require(len(first.request_id) <= 200, "request_id", "at most 200 characters")
        check.raise_if_any()
        account_id = current_account_id()
        same_request = sa.and_(lists.c.account_id == account_id, lists.c.request_id == first.request_id)
        if first.request_id:
            async with self.database.transaction() as session:
                existing = (await session.execute(sa.select(lists).where(same_request))).first()
            if existing is not None:
                return list_message(existing)
        list_id = uuid.uuid4()
        kind = described.identity_kind
        match = _match_statement(kind)
        counts = {"row_count": 0, "matched_count": 0, "rejected_count": 0}
        rejected: list[dict[str, Any]] = []

        async def every_message() -> AsyncIterator[pb.UploadListRequest]:
            yield first
            async for message in requests:
                if message.HasField("list") or message.request_id:
                    raise invalid("list", "only the first message describes the list")
                yield message

        async with self.database.transaction() as session:
            created = (
                await session.execute(
                    insert(lists)
                    .values(
                        id=list_id,
                        account_id=account_id,
                        display_name=described.display_name.strip(),
                        identity_kind=Kind.Name(kind),
                        unmatched_count=0,
                        rejected_rows=[],
                        request_id=first.request_id or None,
                        **counts,
                    )
                    .on_conflict_do_nothing(index_elements=[lists.c.account_id, lists.c.request_id])
                    .returning(lists.c.id)
                )
            ).first()
            if created is None:  # a concurrent upload with the same request_id made it
                return list_message((await session.execute(sa.select(lists).where(same_request))).one())
            async for message in every_message():
                if len(message.rows) > MAX_ROWS_PER_MESSAGE:
                    raise invalid("rows", f"at most {MAX_ROWS_PER_MESSAGE:,} rows per message")
                if counts["row_count"] + len(message.rows) > MAX_ROWS:
                    raise invalid("rows", f"a list holds at most {MAX_ROWS:,} rows")
                values = []
                for line in message.rows:
                    counts["row_count"] += 1
                    value, reason = _normalized(kind, line)
                    if value is None:
                        counts["rejected_count"] += 1
                        if len(rejected) < MAX_REJECTED_SHOWN:
                            rejected.append({"line": counts["row_count"], "reason": reason})
                    else:
                        values.append(value)
                if values:
                    matched = await session.scalar(
                        match, {"values": values, "account_id": account_id, "list_id": list_id}
                    )
                    counts["matched_count"] += int(matched or 0)
            well_formed = counts["row_count"] - counts["rejected_count"]
            row = (
                await session.execute(
                    sa.update(lists)
                    .where(lists.c.id == list_id)
                    .values(
                        unmatched_count=well_formed - counts["matched_count"],
                        rejected_rows=rejected,
                        **counts,
                    )
                    .returning(*lists.c)
                )
            ).one()
        return list_message(row)

    async def get(self, name: str, field: str = "name") -> pb.CustomList:
        list_id = api.parse_uuid_name(name, "lists", field)
        async with self.database.transaction() as session:
            row = (await session.execute(sa.select(lists).where(_owned(list_id)))).first()
        if row is None:
            raise NotFound(name, field)
        return list_message(row)

    async def list(self, size: int, token: str) -> tuple[list[pb.CustomList], str]:
        async with self.database.transaction() as session:
            rows, next_token = await keyset_page(
                session, lists, size, token, lists.c.account_id == current_account_id()
            )
        return [list_message(r) for r in rows], next_token

    async def delete(self, name: str) -> None:
        list_id = api.parse_uuid_name(name, "lists")
        await self.campaign_usage.refuse_if_used(name)
        account_id = current_account_id()
        async with self.database.transaction() as session:
            await refuse_if_in_saved_segments(session, account_id, name)
            result = await session.execute(sa.delete(lists).where(_owned(list_id)))
            if result.rowcount == 0:  # type: ignore[attr-defined]
                raise NotFound(name)
            await session.execute(
                sa.delete(list_members).where(
                    list_members.c.account_id == account_id, list_members.c.list_id == list_id
                )
            )
