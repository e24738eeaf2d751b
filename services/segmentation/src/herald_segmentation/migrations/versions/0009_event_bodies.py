"""Events whose properties are too large for the covering index's entries (PostgreSQL refuses an
index entry over about 2.7 KB) keep them here; the event row holds the client event id instead.

Revision ID: 0009
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0009"
down_revision = "0008"
SCHEMA = "segmentation"


def upgrade() -> None:
    op.create_table(
        "event_bodies",
        sa.Column("account_id", UUID(as_uuid=True), primary_key=True),
        sa.Column("client_event_id", sa.Text, primary_key=True),
        sa.Column("properties", JSONB, nullable=False),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("event_bodies", schema=SCHEMA)
