"""Tables of the `scheduler` schema."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import UUID

from herald_common.outbox import outbox_table

SCHEMA = "scheduler"
metadata = sa.MetaData(schema=SCHEMA)

# The newest snapshot of each campaign, as announced by CampaignChanged.
campaigns = sa.Table(
    "campaigns",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("snapshot", sa.LargeBinary, nullable=False),
    # CampaignChanged.version of the snapshot: an older event arriving late changes nothing.
    sa.Column("version", sa.BigInteger, nullable=False),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("campaign", sa.Text, nullable=False),
    sa.Column("scheduled_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("final", sa.Boolean, nullable=False),
    sa.Column("audience_size", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("targeted", sa.BigInteger, nullable=False, server_default="0"),
    # A RUNNING run whose lease has expired was abandoned by a crashed replica, or waits to retry
    # after a transient failure; whichever replica comes first resumes it.
    sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
    sa.Column("lease_owner", sa.Text, nullable=True),
    # The last user id planned: pages commit with it, so a resumed run plans nobody twice.
    sa.Column("cursor", sa.Text, nullable=False, server_default=""),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    # The seed a random cap chose its users with ('' without one).
    sa.Column("sample_seed", sa.Text, nullable=False, server_default=""),
    # The occurrence's own instant (scheduled_time is when the run starts: earlier with delivery
    # in users' zones).
    sa.Column("planned_time", sa.DateTime(timezone=True), nullable=True),
    # Deliveries waiting in pending_deliveries, and handed to dispatch (skipped ones included).
    sa.Column("waiting", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("released", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("first_release_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("last_release_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("max_lateness_seconds", sa.Float, nullable=False, server_default="0"),
    # One higher on every change; RunChanged carries it so readers keep the newest report.
    sa.Column("version", sa.BigInteger, nullable=False, server_default="1"),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("error", sa.Text, nullable=False, server_default=""),
    # A live run's end (the campaign's end time); NULL for none.
    sa.Column("ends_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    # The traceparent of the change that planned it: planning and releasing continue that trace.
    sa.Column("trace_context", sa.Text, nullable=True),
    sa.UniqueConstraint("campaign", "scheduled_time", name="runs_campaign_time_key"),
    sa.Index("runs_due", "state", "scheduled_time"),
    sa.Index("ix_scheduler_runs_account_campaign", "account_id", "campaign"),
)

# Each account's settings (default zone, throttle, frequency caps), from AccountChanged and from
# CampaignChanged, whichever is newer.
accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("account_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("settings", sa.LargeBinary, nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
)

# Planned deliveries waiting for their due time (the user's local time, the end of do-not-disturb
# hours, the next throttle window): released in (due_at, seq) order by any replica.
pending_deliveries = sa.Table(
    "pending_deliveries",
    metadata,
    sa.Column("run_id", UUID(as_uuid=True), primary_key=True),
    # The group's first delivery id.
    sa.Column("group_id", sa.Text, primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("campaign", sa.Text, nullable=False),
    sa.Column("seq", sa.BigInteger, sa.Identity(), nullable=False),
    sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
    # Not handed over by then: skipped, never sent late.
    sa.Column("cutoff_at", sa.DateTime(timezone=True), nullable=True),
    # The users' zone: frequency caps count in their local day and week.
    sa.Column("zone", sa.Text, nullable=False),
    # Held back by the campaign's throttle at least once.
    sa.Column("throttled", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("size", sa.Integer, nullable=False),
    # events.PendingRecipients, serialized.
    sa.Column("recipients", sa.LargeBinary, nullable=False),
    # Why the group can never be released (quarantined, out of the due order); NULL for the others.
    sa.Column("problem", sa.Text, nullable=True),
    sa.Index("ix_scheduler_pending_due", "due_at", "seq", postgresql_where=sa.text("problem IS NULL")),
)

# Deliveries a throttled campaign released in each 5-minute window, shared by every replica.
throttle_windows = sa.Table(
    "throttle_windows",
    metadata,
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("campaign", sa.Text, primary_key=True),
    sa.Column("window_start", sa.DateTime(timezone=True), primary_key=True),
    sa.Column("used", sa.Integer, nullable=False),
)

# Messages each user was handed on a channel per local day (`D2026-11-23`) and ISO week (`W` and
# its Monday), for the account's frequency caps; rows are dropped after `expires_on`.
frequency_counts = sa.Table(
    "frequency_counts",
    metadata,
    sa.Column("account_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("channel", sa.Text, primary_key=True),
    sa.Column("user_id", sa.Text, primary_key=True),
    sa.Column("period", sa.Text, primary_key=True),
    sa.Column("used", sa.Integer, nullable=False),
    sa.Column("expires_on", sa.Date, nullable=False, index=True),
)

# Live campaigns' waits: an inaction trigger's window or a date-property trigger's moment. Each is
# one row, fired once by whichever replica locks it when due (SKIP LOCKED).
live_timers = sa.Table(
    "live_timers",
    metadata,
    sa.Column("campaign", sa.Text, primary_key=True),
    # The client id of the event that started it: the trigger occurrence.
    sa.Column("occurrence", sa.Text, primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("run_id", UUID(as_uuid=True), nullable=False),
    sa.Column("user_id", sa.Text, nullable=False),
    sa.Column("fire_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("event_name", sa.Text, nullable=False),
    sa.Column("event_time", sa.DateTime(timezone=True), nullable=False),
    # The inaction trigger's match property value (JSON; '' without one).
    sa.Column("match_value", sa.Text, nullable=False, server_default=""),
    sa.Index("ix_scheduler_live_timers_due", "fire_at"),
    sa.Index("ix_scheduler_live_timers_user", "campaign", "user_id"),
)

# Awaited events of inaction triggers, kept for the lateness allowance: a starting event that
# arrives after the awaited one (but happened before it) starts no wait.
live_awaited = sa.Table(
    "live_awaited",
    metadata,
    sa.Column("campaign", sa.Text, primary_key=True),
    sa.Column("user_id", sa.Text, primary_key=True),
    sa.Column("occurrence", sa.Text, primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("match_value", sa.Text, nullable=False),
    sa.Column("event_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_scheduler_live_awaited_expires_at", "expires_at"),
)

# Every trigger occurrence a live campaign acted on, once: how it qualified, and what became of
# it (a delivery, or why none). A replayed event or a re-fired timer finds its row and does nothing.
live_fires = sa.Table(
    "live_fires",
    metadata,
    sa.Column("campaign", sa.Text, primary_key=True),
    sa.Column("occurrence", sa.Text, primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("run_id", UUID(as_uuid=True), nullable=False),
    sa.Column("user_id", sa.Text, nullable=False),
    sa.Column("fired_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("event_name", sa.Text, nullable=False),
    sa.Column("event_time", sa.DateTime(timezone=True), nullable=False),
    # 'event' (it qualified the user as it arrived) or 'timer' (a wait ran out).
    sa.Column("via", sa.Text, nullable=False),
    sa.Column("delivery_id", sa.Text, nullable=True),
    # Why no delivery was made ('' when one was).
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Index("ix_scheduler_live_fires_user", "campaign", "user_id", "fired_at"),
)

# When each user last got a live campaign's message, for its frequency (once, once per N hours).
live_users = sa.Table(
    "live_users",
    metadata,
    sa.Column("campaign", sa.Text, primary_key=True),
    sa.Column("user_id", sa.Text, primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
)

# Messages a live run planned per day (the account's zone), for a daily limit.
live_days = sa.Table(
    "live_days",
    metadata,
    sa.Column("run_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("day", sa.Date, primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("used", sa.BigInteger, nullable=False),
)

outbox = outbox_table(metadata)
