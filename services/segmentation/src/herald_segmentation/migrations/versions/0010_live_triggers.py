"""Live campaigns: their triggers, and an index on each user's events (a live campaign checks
the users who qualify one by one, never by scanning everyone who did an event).

Revision ID: 0010
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0010"
down_revision = "0009"
SCHEMA = "segmentation"


def upgrade() -> None:
    op.create_table(
        "live_triggers",
        sa.Column("campaign", sa.Text, primary_key=True),
        sa.Column("account_id", UUID(as_uuid=True), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("trigger", sa.LargeBinary, nullable=False),
        sa.Column("start_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("end_at", sa.DateTime(timezone=True), nullable=True),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_segmentation_live_triggers_account",
        "live_triggers",
        ["account_id"],
        schema=SCHEMA,
        postgresql_where=sa.text("active"),
    )
    op.execute(
        f"CREATE INDEX ix_segmentation_events_user ON {SCHEMA}.events (account_id, user_id, occurred_at)"
    )


def downgrade() -> None:
    op.execute(f"DROP INDEX {SCHEMA}.ix_segmentation_events_user")
    op.drop_table("live_triggers", schema=SCHEMA)
