"""How many messages a run may still send: in all, and per day."""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import date, datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from herald.accounts.v1 import account_service_pb2 as accounts_pb
from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald_common.db import Built, Target
from herald_common.schedules import account_zone
from herald_common.timing import local_day
from herald_scheduler.storage import live_days


class RunLimits:
    """A run's limits on messages: in all (live campaigns), and per day in the account's zone
    (live and Best Time campaigns). What was taken is kept per (run, day), so a resumed or
    concurrent decision counts what others took."""

    def __init__(self, targeting: campaign_pb.Targeting, settings: accounts_pb.AccountSettings) -> None:
        cap = targeting.WhichOneof("cap")
        self.total = targeting.total_limit if cap == "total_limit" else 0
        self.daily = targeting.daily_limit if cap == "daily_limit" else 0
        self.zone = account_zone(settings)
        self.used: dict[date, int] = {}
        self.taken: dict[date, int] = defaultdict(int)

    @property
    def exhausted(self) -> bool:
        return self.total > 0 and sum(self.used.values()) + sum(self.taken.values()) >= self.total

    async def load(self, target: Target, run_id: uuid.UUID) -> None:
        if self.total or self.daily:
            rows = await Built(
                sa.select(live_days.c.day, live_days.c.used).where(live_days.c.run_id == run_id)
            ).fetch(target)
            self.used = {row.day: row.used for row in rows}

    def take(self, at: datetime) -> bool:
        """Takes one message's place, if the limits leave one."""
        if not (self.total or self.daily):
            return True  # nothing to count
        day = local_day(at, self.zone)
        if self.exhausted or (self.daily and self.used.get(day, 0) + self.taken[day] >= self.daily):
            return False
        self.taken[day] += 1
        return True

    async def save(self, target: Target, run_id: uuid.UUID, account_id: uuid.UUID) -> None:
        taken = {day: n for day, n in self.taken.items() if n}
        if not taken:
            return
        statement = insert(live_days).values(
            [{"run_id": run_id, "day": day, "account_id": account_id, "used": n} for day, n in taken.items()]
        )
        upsert = statement.on_conflict_do_update(
            index_elements=[live_days.c.run_id, live_days.c.day],
            set_={"used": live_days.c.used + statement.excluded.used},
        )
        await Built(upsert).execute(target)
