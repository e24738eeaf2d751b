"""The account of each campaign, from CampaignChanged, so runs are shown only to their owner.

Revision ID: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
SCHEMA = "scheduler"


def upgrade() -> None:
    op.add_column(
        "campaigns", sa.Column("account", sa.Text, nullable=False, server_default=""), schema=SCHEMA
    )


def downgrade() -> None:
    op.drop_column("campaigns", "account", schema=SCHEMA)
