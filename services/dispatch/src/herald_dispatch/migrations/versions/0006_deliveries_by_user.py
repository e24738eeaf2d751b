"""A user's deliveries of a campaign are found by index.

Revision ID: 0006
"""

from alembic import op

revision = "0006"
down_revision = "0005"
SCHEMA = "dispatch"


def upgrade() -> None:
    op.create_index(
        "ix_dispatch_deliveries_user", "deliveries", ["account_id", "campaign", "user_id"], schema=SCHEMA
    )


def downgrade() -> None:
    op.drop_index("ix_dispatch_deliveries_user", "deliveries", schema=SCHEMA)
