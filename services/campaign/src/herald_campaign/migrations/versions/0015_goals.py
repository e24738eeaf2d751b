"""Goals: who was sent (or held back from) each message, who converted, and the counts.

Revision ID: 0015
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0015"
down_revision = "0014"
SCHEMA = "campaign"
COUNTS = ("goal_sent", "goal_converted", "goal_control", "goal_control_converted")
SUMS = ("goal_revenue", "goal_control_revenue")


def upgrade() -> None:
    op.create_table(
        "exposures",
        sa.Column("delivery_id", sa.Text, primary_key=True),
        sa.Column("account_id", UUID(as_uuid=True), nullable=False),
        sa.Column("campaign_id", UUID(as_uuid=True), nullable=False),
        sa.Column("run", sa.Text, nullable=False),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("control", sa.Boolean, nullable=False),
        sa.Column("exposed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("converted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("conversion_event", sa.Text, nullable=True),
        sa.Column("revenue", sa.Float, nullable=False, server_default="0"),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_campaign_exposures_user", "exposures", ["campaign_id", "user_id", "exposed_at"], schema=SCHEMA
    )
    op.create_index(
        "ux_campaign_exposures_conversion",
        "exposures",
        ["campaign_id", "conversion_event"],
        unique=True,
        schema=SCHEMA,
        postgresql_where=sa.text("conversion_event IS NOT NULL"),
    )
    op.create_table(
        "waiting_goal_events",
        sa.Column("campaign_id", UUID(as_uuid=True), primary_key=True),
        sa.Column("client_event_id", sa.Text, primary_key=True),
        sa.Column("account_id", UUID(as_uuid=True), nullable=False),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("event_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revenue", sa.Float, nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_campaign_waiting_goal_events_user",
        "waiting_goal_events",
        ["campaign_id", "user_id"],
        schema=SCHEMA,
    )
    op.create_index(
        "ix_campaign_waiting_goal_events_expiry", "waiting_goal_events", ["expires_at"], schema=SCHEMA
    )
    for column in COUNTS:
        op.add_column(
            "campaign_stats",
            sa.Column(column, sa.BigInteger, nullable=False, server_default="0"),
            schema=SCHEMA,
        )
    for column in SUMS:
        op.add_column(
            "campaign_stats", sa.Column(column, sa.Float, nullable=False, server_default="0"), schema=SCHEMA
        )


def downgrade() -> None:
    for column in COUNTS + SUMS:
        op.drop_column("campaign_stats", column, schema=SCHEMA)
    op.drop_table("waiting_goal_events", schema=SCHEMA)
    op.drop_table("exposures", schema=SCHEMA)
