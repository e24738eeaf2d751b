"""A run records the seed its random cap chose users with.

Revision ID: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
SCHEMA = "scheduler"


def upgrade() -> None:
    op.add_column("runs", sa.Column("sample_seed", sa.Text, nullable=False, server_default=""), schema=SCHEMA)


def downgrade() -> None:
    op.drop_column("runs", "sample_seed", schema=SCHEMA)
