"""Publishable keys' web origins.

Revision ID: 0013
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY

revision = "0013"
down_revision = "0012"
SCHEMA = "campaign"


def upgrade() -> None:
    op.add_column(
        "api_keys",
        sa.Column("allowed_origins", ARRAY(sa.Text), nullable=False, server_default="{}"),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_column("api_keys", "allowed_origins", schema=SCHEMA)
