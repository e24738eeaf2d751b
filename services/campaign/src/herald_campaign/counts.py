"""The stats counters, per campaign and per run: added to in the transactions that record what
they count."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import orjson
import sqlalchemy as sa

from herald_campaign.storage import SCHEMA, failure_reasons, run_failure_reasons, run_stats, stats
from herald_common.db import Statement, Target

# Users kept as examples of each reason.
MAX_EXAMPLES = 5


def tally() -> defaultdict[str, float]:
    return defaultdict(float)


def _counters(table: sa.Table) -> list[sa.Column[Any]]:
    return [c for c in table.c if isinstance(c.type, sa.BigInteger | sa.Float)]


# Every counter of the table added to at once, those not counted by 0: one statement whatever a
# batch counts, cheaper to run than one made for its columns.
_ADD_TO_CAMPAIGN = Statement(
    f"UPDATE {SCHEMA}.{stats.name} SET "
    + ", ".join(f"{c.name} = {c.name} + :{c.name}" for c in _counters(stats))
    + " WHERE campaign_id = :campaign_id"
)
_ADD_TO_RUN = Statement(
    f"INSERT INTO {SCHEMA}.{run_stats.name} AS s (run, campaign_id, account_id, "
    + ", ".join(c.name for c in _counters(run_stats))
    + ") VALUES (:run, :campaign_id, :account_id, "
    + ", ".join(f":{c.name}" for c in _counters(run_stats))
    + ") ON CONFLICT (run) DO UPDATE SET "
    + ", ".join(f"{c.name} = s.{c.name} + excluded.{c.name}" for c in _counters(run_stats))
)


def _amounts(table: sa.Table, columns: Mapping[str, float]) -> dict[str, float | int]:
    """Each counter's amount (0 when not counted), whole for a whole-number column."""
    return {
        c.name: columns.get(c.name, 0) if isinstance(c.type, sa.Float) else int(columns.get(c.name, 0))
        for c in _counters(table)
    }


async def add_campaign_counts(target: Target, added: Mapping[uuid.UUID, Mapping[str, float]]) -> None:
    for campaign_id, columns in sorted(added.items()):  # in one order: concurrent writers cannot deadlock
        if columns:
            await _ADD_TO_CAMPAIGN.execute(target, campaign_id=campaign_id, **_amounts(stats, columns))


async def add_run_counts(
    target: Target, added: Mapping[tuple[str, uuid.UUID, uuid.UUID], Mapping[str, float]]
) -> None:
    """`added` by (run, campaign id, account id)."""
    for (run, campaign_id, account_id), columns in sorted(added.items()):
        if columns:
            keys = {"run": run, "campaign_id": campaign_id, "account_id": account_id}
            await _ADD_TO_RUN.execute(target, **keys, **_amounts(run_stats, columns))


def _add_reasons(table: sa.Table, key: str, key_type: str) -> Statement:
    return Statement(
        f"""
        INSERT INTO {SCHEMA}.{table.name} AS t ({key}, reason, account_id, count, example_user_ids)
        SELECT r.key, r.reason, r.account_id, r.count, ARRAY(SELECT jsonb_array_elements_text(r.examples))
        FROM jsonb_to_recordset(CAST(:reasons AS jsonb))
             AS r(key {key_type}, reason text, account_id uuid, count bigint, examples jsonb)
        ON CONFLICT ({key}, reason) DO UPDATE SET
            count = t.count + excluded.count,
            example_user_ids = (t.example_user_ids || excluded.example_user_ids)[1:{MAX_EXAMPLES}]
        """
    )


_ADD_CAMPAIGN_REASONS = _add_reasons(failure_reasons, "campaign_id", "uuid")
_ADD_RUN_REASONS = _add_reasons(run_failure_reasons, "run", "text")


async def add_reasons(
    target: Target,
    reasons: Mapping[tuple[uuid.UUID, str], list[str]],
    owners: Mapping[uuid.UUID, uuid.UUID | None],
    run_reasons: Mapping[tuple[str, str], list[str]],
    run_owners: Mapping[str, uuid.UUID | None],
) -> None:
    """Why deliveries failed or were skipped, by campaign and by run, with a few users as examples."""
    for statement, found, owner_of in (
        (_ADD_CAMPAIGN_REASONS, reasons, owners),
        (_ADD_RUN_REASONS, run_reasons, run_owners),
    ):
        if found:
            rows = [
                {
                    "key": key,
                    "reason": reason,
                    "account_id": owner_of[key],  # type: ignore[index]
                    "count": len(users),
                    "examples": users[:MAX_EXAMPLES],
                }
                for (key, reason), users in sorted(found.items())
            ]
            await statement.execute(target, reasons=orjson.dumps(rows, default=str).decode())
