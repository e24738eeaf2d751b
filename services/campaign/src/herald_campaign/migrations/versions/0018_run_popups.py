"""What visitors did with each run's pop-ups.

Revision ID: 0018
"""

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
SCHEMA = "campaign"
COLUMNS = ("viewed", "clicked", "closed", "expired")


def upgrade() -> None:
    for column in COLUMNS:
        op.add_column(
            "run_stats", sa.Column(column, sa.BigInteger, nullable=False, server_default="0"), schema=SCHEMA
        )


def downgrade() -> None:
    for column in COLUMNS:
        op.drop_column("run_stats", column, schema=SCHEMA)
