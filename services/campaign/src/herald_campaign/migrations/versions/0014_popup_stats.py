"""What visitors did with web pop-ups, in the campaign stats.

Revision ID: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
SCHEMA = "campaign"
COLUMNS = ("viewed", "clicked", "closed", "expired")


def upgrade() -> None:
    for column in COLUMNS:
        op.add_column(
            "campaign_stats",
            sa.Column(column, sa.BigInteger, nullable=False, server_default="0"),
            schema=SCHEMA,
        )


def downgrade() -> None:
    for column in COLUMNS:
        op.drop_column("campaign_stats", column, schema=SCHEMA)
