"""A hot statement keeps to its indexes however much its tables have grown since it first ran.

PostgreSQL may plan a prepared statement once, from the statistics of the moment, and keep that
plan: one made while the delivery ledger was empty would scan the whole ledger before every wave
of SMS requests, so each wave would cost more than the one before.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg

from herald_common.db import Database, make_engine, migrate
from herald_dispatch.gate import Sender, SendGate
from herald_dispatch.main import MIGRATIONS
from herald_dispatch.storage import SCHEMA
from tests.harness import fresh_settings

LEDGER_ROWS = 20_000
_TABLE_COUNTS = """
    SELECT relname, seq_tup_read, n_tup_ins FROM pg_stat_user_tables
    WHERE schemaname = 'dispatch' AND relname IN ('deliveries', 'delivery_intents')
"""


async def _table_counts(database_url: str) -> dict[str, tuple[int, int]]:
    """(rows read by sequential scans, rows inserted) of the ledger and the intents, as reported."""
    connection = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    try:
        return {
            row["relname"]: (row["seq_tup_read"], row["n_tup_ins"])
            for row in await connection.fetch(_TABLE_COUNTS)
        }
    finally:
        await connection.close()


async def test_admitting_a_wave_reads_only_its_own_rows_of_a_ledger_that_grew(
    servers: tuple[str, str],
) -> None:
    async with fresh_settings(*servers) as settings:
        database = Database(make_engine(settings.database_url, pool_size=1, max_overflow=0))
        try:
            await migrate(database.engine, SCHEMA, MIGRATIONS)
            gate = SendGate(database)
            account = uuid.uuid4()
            sender = Sender(account, "campaigns/c", "batch-1", attempt=1)
            await database.fetch_row(
                "INSERT INTO dispatch.batch_attempts (batch_id, account_id, attempts) VALUES ($1, $2, 1)",
                "batch-1",
                account,
            )
            # Waves while the ledger is empty: a plan kept from these would scan it.
            for n in range(8):
                early = await gate.admit(
                    sender, "destinations/d", [(f"early-{n}", f"+1555000{n:04d}", f"e{n}")]
                )
                assert early.admitted == {f"early-{n}"}
            await database.fetch_row(
                """
                INSERT INTO dispatch.deliveries
                    (delivery_id, account_id, campaign, run, destination, user_id, status, attempts)
                SELECT 'done-' || g, $1, 'campaigns/c', 'runs/r', 'destinations/d', 'u' || g, 'SENT', 1
                FROM generate_series(1, $2) g
                """,
                account,
                LEDGER_ROWS,
            )
            await asyncio.sleep(1.1)  # a session reports its counts at most once a second
            before = await _table_counts(settings.database_url)
            wave = [("late", "+15550009999", "u-late"), ("done-5", "+15550001234", "u5")]
            late = await gate.admit(sender, "destinations/d", wave)
            assert late.admitted == {"late"}  # done-5 is in the ledger: never sent twice

            deadline = time.monotonic() + 20
            while (after := await _table_counts(settings.database_url))["delivery_intents"][1] < 9:
                assert time.monotonic() < deadline, f"the wave's counts were never reported: {after}"
                await asyncio.sleep(0.2)
            ledger_rows_read = after["deliveries"][0] - before["deliveries"][0]
            assert ledger_rows_read < 100, f"the wave read {ledger_rows_read:,} rows of the ledger"
        finally:
            await database.dispose()
