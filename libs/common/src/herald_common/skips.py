"""Why a planned delivery was not sent: the reasons the scheduler records, each the words users
see in stats and explanations."""

from __future__ import annotations

import enum


class SkipReason(enum.StrEnum):
    CONTROL_GROUP = "control group"
    NOT_REACHABLE = "not reachable on the channel"
    TARGETING_CAP = "left out by the random cap"
    QUIET_HOURS = "due in do-not-disturb hours (discarded)"
    CUTOFF = "cut-off time passed"
    FREQUENCY_CAP = "frequency cap reached"
    THROTTLED_CUTOFF = "throttled until the cut-off time passed"
    CAMPAIGN_STOPPED = "campaign stopped"
    SEND_TIME_PASSED = "the send time had passed in the user's time zone when the campaign was published"
    LIVE_LIMIT = "the live campaign's limit was reached"
    DAILY_LIMIT = "every day of the Best Time window had reached the campaign's daily limit"
    DATE_PASSED = "the date had already passed when the event arrived"
    MALFORMED_DATE = "the event's date property is not an RFC 3339 date-time"
