"""Costly calls counted per hour, shared by every replica (see herald_common.hourly_quota).

Revision ID: 0008
"""

from alembic import op

from herald_common.hourly_quota import create_hourly_use_table

revision = "0008"
down_revision = "0007"
SCHEMA = "segmentation"


def upgrade() -> None:
    create_hourly_use_table(SCHEMA)


def downgrade() -> None:
    op.drop_table("hourly_use", schema=SCHEMA)
