"""Costly calls counted per hour, shared by every replica (see herald_common.hourly_quota).

Revision ID: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
SCHEMA = "campaign"


def upgrade() -> None:
    op.create_table(
        "hourly_use",
        sa.Column("subject", sa.Text, primary_key=True),
        sa.Column("hour", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("used", sa.Integer, nullable=False),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("hourly_use", schema=SCHEMA)
