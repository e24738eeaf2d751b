"""How long a destination worker waits before retrying, and which answers it retries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from herald_dispatch.retry import backoff_seconds, is_retryable, retry_after_seconds


@pytest.mark.parametrize("status", [408, 410, 429, 460, 500, 502, 503, 504, 599])
def test_transient_answers_are_retried(status: int) -> None:
    assert is_retryable(status)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422, 501, 505])
def test_answers_about_the_request_itself_are_final(status: int) -> None:
    assert not is_retryable(status)


def test_retry_after_in_seconds_and_as_a_date() -> None:
    now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    assert retry_after_seconds("7", now) == 7
    assert retry_after_seconds(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == 30
    assert retry_after_seconds(format_datetime(now - timedelta(seconds=30), usegmt=True), now) == 0
    assert retry_after_seconds("86400", now) == 300, "capped at five minutes"
    assert retry_after_seconds("soon", now) is None
    assert retry_after_seconds(None, now) is None


def test_backoff_starts_immediately_then_doubles_up_to_a_minute() -> None:
    assert backoff_seconds(1) == 0
    assert 0.5 <= backoff_seconds(2) <= 0.55
    assert 1.0 <= backoff_seconds(3) <= 1.1
    assert 60 <= backoff_seconds(20) <= 66
