"""Every table of every service carries the account its rows belong to, so every query can be
scoped by it. A new table without an `account_id` column fails here until it has one."""

from __future__ import annotations

import asyncpg

from tests.conftest import Platform

SCHEMAS = ("campaign", "dispatch", "scheduler", "segmentation")
# Tables that hold no account's data, and why.
WITHOUT_ACCOUNT = {
    "campaign.accounts": "the accounts themselves: the id is the account",
    "campaign.alembic_version": "the schema's migration version",
    "dispatch.alembic_version": "the schema's migration version",
    "scheduler.alembic_version": "the schema's migration version",
    "segmentation.alembic_version": "the schema's migration version",
    # Events waiting to be published: each event names its account in its own payload, and the
    # row is gone once published.
    "campaign.outbox": "events in transit, each naming its account",
    "dispatch.outbox": "events in transit, each naming its account",
    "scheduler.outbox": "events in transit, each naming its account",
    "segmentation.outbox": "events in transit, each naming its account",
}


async def test_every_table_carries_the_account(platform: Platform) -> None:
    connection = await asyncpg.connect(platform.settings.database_url)
    try:
        tables = await connection.fetch(
            """
            SELECT t.table_schema || '.' || t.table_name AS name, c.data_type, c.is_nullable
            FROM information_schema.tables t
            LEFT JOIN information_schema.columns c
              ON c.table_schema = t.table_schema AND c.table_name = t.table_name
             AND c.column_name = 'account_id'
            WHERE t.table_schema = ANY($1::text[]) AND t.table_type = 'BASE TABLE'
            """,
            list(SCHEMAS),
        )
    finally:
        await connection.close()
    found = {row["name"]: row for row in tables}
    assert {name.split(".")[0] for name in found} == set(SCHEMAS)
    lacking = sorted(name for name, row in found.items() if row["data_type"] is None)
    assert lacking == sorted(name for name in WITHOUT_ACCOUNT if name in found), (
        f"tables without an account_id column: {sorted(set(lacking) - set(WITHOUT_ACCOUNT))}"
    )
    carrying = {name: row for name, row in found.items() if row["data_type"] is not None}
    assert len(carrying) >= 14
    for name, row in carrying.items():
        assert (row["data_type"], row["is_nullable"]) == ("uuid", "NO"), f"{name}.account_id"
