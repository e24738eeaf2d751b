"""Rate windows hand out permits in blocks: each take records how many it was granted.

Revision ID: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
SCHEMA = "dispatch"


def upgrade() -> None:
    op.add_column(
        "rate_windows",
        sa.Column("granted", sa.Integer, nullable=False, server_default="0"),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_column("rate_windows", "granted", schema=SCHEMA)
