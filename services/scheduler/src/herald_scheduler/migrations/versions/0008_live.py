"""Live campaigns: timers, awaited events, trigger occurrences acted on, per-user frequency and
daily counts, and the end of a live run.

Revision ID: 0008
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0008"
down_revision = "0007"
SCHEMA = "scheduler"


def upgrade() -> None:
    op.add_column("runs", sa.Column("ends_at", sa.DateTime(timezone=True), nullable=True), schema=SCHEMA)
    op.create_table(
        "live_timers",
        sa.Column("campaign", sa.Text, primary_key=True),
        sa.Column("occurrence", sa.Text, primary_key=True),
        sa.Column("account_id", UUID(as_uuid=True), nullable=False),
        sa.Column("run_id", UUID(as_uuid=True), nullable=False),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("fire_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event_name", sa.Text, nullable=False),
        sa.Column("event_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("match_value", sa.Text, nullable=False, server_default=""),
        schema=SCHEMA,
    )
    op.create_index("ix_scheduler_live_timers_due", "live_timers", ["fire_at"], schema=SCHEMA)
    op.create_index("ix_scheduler_live_timers_user", "live_timers", ["campaign", "user_id"], schema=SCHEMA)
    op.create_table(
        "live_awaited",
        sa.Column("campaign", sa.Text, primary_key=True),
        sa.Column("user_id", sa.Text, primary_key=True),
        sa.Column("occurrence", sa.Text, primary_key=True),
        sa.Column("account_id", UUID(as_uuid=True), nullable=False),
        sa.Column("match_value", sa.Text, nullable=False),
        sa.Column("event_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        schema=SCHEMA,
    )
    op.create_index("ix_scheduler_live_awaited_expires_at", "live_awaited", ["expires_at"], schema=SCHEMA)
    op.create_table(
        "live_fires",
        sa.Column("campaign", sa.Text, primary_key=True),
        sa.Column("occurrence", sa.Text, primary_key=True),
        sa.Column("account_id", UUID(as_uuid=True), nullable=False),
        sa.Column("run_id", UUID(as_uuid=True), nullable=False),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("fired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event_name", sa.Text, nullable=False),
        sa.Column("event_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("via", sa.Text, nullable=False),
        sa.Column("delivery_id", sa.Text, nullable=True),
        sa.Column("outcome", sa.Text, nullable=False),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_scheduler_live_fires_user", "live_fires", ["campaign", "user_id", "fired_at"], schema=SCHEMA
    )
    op.create_table(
        "live_users",
        sa.Column("campaign", sa.Text, primary_key=True),
        sa.Column("user_id", sa.Text, primary_key=True),
        sa.Column("account_id", UUID(as_uuid=True), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
        schema=SCHEMA,
    )
    op.create_table(
        "live_days",
        sa.Column("run_id", UUID(as_uuid=True), primary_key=True),
        sa.Column("day", sa.Date, primary_key=True),
        sa.Column("account_id", UUID(as_uuid=True), nullable=False),
        sa.Column("used", sa.BigInteger, nullable=False),
        schema=SCHEMA,
    )


def downgrade() -> None:
    for table in ("live_days", "live_users", "live_fires", "live_awaited", "live_timers"):
        op.drop_table(table, schema=SCHEMA)
    op.drop_column("runs", "ends_at", schema=SCHEMA)
