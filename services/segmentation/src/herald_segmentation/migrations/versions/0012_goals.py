"""Campaign goals whose events are matched as they are recorded.

Revision ID: 0012
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0012"
down_revision = "0011"
SCHEMA = "segmentation"


def upgrade() -> None:
    op.create_table(
        "goals",
        sa.Column("campaign", sa.Text, primary_key=True),
        sa.Column("account_id", UUID(as_uuid=True), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("goal", sa.LargeBinary, nullable=False),
        sa.Column("start_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("end_at", sa.DateTime(timezone=True), nullable=True),
        schema=SCHEMA,
    )
    op.create_index("ix_segmentation_goals_account", "goals", ["account_id"], schema=SCHEMA)


def downgrade() -> None:
    op.drop_table("goals", schema=SCHEMA)
