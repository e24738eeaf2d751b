"""Audience snapshots may also hold the qualified users a campaign leaves out (not reachable on
its channel, outside its random cap), flagged, so the campaign can record why each was not sent.

Revision ID: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
SCHEMA = "segmentation"


def upgrade() -> None:
    op.add_column(
        "audience_snapshots",
        sa.Column("left_out", sa.SmallInteger, nullable=False, server_default="0"),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_column("audience_snapshots", "left_out", schema=SCHEMA)
