"""What providers' receipts said of each run's messages.

Revision ID: 0017
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
SCHEMA = "campaign"
COLUMNS = ("delivered", "undelivered", "receipt_failed")


def upgrade() -> None:
    for column in COLUMNS:
        op.add_column(
            "run_stats", sa.Column(column, sa.BigInteger, nullable=False, server_default="0"), schema=SCHEMA
        )


def downgrade() -> None:
    for column in COLUMNS:
        op.drop_column("run_stats", column, schema=SCHEMA)
