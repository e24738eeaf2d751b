"""Which pop-ups a visitor may see now, and what they did with them.

A pop-up reaches a visitor's inbox as a delivery (the live engine decided the trigger, audience,
control group, caps and frequency when they qualified). When the SDK asks, the inbox is read
together with the visitor's last view of each campaign, for many visitors in one query, and the
rules that depend on the moment of showing are applied: the campaign still shows (not stopped,
not past its end), the pop-up's own frequency (once per session, day or ever), and do-not-disturb
hours in the visitor's zone now. An impression takes the pop-up out of the inbox.

Interactions (viewed, clicked, closed) are recorded once per delivery, with a `WebInteractions`
event through the outbox for the campaign's stats and the visitor's system events.
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.events.v1 import events_pb2 as events
from herald_common import api
from herald_common.auth import account_id_of, account_name
from herald_common.batching import GroupCall
from herald_common.bus import Subjects
from herald_common.db import Database
from herald_common.faults import NotReady
from herald_common.live import shown_on
from herald_common.outbox import OutboxEvent, enqueue
from herald_common.schedules import UTC_ZONE, DeliveryRules
from herald_common.timing import local_day, zone_named
from herald_dispatch.campaigns import CampaignBook
from herald_dispatch.storage import outbox, web_inbox, web_interactions

VIEWED, CLICKED, CLOSED, EXPIRED = "viewed", "clicked", "closed", "expired"
INTERACTIONS = (VIEWED, CLICKED, CLOSED)
# States whose delivered pop-ups still show: a campaign that reached its total limit completed,
# but the pop-ups it delivered are the visitors'. A stopped one shows nothing more.
_SHOWING = {
    campaign_pb.State.STATE_SCHEDULED,
    campaign_pb.State.STATE_RUNNING,
    campaign_pb.State.STATE_COMPLETED,
}
EXPIRY_SWEEP_SECONDS = 60.0
EXPIRED_PER_SWEEP = 5_000
# Most pop-ups one answer carries (the newest): the SDK shows one per page view.
MAX_SHOWN = 5

# On asyncpg directly (Database.fetch): this runs for every page view.
_LOOKUP = """
    SELECT q.k, i.delivery_id, i.campaign, i.popup, i.timezone, i.delivered_at,
           v.at AS last_viewed, v.session_id AS last_session
    FROM unnest($1::uuid[], $2::text[], $3::int[]) AS q(account_id, user_id, k)
    JOIN dispatch.web_inbox i
      ON i.account_id = q.account_id AND i.user_id = q.user_id AND i.expires_at > $4
    LEFT JOIN LATERAL (
        SELECT w.at, w.session_id FROM dispatch.web_interactions w
        WHERE w.account_id = q.account_id AND w.user_id = q.user_id AND w.campaign = i.campaign
          AND w.kind = 'viewed'
        ORDER BY w.at DESC LIMIT 1
    ) v ON true
    ORDER BY q.k, i.delivered_at DESC
"""


@dataclass(frozen=True)
class Visitor:
    account_id: uuid.UUID
    user_id: str
    session_id: str
    # The browser's IANA zone now ('' when it sent none: the profile's zone is used).
    timezone: str = ""
    # The page asking ('' when not said: every pop-up may show).
    url: str = ""


def _zone(visitor: Visitor, profile_zone: str) -> ZoneInfo:
    return zone_named(visitor.timezone) or zone_named(profile_zone) or UTC_ZONE


def _too_soon(frequency: int, row: Any, visitor: Visitor, zone: ZoneInfo, now: datetime) -> bool:
    """Whether the pop-up's frequency keeps it from this visitor now (`row`: their last view of
    the campaign, if any)."""
    last_viewed: datetime | None = row["last_viewed"]
    if last_viewed is None:
        return False
    if frequency == campaign_pb.POPUP_FREQUENCY_ONCE_EVER:
        return True
    if frequency == campaign_pb.POPUP_FREQUENCY_ONCE_PER_DAY:
        return local_day(last_viewed, zone) == local_day(now, zone)
    return bool(row["last_session"] == visitor.session_id)  # once per session, the default


def _quiet_now(campaign: campaign_pb.Campaign, zone: ZoneInfo, now: datetime) -> bool:
    quiet = DeliveryRules.of(campaign).quiet_hours
    return quiet is not None and quiet.contains(now.astimezone(zone).time().replace(tzinfo=None))


def _past_end(campaign: campaign_pb.Campaign, now: datetime) -> bool:
    live = campaign.schedule.live
    return live.HasField("end_time") and api.from_timestamp(live.end_time) <= now


class PopupInbox:
    def __init__(
        self,
        database: Database,
        campaigns: CampaignBook,
        subjects: Subjects,
        notify_outbox: Callable[[], None],
    ) -> None:
        self.database = database
        self.campaigns = campaigns
        self.subjects = subjects
        self.notify_outbox = notify_outbox
        self._lookup: GroupCall[tuple[uuid.UUID, str], list[Any]] = GroupCall(self._lookup_many)

    async def _lookup_many(self, visitors: Sequence[tuple[uuid.UUID, str]]) -> list[list[Any]]:
        found: list[list[Any]] = [[] for _ in visitors]
        rows = await self.database.fetch(
            _LOOKUP,
            [account_id for account_id, _ in visitors],
            [user_id for _, user_id in visitors],
            list(range(len(visitors))),
            api.utcnow(),
        )
        for row in rows:
            found[row["k"]].append(row)
        return found

    async def eligible(self, visitor: Visitor) -> list[dict[str, Any]]:
        """The pop-ups the visitor may see now, newest first."""
        now = api.utcnow()
        shown: list[dict[str, Any]] = []
        campaigns_shown: set[str] = set()
        for row in await self._lookup((visitor.account_id, visitor.user_id)):
            name = row["campaign"]
            if name in campaigns_shown or len(shown) >= MAX_SHOWN:
                continue
            try:
                known = await self.campaigns.get(name)
            except NotReady:
                continue
            campaign = known.campaign
            zone = _zone(visitor, row["timezone"])
            if (
                known.account_id != visitor.account_id
                or campaign.state not in _SHOWING
                or _past_end(campaign, now)
                or _too_soon(campaign.web_popup.frequency, row, visitor, zone, now)
                or _quiet_now(campaign, zone, now)
                or (visitor.url and not shown_on(campaign.schedule.live.trigger, visitor.url))
            ):
                continue
            campaigns_shown.add(name)
            shown.append({"delivery_id": row["delivery_id"], "campaign": name, **json.loads(row["popup"])})
        return shown

    async def forget_expired(self) -> bool:
        """Takes pop-ups that expired unseen out of the inboxes, reporting them; True when more
        may be waiting."""
        now = api.utcnow()
        async with self.database.transaction() as session:
            expired = (
                sa.select(web_inbox.c.delivery_id)
                .where(web_inbox.c.expires_at <= now)
                .limit(EXPIRED_PER_SWEEP)
                .with_for_update(skip_locked=True)
                .scalar_subquery()
            )
            rows = (
                await session.execute(
                    sa.delete(web_inbox)
                    .where(web_inbox.c.delivery_id.in_(expired))
                    .returning(
                        web_inbox.c.delivery_id,
                        web_inbox.c.account_id,
                        web_inbox.c.user_id,
                        web_inbox.c.campaign,
                        web_inbox.c.run,
                    )
                )
            ).all()
            by_campaign: dict[tuple[uuid.UUID, str], list[Any]] = defaultdict(list)
            for row in rows:
                by_campaign[(row.account_id, row.campaign)].append(row)
            await enqueue(
                session,
                outbox,
                [
                    self._announcement(
                        account_id,
                        campaign,
                        [
                            _interaction(r.delivery_id, r.user_id, EXPIRED, "", now, r.run)
                            for r in expired_rows
                        ],
                        f"web:expired:{expired_rows[0].delivery_id}:{len(expired_rows)}",
                    )
                    for (account_id, campaign), expired_rows in by_campaign.items()
                ],
            )
        if rows:
            self.notify_outbox()
        return len(rows) == EXPIRED_PER_SWEEP

    async def visitors_merged(self, merges: Sequence[events.VisitorMerged]) -> None:
        """An anonymous visitor signed in: their pop-ups and what they did with them are the
        user's."""
        async with self.database.transaction() as session:
            for merge in merges:
                account_id = account_id_of(merge.account)
                if account_id is None:
                    continue
                for table in (web_inbox, web_interactions):
                    await session.execute(
                        sa.update(table)
                        .where(table.c.account_id == account_id, table.c.user_id == merge.anonymous_id)
                        .values(user_id=merge.user_id)
                    )

    async def interact(self, visitor: Visitor, delivery_id: str, kind: str) -> bool:
        """Records what the visitor did with a pop-up delivered to them; False when no such pop-up
        was delivered to them (or, for a click or close, shown to them)."""
        now = api.utcnow()
        async with self.database.transaction() as session:
            if kind == VIEWED:
                taken = (
                    await session.execute(
                        sa.delete(web_inbox)
                        .where(
                            web_inbox.c.delivery_id == delivery_id,
                            web_inbox.c.account_id == visitor.account_id,
                            web_inbox.c.user_id == visitor.user_id,
                        )
                        .returning(web_inbox.c.campaign, web_inbox.c.run)
                    )
                ).first()
                shown = taken if taken is not None else await self._viewed(session, visitor, delivery_id)
            else:
                shown = await self._viewed(session, visitor, delivery_id)
            if shown is None:
                return False
            campaign, run = shown.campaign, shown.run
            recorded = (
                await session.execute(
                    insert(web_interactions)
                    .values(
                        delivery_id=delivery_id,
                        kind=kind,
                        account_id=visitor.account_id,
                        user_id=visitor.user_id,
                        campaign=campaign,
                        run=run,
                        session_id=visitor.session_id,
                        at=now,
                    )
                    .on_conflict_do_nothing()
                    .returning(web_interactions.c.delivery_id)
                )
            ).first()
            if recorded is not None:
                interaction = _interaction(delivery_id, visitor.user_id, kind, visitor.session_id, now, run)
                announced = self._announcement(
                    visitor.account_id, campaign, [interaction], f"web:{delivery_id}:{kind}"
                )
                await enqueue(session, outbox, [announced])
        if recorded is not None:
            self.notify_outbox()
        return True

    @staticmethod
    async def _viewed(session: Any, visitor: Visitor, delivery_id: str) -> Any:
        """The campaign and run of a pop-up the visitor was shown (None if they were not)."""
        return (
            await session.execute(
                sa.select(web_interactions.c.campaign, web_interactions.c.run).where(
                    web_interactions.c.delivery_id == delivery_id,
                    web_interactions.c.kind == VIEWED,
                    web_interactions.c.account_id == visitor.account_id,
                    web_interactions.c.user_id == visitor.user_id,
                )
            )
        ).first()

    def _announcement(
        self, account_id: uuid.UUID, campaign: str, interactions: list[events.WebInteraction], message_id: str
    ) -> OutboxEvent:
        announced = events.WebInteractions(
            event_id=message_id, account=account_name(account_id), campaign=campaign, results=interactions
        )
        return OutboxEvent.of(self.subjects.web_interactions, announced, message_id)


def _interaction(
    delivery_id: str, user_id: str, kind: str, session_id: str, at: datetime, run: str
) -> events.WebInteraction:
    interaction = events.WebInteraction(
        delivery_id=delivery_id, user_id=user_id, kind=_KINDS[kind], session_id=session_id, run=run
    )
    interaction.occur_time.CopyFrom(api.timestamp(at))
    return interaction


_KINDS = {
    VIEWED: events.WEB_INTERACTION_KIND_VIEWED,
    CLICKED: events.WEB_INTERACTION_KIND_CLICKED,
    CLOSED: events.WEB_INTERACTION_KIND_CLOSED,
    EXPIRED: events.WEB_INTERACTION_KIND_EXPIRED,
}
