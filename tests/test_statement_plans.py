"""A hot statement keeps to its indexes however much its tables have grown since it was planned.

PostgreSQL plans from its statistics, which may date from when the delivery ledger was empty (a
new installation, analyzed before its first campaign): a plan that trusted them would read the
whole ledger, or a campaign's whole range of it, before every wave of SMS requests and every
batch, so each would cost more than the one before.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg

from herald.events.v1 import events_pb2 as events
from herald_common.bus import Subjects
from herald_common.db import Database, make_engine, migrate
from herald_dispatch.gate import Sender, SendGate
from herald_dispatch.ledger import DeliveryLedger
from herald_dispatch.main import MIGRATIONS
from herald_dispatch.storage import SCHEMA
from tests.harness import fresh_settings

LEDGER_ROWS = 20_000
# Rows of the ledger and the intents read so far, by sequential scans and through their indexes.
_ROWS_READ = """
    SELECT t.relname, t.seq_tup_read + coalesce(sum(i.idx_tup_read), 0) AS rows_read, t.n_tup_ins
    FROM pg_stat_user_tables t LEFT JOIN pg_stat_user_indexes i USING (relid)
    WHERE t.schemaname = 'dispatch' AND t.relname IN ('deliveries', 'delivery_intents')
    GROUP BY t.relname, t.seq_tup_read, t.n_tup_ins
"""


async def _table_counts(database_url: str) -> dict[str, tuple[int, int]]:
    """(rows read, rows inserted) of the ledger and the intents, as reported."""
    connection = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    try:
        return {
            row["relname"]: (row["rows_read"], row["n_tup_ins"]) for row in await connection.fetch(_ROWS_READ)
        }
    finally:
        await connection.close()


async def test_admitting_a_wave_and_beginning_a_batch_read_only_their_own_rows_of_a_ledger_that_grew(
    servers: tuple[str, str],
) -> None:
    async with fresh_settings(*servers) as settings:
        database = Database(make_engine(settings.database_url, pool_size=1, max_overflow=0))
        try:
            await migrate(database.engine, SCHEMA, MIGRATIONS)
            gate = SendGate(database)
            ledger = DeliveryLedger(database, Subjects(settings.namespace), "twilio", settle_seconds=2.0)
            account = uuid.uuid4()
            sender = Sender(account, "campaigns/c", "batch-1", attempt=1)
            await database.fetch_row(
                "INSERT INTO dispatch.batch_attempts (batch_id, account_id, attempts) VALUES ($1, $2, 1)",
                "batch-1",
                account,
            )
            # Statistics of an empty ledger, as on a new installation, and waves while it is empty:
            # a plan made from these would read the ledger, or the campaign's range of it, whole.
            await database.fetch_row("ANALYZE dispatch.deliveries")
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
            # A batch of the campaign, handed over again: its one delivery in the ledger is found.
            batch = events.DeliveryBatch(batch_id="batch-2", campaign="campaigns/c")
            batch.recipients.add(delivery_id="done-7", user_id="u7")
            for n in range(499):
                batch.recipients.add(delivery_id=f"new-{n}", user_id=f"n{n}")
            attempt = await ledger.begin(batch, account)
            assert attempt.finished == {"done-7"}

            deadline = time.monotonic() + 20
            while True:
                await asyncio.sleep(1.1)
                await database.fetch_row("SELECT 1")  # the session reports its counts as it ends this
                after = await _table_counts(settings.database_url)
                if after["delivery_intents"][1] >= 9:
                    break
                assert time.monotonic() < deadline, f"the counts were never reported: {after}"
            ledger_rows_read = after["deliveries"][0] - before["deliveries"][0]
            assert ledger_rows_read < 100, f"a wave and a batch read {ledger_rows_read:,} rows of the ledger"
        finally:
            await database.dispose()
