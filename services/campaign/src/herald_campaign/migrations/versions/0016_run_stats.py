"""Each run's counts and reasons, beside the campaign's.

Revision ID: 0016
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY, UUID

revision = "0016"
down_revision = "0015"
SCHEMA = "campaign"
COUNTS = (
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
SUMS = ("goal_revenue", "goal_control_revenue")


def upgrade() -> None:
    op.create_table(
        "run_stats",
        sa.Column("run", sa.Text, primary_key=True),
        sa.Column("campaign_id", UUID(as_uuid=True), nullable=False, index=True),
        sa.Column("account_id", UUID(as_uuid=True), nullable=False),
        *(sa.Column(c, sa.BigInteger, nullable=False, server_default="0") for c in COUNTS),
        *(sa.Column(c, sa.Float, nullable=False, server_default="0") for c in SUMS),
        schema=SCHEMA,
    )
    op.create_table(
        "run_failure_reasons",
        sa.Column("run", sa.Text, primary_key=True),
        sa.Column("reason", sa.Text, primary_key=True),
        sa.Column("account_id", UUID(as_uuid=True), nullable=False),
        sa.Column("count", sa.BigInteger, nullable=False),
        sa.Column("example_user_ids", ARRAY(sa.Text), nullable=False),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("run_failure_reasons", schema=SCHEMA)
    op.drop_table("run_stats", schema=SCHEMA)
