"""The account's frequency caps: at most N messages of a channel per user per local day and week,
across every campaign that applies them and every scheduler replica.

Counts live in PostgreSQL and are taken under row locks in one order, in the transaction that
hands the deliveries over, so two replicas releasing to the same user serialize on that user's
rows and neither can pass the cap.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from herald_common.db import Statement, Target
from herald_common.timing import local_day, zone_named

# Counts are kept a little past their period, then dropped.
_KEEP = timedelta(days=2)

_ENSURE = Statement(
    """
    INSERT INTO scheduler.frequency_counts (account_id, channel, user_id, period, used, expires_on)
    SELECT a, c, u, p, 0, e
    FROM unnest(CAST(:accounts AS uuid[]), CAST(:channels AS text[]), CAST(:users AS text[]),
                CAST(:periods AS text[]), CAST(:expires AS date[])) AS t(a, c, u, p, e)
    ORDER BY a, c, u, p
    ON CONFLICT DO NOTHING
    """
)
_LOCK = Statement(
    """
    SELECT f.account_id, f.channel, f.user_id, f.period, f.used
    FROM scheduler.frequency_counts f
    JOIN unnest(CAST(:accounts AS uuid[]), CAST(:channels AS text[]), CAST(:users AS text[]),
                CAST(:periods AS text[])) AS t(a, c, u, p)
      ON f.account_id = t.a AND f.channel = t.c AND f.user_id = t.u AND f.period = t.p
    ORDER BY f.account_id, f.channel, f.user_id, f.period
    FOR UPDATE OF f
    """
)
_STORE = Statement(
    """
    UPDATE scheduler.frequency_counts f SET used = t.n
    FROM unnest(CAST(:accounts AS uuid[]), CAST(:channels AS text[]), CAST(:users AS text[]),
                CAST(:periods AS text[]), CAST(:used AS int[])) AS t(a, c, u, p, n)
    WHERE f.account_id = t.a AND f.channel = t.c AND f.user_id = t.u AND f.period = t.p
    """
)
_FORGET = Statement("DELETE FROM scheduler.frequency_counts WHERE expires_on < :today")


@dataclass(frozen=True)
class Cap:
    per_day: int  # zero: no daily cap
    per_week: int  # zero: no weekly cap


@dataclass(frozen=True)
class Send:
    """One delivery about to be handed over, subject to a cap."""

    account_id: uuid.UUID
    channel: str
    user_id: str
    zone: str
    cap: Cap


Key = tuple[uuid.UUID, str, str, str]


def _periods(send: Send, now: datetime) -> tuple[tuple[Key, date], tuple[Key, date]]:
    """The user's local day and ISO week at `now`, as count keys with their expiry."""
    zone = zone_named(send.zone)
    day = local_day(now, zone) if zone is not None else now.date()
    monday = day - timedelta(days=day.weekday())
    base = (send.account_id, send.channel, send.user_id)
    return (
        ((*base, f"D{day.isoformat()}"), day + _KEEP),
        ((*base, f"W{monday.isoformat()}"), monday + timedelta(days=7) + _KEEP),
    )


def _columns(keys: list[Key]) -> dict[str, list[object]]:
    return {
        "accounts": [k[0] for k in keys],
        "channels": [k[1] for k in keys],
        "users": [k[2] for k in keys],
        "periods": [k[3] for k in keys],
    }


async def admit(target: Target, sends: list[Send], now: datetime) -> list[bool]:
    """Whether each delivery fits its user's caps, in order; those that fit are counted."""
    if not sends:
        return []
    periods = [_periods(s, now) for s in sends]
    expiry = dict(p for pair in periods for p in pair)
    keys = sorted(expiry)
    await _ENSURE.execute(target, **_columns(keys), expires=[expiry[k] for k in keys])
    used: dict[Key, int] = {
        (r.account_id, r.channel, r.user_id, r.period): r.used
        for r in await _LOCK.fetch(target, **_columns(keys))
    }
    fits: list[bool] = []
    changed: set[Key] = set()
    for send, ((day, _), (week, _)) in zip(sends, periods, strict=True):
        ok = (not send.cap.per_day or used[day] < send.cap.per_day) and (
            not send.cap.per_week or used[week] < send.cap.per_week
        )
        if ok:
            used[day] += 1
            used[week] += 1
            changed.update((day, week))
        fits.append(ok)
    if changed:
        ordered = sorted(changed)
        await _STORE.execute(target, **_columns(ordered), used=[used[k] for k in ordered])
    return fits


async def forget_expired(target: Target, today: date) -> None:
    await _FORGET.execute(target, today=today)
