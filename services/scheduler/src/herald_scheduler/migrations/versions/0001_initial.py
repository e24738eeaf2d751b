"""Campaign snapshots, runs, planned deliveries and the outbox.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

from herald_common.outbox import create_outbox_table

revision = "0001"
down_revision = None
SCHEMA = "scheduler"


def upgrade() -> None:
    op.create_table(
        "campaigns",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("snapshot", sa.LargeBinary, nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        schema=SCHEMA,
    )
    op.create_table(
        "runs",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column("campaign", sa.Text, nullable=False),
        sa.Column("scheduled_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("final", sa.Boolean, nullable=False),
        sa.Column("audience_size", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("targeted", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text, nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.UniqueConstraint("campaign", "scheduled_time", name="runs_campaign_time_key"),
        schema=SCHEMA,
    )
    op.create_index("runs_due", "runs", ["state", "scheduled_time"], schema=SCHEMA)
    op.create_table(
        "deliveries",
        sa.Column("delivery_id", sa.Text, primary_key=True),
        sa.Column("run_id", UUID(as_uuid=True), nullable=False),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        schema=SCHEMA,
    )
    op.create_index("ix_scheduler_deliveries_run_id", "deliveries", ["run_id"], schema=SCHEMA)
    create_outbox_table(SCHEMA)


def downgrade() -> None:
    for table in ("outbox", "deliveries", "runs", "campaigns"):
        op.drop_table(table, schema=SCHEMA)
