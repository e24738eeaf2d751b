"""The campaigns dispatch delivers for, as CampaignChanged announces them.

Stored in the database (every replica sees what one consumer recorded) and cached for a second,
so a stopped campaign stops sending within seconds without a query per request.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.events.v1 import events_pb2 as events
from herald_common.auth import NO_ACCOUNT, account_id_of
from herald_common.db import Database
from herald_common.faults import NotReady
from herald_common.runtime import newest_campaign_changes
from herald_dispatch.storage import campaigns

CACHE_SECONDS = 1.0
_DELIVERING = {campaign_pb.State.STATE_SCHEDULED, campaign_pb.State.STATE_RUNNING}


@dataclass(frozen=True)
class KnownCampaign:
    campaign: campaign_pb.Campaign
    version: int
    account_id: uuid.UUID
    read_at: float

    @property
    def delivering(self) -> bool:
        return self.campaign.state in _DELIVERING


class CampaignBook:
    def __init__(self, database: Database) -> None:
        self.database = database
        self._cache: dict[str, KnownCampaign] = {}
        self._reading: dict[str, asyncio.Lock] = {}

    async def apply(self, changes: Sequence[events.CampaignChanged]) -> None:
        """Keeps the newest version of each campaign; older events arriving late change nothing."""
        newest = newest_campaign_changes(changes)
        if not newest:
            return
        statement = insert(campaigns)
        async with self.database.transaction() as session:
            await session.execute(
                statement.on_conflict_do_update(
                    index_elements=[campaigns.c.name],
                    set_={
                        "version": statement.excluded.version,
                        "account_id": statement.excluded.account_id,
                        "state": statement.excluded.state,
                        "destination": statement.excluded.destination,
                        "snapshot": statement.excluded.snapshot,
                    },
                    where=campaigns.c.version < statement.excluded.version,
                ),
                [
                    {
                        "name": c.campaign.name,
                        "account_id": account_id_of(c.account) or NO_ACCOUNT,
                        "version": c.version,
                        "state": campaign_pb.State.Name(c.campaign.state),
                        "destination": c.campaign.destination,
                        "snapshot": c.campaign.SerializeToString(),
                    }
                    for c in newest
                ],
            )
        for change in newest:
            self._cache.pop(change.campaign.name, None)

    async def get(self, name: str, at_least_version: int = 0) -> KnownCampaign:
        """The campaign as last announced; NotReady until the announcement of that version arrived.
        When the cached copy is stale, one caller reads it again while the others wait for it."""
        known = self._cache.get(name)
        if self._fresh(known, at_least_version):
            assert known is not None
            return known
        async with self._reading.setdefault(name, asyncio.Lock()):
            cached = self._cache.get(name)
            known = (
                cached
                if cached is not None and self._fresh(cached, at_least_version)
                else await self._read(name)
            )
        if known.version < at_least_version:
            raise NotReady(f"{name} version {at_least_version} has not been announced yet")
        return known

    @staticmethod
    def _fresh(known: KnownCampaign | None, at_least_version: int) -> bool:
        return (
            known is not None
            and time.monotonic() - known.read_at <= CACHE_SECONDS
            and known.version >= at_least_version
        )

    async def _read(self, name: str) -> KnownCampaign:
        async with self.database.transaction() as session:
            row = (
                await session.execute(
                    sa.select(campaigns.c.snapshot, campaigns.c.version, campaigns.c.account_id).where(
                        campaigns.c.name == name
                    )
                )
            ).first()
        if row is None:
            raise NotReady(f"{name} has not been announced yet")
        known = KnownCampaign(
            campaign_pb.Campaign.FromString(row.snapshot), row.version, row.account_id, time.monotonic()
        )
        self._cache[name] = known
        return known
