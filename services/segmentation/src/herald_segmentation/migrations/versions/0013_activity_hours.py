"""Users' activity by hour of the day, for Best Time.

Revision ID: 0013
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0013"
down_revision = "0012"
SCHEMA = "segmentation"


def upgrade() -> None:
    op.create_table(
        "activity_hours",
        sa.Column("account_id", UUID(as_uuid=True), primary_key=True),
        sa.Column("user_id", sa.Text, primary_key=True),
        sa.Column("hour", sa.SmallInteger, primary_key=True),
        sa.Column("count", sa.BigInteger, nullable=False),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("activity_hours", schema=SCHEMA)
