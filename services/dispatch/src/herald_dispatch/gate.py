"""The last check before provider requests, shared by every replica through PostgreSQL.

Before each small wave of SMS requests one statement asks whether the campaign was halted, whether
a later attempt at the batch has begun (another replica took it over: this one must stop), which
phones opted out, and records the intent to send the rest, each delivery claimed by one attempt
only. So a stop reaches every replica's next wave, a STOP reply the next message to that phone, a
replica that stalled past its ack wait sends nothing its successor took, and a crash leaves unknown
only the deliveries of the waves really under way.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
import sqlalchemy as sa
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from herald_common.bus import Subjects
from herald_common.db import Database, Statement
from herald_dispatch.storage import halted_campaigns, sms_opt_outs

# A yes from the gate lasts this long: a request is written within it of its last confirmation, or
# confirmed again. Whoever takes deliveries over from a sender waits longer than this before asking
# a provider whether they were sent.
STALE_ADMISSION_SECONDS = 1.0


class Superseded(Exception):
    """Another attempt at the batch has begun: this one stops and records nothing more."""


@dataclass(frozen=True)
class Sender:
    """Who asks to send: an attempt at a batch, refused once a later attempt at it has begun
    (`fenced`); or the settler, which holds its deliveries by a lease instead (`held_until`)."""

    account_id: uuid.UUID
    campaign: str
    batch_id: str
    attempt: int
    fenced: bool = True
    # When the lease on the sender's deliveries runs out (monotonic; inf: held by attempt number).
    held_until: float = math.inf

    def holds(self) -> bool:
        """Whether a request confirmed now would be written before the lease runs out (and another
        settler may claim its deliveries, ask the provider and send)."""
        return time.monotonic() + STALE_ADMISSION_SECONDS < self.held_until


# One message of a wave: (delivery id, phone, user id).
WaveEntry = tuple[str, str, str]


@dataclass(frozen=True)
class Admission:
    """What a wave may do: nothing once its campaign is halted or its attempt superseded; else
    send the admitted, skip the opted-out, and leave the others to the attempt that claimed them."""

    halted: bool = False
    superseded: bool = False
    admitted: frozenset[str] = frozenset()  # delivery ids
    opted_out: frozenset[str] = frozenset()


# $1 account, $2 campaign, $3 batch, $4 attempt, $5 fenced, $6 destination, $7 the wave as a JSON
# array of WaveEntry. The wave goes in, and the admitted and opted-out delivery ids come back, as
# JSON text: asyncpg spends several times as long on a text array's elements.
_ADMIT = """
    WITH gate AS (
        SELECT EXISTS (SELECT 1 FROM dispatch.halted_campaigns WHERE campaign = $2) AS halted,
               $5::bool AND coalesce(
                   (SELECT attempts FROM dispatch.batch_attempts WHERE batch_id = $3), 0
               ) <> $4 AS superseded
    ),
    wave AS (
        SELECT entry->>0 AS d, entry->>1 AS p, entry->>2 AS u FROM json_array_elements($7::json) AS entry
    ),
    blocked AS (
        SELECT w.d FROM wave w
        JOIN dispatch.sms_opt_outs o ON o.account_id = $1 AND o.phone = w.p
    ),
    intended AS (
        INSERT INTO dispatch.delivery_intents AS i
            (delivery_id, account_id, destination, batch_id, attempt, campaign)
        SELECT d, $1, $6, $3, $4, $2 FROM wave
        WHERE NOT (SELECT halted OR superseded FROM gate)
          AND d NOT IN (SELECT d FROM blocked)
          -- A probe of the ledger's key per message (OFFSET 0: as in the ledger's lookups).
          AND NOT EXISTS (SELECT 1 FROM dispatch.deliveries x
                          WHERE x.account_id = $1 AND x.campaign = $2 AND x.user_id = u AND x.delivery_id = d
                          OFFSET 0)
          -- One waiting for its provider to be asked is the settler's alone.
          AND NOT ($5::bool AND EXISTS (SELECT 1 FROM dispatch.unsettled s WHERE s.delivery_id = d))
        -- The same attempt may ask again (a group's next provider); another attempt may not.
        ON CONFLICT (delivery_id) DO UPDATE SET destination = excluded.destination
            WHERE i.batch_id = excluded.batch_id AND i.attempt = excluded.attempt
        RETURNING delivery_id
    )
    SELECT (SELECT halted FROM gate) AS halted, (SELECT superseded FROM gate) AS superseded,
           (SELECT coalesce(json_agg(delivery_id), '[]')::text FROM intended) AS admitted,
           (SELECT coalesce(json_agg(d), '[]')::text FROM blocked) AS opted_out
"""
_HALTED = Statement("SELECT EXISTS (SELECT 1 FROM dispatch.halted_campaigns WHERE campaign = :campaign)")
_MAY_SEND = Statement(
    """
    SELECT EXISTS (SELECT 1 FROM dispatch.halted_campaigns WHERE campaign = :campaign) AS halted,
           CAST(:fenced AS bool) AND coalesce(
               (SELECT attempts FROM dispatch.batch_attempts WHERE batch_id = :batch_id), 0
           ) <> :attempt AS superseded
    """
)
_UNDER_WAY = sa.text("SELECT EXISTS (SELECT 1 FROM dispatch.delivery_intents WHERE campaign = :campaign)")
# How often a halt looks whether the campaign's admitted requests have all been made.
HALT_POLL_SECONDS = 0.05
_OPTED_OUT = sa.text(
    """
    SELECT phone FROM dispatch.sms_opt_outs
    WHERE account_id = :account_id AND phone = ANY(CAST(:phones AS text[]))
    """
)


class SendGate:
    def __init__(
        self, database: Database, nats: NatsClient | None = None, subjects: Subjects | None = None
    ) -> None:
        self.database = database
        self.nats = nats
        self.subjects = subjects
        # Campaigns this process has been told are halted: a request admitted before the halt
        # is skipped, not made, when its turn comes after it.
        self.halted_here: set[str] = set()

    async def follow_halts(self) -> None:
        """Hears of halts from every replica at once (the database stays the authority)."""
        assert self.nats is not None and self.subjects is not None

        async def heard(msg: Msg) -> None:
            self.halted_here.add(msg.data.decode(errors="replace"))

        await self.nats.subscribe(self.subjects.campaign_halts, cb=heard)

    async def admit(self, sender: Sender, destination: str, wave: Sequence[WaveEntry]) -> Admission:
        """For the messages about to be sent through `destination`: records the intent to send
        those it admits, in one statement (on asyncpg directly: it runs before every few dozen
        messages)."""
        if not sender.holds():
            return Admission(superseded=True)
        row = await self.database.fetch_row(
            _ADMIT,
            sender.account_id,
            sender.campaign,
            sender.batch_id,
            sender.attempt,
            sender.fenced,
            destination,
            orjson.dumps(wave).decode(),
        )
        return Admission(
            bool(row["halted"]),
            bool(row["superseded"]),
            frozenset(orjson.loads(row["admitted"])),
            frozenset(orjson.loads(row["opted_out"])),
        )

    async def opted_out(self, account_id: uuid.UUID, phones: Sequence[str]) -> set[str]:
        """Which of `phones` replied STOP to the account."""
        async with self.database.transaction() as session:
            found = await session.execute(_OPTED_OUT, {"account_id": account_id, "phones": list(phones)})
            return {row.phone for row in found}

    async def may_send(self, sender: Sender) -> bool:
        """Whether the sender's next request may start: False once its campaign is halted; raises
        Superseded once another attempt at its batch has begun (another replica took it over), or
        the lease it holds them by is running out."""
        if not sender.holds():
            raise Superseded(f"the hold on {sender.batch_id}'s deliveries is running out")
        async with self.database.connection() as connection:
            row = await _MAY_SEND.fetch_row(
                connection,
                campaign=sender.campaign,
                batch_id=sender.batch_id,
                attempt=sender.attempt,
                fenced=sender.fenced,
            )
        assert row is not None
        if row.superseded:
            raise Superseded(f"{sender.batch_id} was taken over by attempt after {sender.attempt}")
        return not row.halted

    async def halted(self, campaign: str) -> bool:
        async with self.database.connection() as connection:
            return bool(await _HALTED.fetch_value(connection, campaign=campaign))

    async def halt(self, account_id: uuid.UUID, campaign: str, within: float) -> bool:
        """Halts the campaign: no replica admits another wave of it. Then waits, up to `within`
        seconds, until the requests already admitted have been made and recorded, so that none
        starts after this returns; False when some were still under way."""
        async with self.database.transaction() as session:
            await session.execute(
                insert(halted_campaigns)
                .values(campaign=campaign, account_id=account_id)
                .on_conflict_do_nothing()
            )
        self.halted_here.add(campaign)
        if self.nats is not None and self.subjects is not None:
            await self.nats.publish(self.subjects.campaign_halts, campaign.encode())
        deadline = time.monotonic() + within
        while True:
            async with self.database.transaction() as session:
                if not await session.scalar(_UNDER_WAY, {"campaign": campaign}):
                    return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(HALT_POLL_SECONDS)


async def record_opt_out(session: AsyncSession, account_id: uuid.UUID, phone: str, opted_out: bool) -> None:
    """A STOP (or START) reply from `phone` to one of the account's numbers, in the caller's
    transaction."""
    if opted_out:
        await session.execute(
            insert(sms_opt_outs).values(account_id=account_id, phone=phone).on_conflict_do_nothing()
        )
    else:
        opt_out = sms_opt_outs.c
        await session.execute(
            sa.delete(sms_opt_outs).where(opt_out.account_id == account_id, opt_out.phone == phone)
        )
