"""Costly calls counted per hour, shared by every replica (see herald_common.hourly_quota).

Revision ID: 0012
"""

from alembic import op

from herald_common.hourly_quota import create_hourly_use_table

revision = "0012"
down_revision = "0011"
SCHEMA = "campaign"


def upgrade() -> None:
    create_hourly_use_table(SCHEMA)


def downgrade() -> None:
    op.drop_table("hourly_use", schema=SCHEMA)
