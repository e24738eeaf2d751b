"""Destination configs are sealed (AES-GCM) under a key-encryption key named by key_id; rows
written before are sealed by the service when it starts.

Revision ID: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
SCHEMA = "dispatch"


def upgrade() -> None:
    op.add_column("destinations", sa.Column("key_id", sa.Text, nullable=True), schema=SCHEMA)


def downgrade() -> None:
    op.drop_column("destinations", "key_id", schema=SCHEMA)
