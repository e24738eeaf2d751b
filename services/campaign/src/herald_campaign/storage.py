"""Tables of the `campaign` schema."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, UUID

from herald_common.hourly_quota import hourly_use_table
from herald_common.outbox import outbox_table

SCHEMA = "campaign"
metadata = sa.MetaData(schema=SCHEMA)

campaigns = sa.Table(
    "campaigns",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    # The owner; every query of the API is scoped by it.
    sa.Column("account_id", UUID(as_uuid=True), nullable=False, index=True),
    sa.Column("state", sa.Text, nullable=False),
    # The Campaign message as the user defined it (output-only fields live in columns).
    sa.Column("spec", sa.LargeBinary, nullable=False),
    # What the spec refers to, to find the campaigns that use a segment or a destination.
    sa.Column("segment", sa.Text, nullable=False, server_default="", index=True),
    sa.Column("destination", sa.Text, nullable=False, server_default="", index=True),
    sa.Column("request_id", sa.Text, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
    # One higher on every change; CampaignChanged carries it so readers keep the newest.
    sa.Column("version", sa.BigInteger, nullable=False, server_default="1"),
    sa.Column("failure_reason", sa.Text, nullable=False, server_default=""),
    sa.UniqueConstraint("account_id", "request_id", name="campaigns_account_request_id_key"),
)

# What the scheduler reported about each run of a campaign.
runs = sa.Table(
    "runs",
    metadata,
    sa.Column("run", sa.Text, primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("campaign_id", UUID(as_uuid=True), nullable=False, index=True),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("targeted", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("final", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("error", sa.Text, nullable=False, server_default=""),
    sa.Column("scheduled_at", sa.DateTime(timezone=True), nullable=True),
    # RunChanged.version of this report: older reports arriving late are ignored.
    sa.Column("version", sa.BigInteger, nullable=False),
)

# One row per DeliveryOutcomes event counted: each delivery is reported in exactly one such event,
# so counting each event once counts each delivery once.
outcome_events = sa.Table(
    "outcome_events",
    metadata,
    sa.Column("event_id", sa.Text, primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("campaign_id", UUID(as_uuid=True), nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

# Why deliveries failed or were skipped, per campaign, with a few of the users concerned.
failure_reasons = sa.Table(
    "failure_reasons",
    metadata,
    sa.Column("campaign_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("reason", sa.Text, primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("count", sa.BigInteger, nullable=False),
    sa.Column("example_user_ids", ARRAY(sa.Text), nullable=False),
)

stats = sa.Table(
    "campaign_stats",
    metadata,
    sa.Column("campaign_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("sent", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("failed", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("skipped", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("unknown", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("resent", sa.BigInteger, nullable=False, server_default="0"),
    # What providers' receipts said of sent messages.
    sa.Column("delivered", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("undelivered", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("receipt_failed", sa.BigInteger, nullable=False, server_default="0"),
    # What visitors did with web pop-ups.
    sa.Column("viewed", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("clicked", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("closed", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("expired", sa.BigInteger, nullable=False, server_default="0"),
    # Set while a destination holds this campaign's deliveries back.
    sa.Column("waiting_reason", sa.Text, nullable=False, server_default=""),
    sa.Column("waiting_changed_at", sa.DateTime(timezone=True), nullable=True),
    # Against the goal (kept with the exposures and conversions they count).
    sa.Column("goal_sent", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("goal_converted", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("goal_control", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("goal_control_converted", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("goal_revenue", sa.Float, nullable=False, server_default="0"),
    sa.Column("goal_control_revenue", sa.Float, nullable=False, server_default="0"),
)

# Each run's delivery and goal counts (as campaign_stats', for one run).
run_stats = sa.Table(
    "run_stats",
    metadata,
    sa.Column("run", sa.Text, primary_key=True),
    sa.Column("campaign_id", UUID(as_uuid=True), nullable=False, index=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    *(
        sa.Column(c, sa.BigInteger, nullable=False, server_default="0")
        for c in (
            "sent",
            "failed",
            "skipped",
            "unknown",
            "resent",
            "goal_sent",
            "goal_converted",
            "goal_control",
            "goal_control_converted",
        )
    ),
    sa.Column("goal_revenue", sa.Float, nullable=False, server_default="0"),
    sa.Column("goal_control_revenue", sa.Float, nullable=False, server_default="0"),
    # What providers' receipts said of the run's messages, and what visitors did with its pop-ups.
    *(
        sa.Column(c, sa.BigInteger, nullable=False, server_default="0")
        for c in ("delivered", "undelivered", "receipt_failed", "viewed", "clicked", "closed", "expired")
    ),
)

# Why each run's deliveries failed or were skipped.
run_failure_reasons = sa.Table(
    "run_failure_reasons",
    metadata,
    sa.Column("run", sa.Text, primary_key=True),
    sa.Column("reason", sa.Text, primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("count", sa.BigInteger, nullable=False),
    sa.Column("example_user_ids", ARRAY(sa.Text), nullable=False),
)

# Each delivery of a campaign with a goal that was sent, or held back (control), and when.
exposures = sa.Table(
    "exposures",
    metadata,
    sa.Column("delivery_id", sa.Text, primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("campaign_id", UUID(as_uuid=True), nullable=False),
    sa.Column("run", sa.Text, nullable=False),
    sa.Column("user_id", sa.Text, nullable=False),
    sa.Column("control", sa.Boolean, nullable=False),
    sa.Column("exposed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_campaign_exposures_user", "campaign_id", "user_id", "exposed_at"),
    # An anonymous web visitor's, found when they sign in and become a user.
    sa.Index(
        "ix_campaign_exposures_visitor",
        "account_id",
        "user_id",
        postgresql_where=sa.text("user_id LIKE 'anon:%'"),
    ),
)

# The exposures that converted: by which event (one conversion per event and per exposure), when,
# and the revenue it brought. Written once each, never updated.
conversions = sa.Table(
    "conversions",
    metadata,
    sa.Column("campaign_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("client_event_id", sa.Text, primary_key=True),
    sa.Column("delivery_id", sa.Text, nullable=False, unique=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("run", sa.Text, nullable=False),
    sa.Column("control", sa.Boolean, nullable=False),
    sa.Column("converted_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revenue", sa.Float, nullable=False),
)

# Goal events that came before the message they follow was recorded (its outcome was still on
# its way): attributed when it is, or dropped when they expire.
waiting_goal_events = sa.Table(
    "waiting_goal_events",
    metadata,
    sa.Column("campaign_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("client_event_id", sa.Text, primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("user_id", sa.Text, nullable=False),
    sa.Column("event_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revenue", sa.Float, nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_campaign_waiting_goal_events_user", "campaign_id", "user_id"),
    sa.Index("ix_campaign_waiting_goal_events_expiry", "expires_at"),
)

# Tenants, and their API keys (the secret part only as a SHA-256 hash).
accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("request_id", sa.Text, nullable=True, unique=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    # The account's own limits; zero takes the installation's defaults.
    sa.Column("requests_per_second", sa.Float, nullable=False, server_default="0"),
    sa.Column("max_batch_size", sa.Integer, nullable=False, server_default="0"),
    sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
    # AccountSettings, serialized; one higher settings_version on every change.
    sa.Column("settings", sa.LargeBinary, nullable=False, server_default=sa.text("''::bytea")),
    sa.Column("settings_version", sa.BigInteger, nullable=False, server_default="0"),
)
api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("key_id", sa.Text, nullable=False, unique=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False, index=True),
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("secret_sha256", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    # Publishable keys: the web origins whose pages may use the key.
    sa.Column("allowed_origins", ARRAY(sa.Text), nullable=False, server_default="{}"),
)

outbox = outbox_table(metadata)

# Costly calls counted per hour (herald_common.hourly_quota).
hourly_use = hourly_use_table(metadata)
