"""Runs as the campaign service knows them carry their scheduled time, to list them in order.

Revision ID: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
SCHEMA = "campaign"


def upgrade() -> None:
    op.add_column("runs", sa.Column("scheduled_at", sa.DateTime(timezone=True), nullable=True), schema=SCHEMA)


def downgrade() -> None:
    op.drop_column("runs", "scheduled_at", schema=SCHEMA)
