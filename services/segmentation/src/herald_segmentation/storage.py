"""Tables of the `segmentation` schema."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

from herald_common.hourly_quota import hourly_use_table
from herald_common.outbox import outbox_table

SCHEMA = "segmentation"
metadata = sa.MetaData(schema=SCHEMA)

users = sa.Table(
    "users",
    metadata,
    sa.Column("account_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("user_id", sa.Text, primary_key=True),
    sa.Column("properties", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("timezone", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("email", sa.Text, nullable=False, server_default=""),
    sa.Column("phone", sa.Text, nullable=False, server_default=""),
    # [{"type": ..., "value": ...}]
    sa.Column("identities", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
    sa.Column("gender", sa.Text, nullable=False, server_default=""),
    sa.Column("date_of_birth", sa.Date, nullable=True),
    sa.Column("country", sa.Text, nullable=False, server_default=""),
    sa.Column("region", sa.Text, nullable=False, server_default=""),
    sa.Column("city", sa.Text, nullable=False, server_default=""),
    sa.Column("latitude", sa.Float, nullable=True),
    sa.Column("longitude", sa.Float, nullable=True),
    sa.Column("email_unsubscribed", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("sms_unsubscribed", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index("users_properties_gin", "properties", postgresql_using="gin"),
    sa.Index("ix_segmentation_users_email", "account_id", sa.text("lower(email)")),
    sa.Index("ix_segmentation_users_phone", "account_id", "phone"),
    sa.Index("ix_segmentation_users_city", "account_id", "city"),
    sa.Index("ix_segmentation_users_latitude", "account_id", "latitude"),
)

# The devices and browsers each user was seen on, with their app fields.
devices = sa.Table(
    "devices",
    metadata,
    sa.Column("account_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("user_id", sa.Text, primary_key=True),
    sa.Column("device_id", sa.Text, primary_key=True),
    sa.Column("platform", sa.Text, nullable=False),
    sa.Column("app_version", sa.Text, nullable=False),
    sa.Column("make", sa.Text, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("os_version", sa.Text, nullable=False),
    sa.Column("sdk_version", sa.Text, nullable=False),
    sa.Column("push_token", sa.Text, nullable=False),
    sa.Column("push_token_type", sa.Text, nullable=False),
    sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True),
)

# The type each custom property was first sent with, per account: of profiles (subject `user`)
# and of each event's properties (subject `event:<name>`).
property_types = sa.Table(
    "property_types",
    metadata,
    sa.Column("account_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("subject", sa.Text, primary_key=True),
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("type", sa.Text, nullable=False),
)

# Partitioned by month on occurred_at (see the migration); partitions are made as events arrive.
events = sa.Table(
    "events",
    metadata,
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("user_id", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("properties", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    # None for events recorded before client ids were kept.
    sa.Column("client_event_id", sa.Text, nullable=True),
    # Carries user and properties: conditions on events read this index only.
    sa.Index(
        "ix_segmentation_events_name",
        "account_id",
        "name",
        "occurred_at",
        postgresql_include=["user_id", "properties"],
    ),
    # One user's events: a live campaign checks the users who qualify, one by one.
    sa.Index("ix_segmentation_events_user", "account_id", "user_id", "occurred_at"),
)

# The properties of events too large for an entry of the events index (over LARGE_PROPERTIES
# bytes as jsonb); the event row's properties is then the JSON string of its client event id.
LARGE_PROPERTIES = 1500
event_bodies = sa.Table(
    "event_bodies",
    metadata,
    sa.Column("account_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("client_event_id", sa.Text, primary_key=True),
    sa.Column("properties", JSONB, nullable=False),
)

# Each published live campaign's trigger (from CampaignChanged): arriving events are matched
# against the account's active ones as they are recorded.
live_triggers = sa.Table(
    "live_triggers",
    metadata,
    sa.Column("campaign", sa.Text, primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("active", sa.Boolean, nullable=False),
    # herald.campaign.v1.LiveTrigger, serialized.
    sa.Column("trigger", sa.LargeBinary, nullable=False),
    sa.Column("start_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("end_at", sa.DateTime(timezone=True), nullable=True),
    sa.Index("ix_segmentation_live_triggers_account", "account_id", postgresql_where=sa.text("active")),
)

# Each published campaign's goal (from CampaignChanged): arriving events are matched against the
# account's goals from publishing until the conversion window after the campaign ended.
goals = sa.Table(
    "goals",
    metadata,
    sa.Column("campaign", sa.Text, primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    # herald.campaign.v1.Goal, serialized.
    sa.Column("goal", sa.LargeBinary, nullable=False),
    sa.Column("start_at", sa.DateTime(timezone=True), nullable=False),
    # None while the campaign may still send.
    sa.Column("end_at", sa.DateTime(timezone=True), nullable=True),
    sa.Index("ix_segmentation_goals_account", "account_id"),
)

# Sessions, opens and clicks per user and hour of the day (UTC), for Best Time.
activity_hours = sa.Table(
    "activity_hours",
    metadata,
    sa.Column("account_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("user_id", sa.Text, primary_key=True),
    sa.Column("hour", sa.SmallInteger, primary_key=True),
    sa.Column("count", sa.BigInteger, nullable=False),
)

# The client event ids recorded, so a resent event is recorded once.
event_receipts = sa.Table(
    "event_receipts",
    metadata,
    sa.Column("account_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("client_event_id", sa.Text, primary_key=True),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

segments = sa.Table(
    "segments",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("display_name", sa.Text, nullable=False),
    # The SegmentFilter message, serialized: the API shape is the source of truth.
    sa.Column("filter", sa.LargeBinary, nullable=False),
    # The segments and lists the filter refers to, so neither is deleted while in use.
    sa.Column("uses", ARRAY(sa.Text), nullable=False, server_default=sa.text("'{}'::text[]")),
    sa.Column("request_id", sa.Text, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.UniqueConstraint("account_id", "request_id", name="segments_account_request_id_key"),
    sa.Index("ix_segmentation_segments_account_created", "account_id", "created_at"),
)

lists = sa.Table(
    "lists",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("identity_kind", sa.Text, nullable=False),
    sa.Column("row_count", sa.BigInteger, nullable=False),
    sa.Column("matched_count", sa.BigInteger, nullable=False),
    sa.Column("unmatched_count", sa.BigInteger, nullable=False),
    sa.Column("rejected_count", sa.BigInteger, nullable=False),
    # The first rejected rows: [{"line": n, "reason": "..."}]
    sa.Column("rejected_rows", JSONB, nullable=False),
    sa.Column("request_id", sa.Text, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.UniqueConstraint("account_id", "request_id", name="lists_account_request_id_key"),
    sa.Index("ix_segmentation_lists_account_created", "account_id", "created_at"),
)

list_members = sa.Table(
    "list_members",
    metadata,
    sa.Column("account_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("list_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("user_id", sa.Text, primary_key=True),
)

# The members of an audience being streamed, fixed when the stream starts (unlogged: a crash
# loses only streams that are restarted anyway).
audience_snapshots = sa.Table(
    "audience_snapshots",
    metadata,
    sa.Column("snapshot_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("user_id", sa.Text, primary_key=True),
    # 0: a member; LEFT_OUT_UNREACHABLE or LEFT_OUT_BY_SAMPLE when the stream includes those.
    sa.Column("left_out", sa.SmallInteger, nullable=False, server_default="0"),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)
LEFT_OUT_UNREACHABLE = 1
LEFT_OUT_BY_SAMPLE = 2

outbox = outbox_table(metadata)

# Costly calls counted per hour (herald_common.hourly_quota).
hourly_use = hourly_use_table(metadata)

# Anonymous web visitors merged into the user they signed in as: later events under the
# anonymous id are recorded as the user's.
visitor_aliases = sa.Table(
    "visitor_aliases",
    metadata,
    sa.Column("account_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("anonymous_id", sa.Text, primary_key=True),
    sa.Column("user_id", sa.Text, nullable=False),
    sa.Column("merged_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)
