"""Accounts can be deleted.

Revision ID: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
SCHEMA = "campaign"


def upgrade() -> None:
    op.add_column(
        "accounts", sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True), schema=SCHEMA
    )


def downgrade() -> None:
    op.drop_column("accounts", "deleted_at", schema=SCHEMA)
