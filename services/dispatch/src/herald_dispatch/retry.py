"""When to retry an HTTP delivery and how long to wait, shared by every destination worker."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

MAX_RETRY_AFTER_SECONDS = 300.0
MAX_BACKOFF_SECONDS = 60.0
# Transient by nature; every other 4xx means the request itself is wrong.
_RETRYABLE_4XX = {408, 410, 429, 460}
_PERMANENT_5XX = {501, 505}


def is_retryable(status: int) -> bool:
    return status in _RETRYABLE_4XX or (500 <= status <= 599 and status not in _PERMANENT_5XX)


def retry_after_seconds(header: str | None, now: datetime | None = None) -> float | None:
    """Parses Retry-After (seconds or HTTP-date), capped at five minutes; None when absent or bad."""
    if not header:
        return None
    value = header.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = float((when - (now or datetime.now(UTC))).total_seconds())
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def backoff_seconds(attempt: int) -> float:
    """Wait before retry number `attempt` (1-based): immediate, then 0.5s doubling, with 10% jitter."""
    if attempt <= 1:
        return 0.0
    base: float = min(0.5 * 2.0 ** (attempt - 2), MAX_BACKOFF_SECONDS)
    return base + random.uniform(0, base * 0.1)
