"""Anonymous web visitors becoming the users they sign in as.

The web SDK makes an `anon:` id for each new browser. When the visitor signs in, the site's
page calls `herald.identify` with the user's id and the site server's signature of it; the merge
moves the visitor's events, devices, list memberships and active hours to the user and gives the
user the visitor's profile properties it lacks, all in one transaction, and records the alias, so
events still sent under the anonymous id (a batch the SDK had not yet sent) become the user's too.
A merge asked again finds the alias and changes nothing. Dispatch and the campaign service move
the visitor's pop-ups and exposures when they hear of the merge.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from herald.events.v1 import events_pb2
from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_common import api
from herald_common.auth import (
    ANONYMOUS_PREFIX,
    PUBLISHABLE_ROLE,
    account_name,
    current_account_id,
    current_caller,
    identity_secret,
    user_signature_matches,
)
from herald_common.bus import Subjects
from herald_common.db import Database, Statement, Target
from herald_common.errors import Validator
from herald_common.outbox import OutboxEvent, enqueue
from herald_segmentation.storage import SCHEMA, outbox, visitor_aliases

_MOVE_EVENTS = sa.text(
    f"UPDATE {SCHEMA}.events SET user_id = :user WHERE account_id = :account_id AND user_id = :anonymous"
)
# The user gets the visitor's properties it does not have, and its system fields where empty.
_MERGE_PROFILE = sa.text(
    f"""
    WITH visitor AS (
        DELETE FROM {SCHEMA}.users WHERE account_id = :account_id AND user_id = :anonymous
        RETURNING properties, timezone, country, region, city
    )
    INSERT INTO {SCHEMA}.users AS u (account_id, user_id, properties, timezone, country, region, city)
    SELECT :account_id, :user, properties, timezone, country, region, city FROM visitor
    ON CONFLICT (account_id, user_id) DO UPDATE SET
        properties = excluded.properties || u.properties,
        timezone = CASE WHEN u.timezone = '' THEN excluded.timezone ELSE u.timezone END,
        country = CASE WHEN u.country = '' THEN excluded.country ELSE u.country END,
        region = CASE WHEN u.region = '' THEN excluded.region ELSE u.region END,
        city = CASE WHEN u.city = '' THEN excluded.city ELSE u.city END,
        updated_at = now()
    """
)
# The hours the visitor was active add to the user's (Best Time).
_MOVE_ACTIVITY = sa.text(
    f"""
    WITH visitor AS (
        DELETE FROM {SCHEMA}.activity_hours WHERE account_id = :account_id AND user_id = :anonymous
        RETURNING hour, count
    )
    INSERT INTO {SCHEMA}.activity_hours AS a (account_id, user_id, hour, count)
    SELECT :account_id, :user, hour, count FROM visitor
    ON CONFLICT (account_id, user_id, hour) DO UPDATE SET count = a.count + excluded.count
    """
)
_DEVICE_COLUMNS = (
    "device_id, platform, app_version, make, model, os_version, sdk_version, push_token, "
    "push_token_type, last_seen_at"
)
# Rows keyed by (account, user, ...) that move to the user unless the user has that row already:
# (move, forget what did not move).
_MOVES = [
    (
        f"""INSERT INTO {SCHEMA}.{table} (account_id, user_id, {columns})
            SELECT account_id, :user, {columns} FROM {SCHEMA}.{table}
            WHERE account_id = :account_id AND user_id = :anonymous
            ON CONFLICT DO NOTHING""",
        f"DELETE FROM {SCHEMA}.{table} WHERE account_id = :account_id AND user_id = :anonymous",
    )
    for table, columns in (("devices", _DEVICE_COLUMNS), ("list_members", "list_id"))
]


class Visitors:
    def __init__(
        self, database: Database, subjects: Subjects, notify_outbox: Callable[[], None], service_token: str
    ) -> None:
        self.database = database
        self.subjects = subjects
        self.notify_outbox = notify_outbox
        self.service_token = service_token

    def _check(self, request: pb.MergeVisitorRequest) -> None:
        check = Validator()
        anonymous, user = request.anonymous_id, request.user_id
        check.require(
            anonymous.startswith(ANONYMOUS_PREFIX)
            and api.is_valid_id(anonymous)
            and anonymous != ANONYMOUS_PREFIX,
            "anonymous_id",
            f"required: {ANONYMOUS_PREFIX} and 1-195 letters, digits or ._:@+-",
        )
        check.require(
            api.is_valid_id(user) and not user.startswith(ANONYMOUS_PREFIX),
            "user_id",
            f"required: 1-200 letters, digits or ._:@+-, not an {ANONYMOUS_PREFIX} id",
        )
        caller = current_caller()
        if (
            caller is not None
            and caller.role == PUBLISHABLE_ROLE
            and check.require(
                bool(request.user_signature), "user_signature", "required from a browser (a publishable key)"
            )
        ):
            secret = identity_secret(self.service_token, caller.account)
            check.require(
                user_signature_matches(secret, user, request.user_signature),
                "user_signature",
                "does not match the user id",
            )
        check.raise_if_any()

    async def merge(self, request: pb.MergeVisitorRequest) -> pb.MergeVisitorResponse:
        self._check(request)
        account_id = current_account_id()
        anonymous, user = request.anonymous_id, request.user_id
        names = {"account_id": account_id, "anonymous": anonymous, "user": user}
        async with self.database.transaction() as session:
            aliased = (
                await session.execute(
                    insert(visitor_aliases)
                    .values(account_id=account_id, anonymous_id=anonymous, user_id=user)
                    .on_conflict_do_nothing()
                    .returning(visitor_aliases.c.user_id)
                )
            ).first()
            if aliased is None:
                merged_into = await session.scalar(
                    sa.select(visitor_aliases.c.user_id).where(
                        visitor_aliases.c.account_id == account_id,
                        visitor_aliases.c.anonymous_id == anonymous,
                    )
                )
                if merged_into != user:
                    check = Validator()
                    check.add(
                        "anonymous_id",
                        "was merged into another user; the web SDK starts a new id after sign-out",
                    )
                    check.raise_if_any()
                return pb.MergeVisitorResponse(already_merged=True)
            moved = (await session.execute(_MOVE_EVENTS, names)).rowcount  # type: ignore[attr-defined]
            await session.execute(_MERGE_PROFILE, names)
            await session.execute(_MOVE_ACTIVITY, names)
            for move, forget in _MOVES:
                await session.execute(sa.text(move), names)
                await session.execute(sa.text(forget), names)
            announced = events_pb2.VisitorMerged(
                account=account_name(account_id), anonymous_id=anonymous, user_id=user
            )
            await enqueue(
                session,
                outbox,
                [OutboxEvent.of(self.subjects.visitor_merged, announced, f"merged:{account_id}:{anonymous}")],
            )
        self.notify_outbox()
        return pb.MergeVisitorResponse(moved_event_count=int(moved or 0))


_ALIASES = Statement(
    f"SELECT anonymous_id, user_id FROM {SCHEMA}.visitor_aliases"
    " WHERE account_id = :account_id AND anonymous_id = ANY(CAST(:anonymous AS text[]))"
)


async def aliases(target: Target, account_id: uuid.UUID, ids: Collection[str]) -> dict[str, str]:
    """The users the given anonymous ids were merged into."""
    anonymous = sorted(i for i in ids if i.startswith(ANONYMOUS_PREFIX))
    if not anonymous:
        return {}
    rows = await _ALIASES.fetch(target, account_id=account_id, anonymous=anonymous)
    return {row.anonymous_id: row.user_id for row in rows}
