"""Campaigns, run reports, outcomes, stats and the outbox.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

from herald_common.outbox import create_outbox_table

revision = "0001"
down_revision = None
SCHEMA = "campaign"


def upgrade() -> None:
    op.create_table(
        "campaigns",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("spec", sa.LargeBinary, nullable=False),
        sa.Column("request_id", sa.Text, nullable=True, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        schema=SCHEMA,
    )
    op.create_table(
        "runs",
        sa.Column("run", sa.Text, primary_key=True),
        sa.Column("campaign_id", UUID(as_uuid=True), nullable=False, index=True),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("targeted", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("final", sa.Boolean, nullable=False, server_default=sa.false()),
        # When the scheduler reported this state: older reports arriving late are ignored.
        sa.Column("reported_at", sa.DateTime(timezone=True), nullable=False),
        schema=SCHEMA,
    )
    op.create_table(
        "delivery_outcomes",
        sa.Column("delivery_id", sa.Text, primary_key=True),
        sa.Column("campaign_id", UUID(as_uuid=True), nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        schema=SCHEMA,
    )
    op.create_table(
        "campaign_stats",
        sa.Column("campaign_id", UUID(as_uuid=True), primary_key=True),
        sa.Column("sent", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("failed", sa.BigInteger, nullable=False, server_default="0"),
        schema=SCHEMA,
    )
    create_outbox_table(SCHEMA)


def downgrade() -> None:
    for table in ("outbox", "campaign_stats", "delivery_outcomes", "runs", "campaigns"):
        op.drop_table(table, schema=SCHEMA)
