"""Anonymous web visitors merged into users.

Revision ID: 0011
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0011"
down_revision = "0010"
SCHEMA = "segmentation"


def upgrade() -> None:
    op.create_table(
        "visitor_aliases",
        sa.Column("account_id", UUID(as_uuid=True), primary_key=True),
        sa.Column("anonymous_id", sa.Text, primary_key=True),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("merged_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("visitor_aliases", schema=SCHEMA)
