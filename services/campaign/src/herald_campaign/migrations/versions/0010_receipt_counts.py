"""Campaign stats count what providers' delivery receipts said of sent messages.

Revision ID: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
SCHEMA = "campaign"
COLUMNS = ("delivered", "undelivered", "receipt_failed")


def upgrade() -> None:
    for name in COLUMNS:
        op.add_column(
            "campaign_stats",
            sa.Column(name, sa.BigInteger, nullable=False, server_default="0"),
            schema=SCHEMA,
        )


def downgrade() -> None:
    for name in COLUMNS:
        op.drop_column("campaign_stats", name, schema=SCHEMA)
