"""The stats counters, per campaign and per run: added to in the transactions that record what
they count."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Mapping

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from herald_campaign.storage import failure_reasons, run_failure_reasons, run_stats, stats

# Users kept as examples of each reason.
MAX_EXAMPLES = 5


def tally() -> defaultdict[str, float]:
    return defaultdict(float)


async def add_campaign_counts(session: AsyncSession, added: Mapping[uuid.UUID, Mapping[str, float]]) -> None:
    for campaign_id, columns in sorted(added.items()):
        if columns:
            await session.execute(
                sa.update(stats)
                .where(stats.c.campaign_id == campaign_id)
                .values({c: stats.c[c] + amount for c, amount in columns.items()})
            )


async def add_run_counts(
    session: AsyncSession, added: Mapping[tuple[str, uuid.UUID, uuid.UUID], Mapping[str, float]]
) -> None:
    """`added` by (run, campaign id, account id)."""
    for (run, campaign_id, account_id), columns in sorted(added.items()):
        if not columns:
            continue
        statement = insert(run_stats).values(
            run=run, campaign_id=campaign_id, account_id=account_id, **columns
        )
        await session.execute(
            statement.on_conflict_do_update(
                index_elements=[run_stats.c.run],
                set_={c: run_stats.c[c] + statement.excluded[c] for c in columns},
            )
        )


async def add_reasons(
    session: AsyncSession,
    reasons: Mapping[tuple[uuid.UUID, str], list[str]],
    owners: Mapping[uuid.UUID, uuid.UUID | None],
    run_reasons: Mapping[tuple[str, str], list[str]],
    run_owners: Mapping[str, uuid.UUID | None],
) -> None:
    """Why deliveries failed or were skipped, by campaign and by run, with a few users as examples."""
    for table, key, found, owner_of in (
        (failure_reasons, failure_reasons.c.campaign_id, reasons, owners),
        (run_failure_reasons, run_failure_reasons.c.run, run_reasons, run_owners),
    ):
        if not found:
            continue
        statement = insert(table)
        await session.execute(
            statement.on_conflict_do_update(
                index_elements=[key, table.c.reason],
                set_={
                    "count": table.c.count + statement.excluded.count,
                    "example_user_ids": sa.literal_column(
                        f"({table.name}.example_user_ids || excluded.example_user_ids)[1:{MAX_EXAMPLES}]"
                    ),
                },
            ),
            [
                {
                    key.name: owner,
                    "account_id": owner_of[owner],  # type: ignore[index]
                    "reason": reason,
                    "count": len(users),
                    "example_user_ids": users[:MAX_EXAMPLES],
                }
                for (owner, reason), users in sorted(found.items())
            ],
        )
