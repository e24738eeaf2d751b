"""Whether a segment is in use is asked of the campaign service; the local copy goes.

Revision ID: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
SCHEMA = "segmentation"


def upgrade() -> None:
    op.drop_table("campaign_audiences", schema=SCHEMA)


def downgrade() -> None:
    op.create_table(
        "campaign_audiences",
        sa.Column("campaign", sa.Text, primary_key=True),
        sa.Column("segment", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_segmentation_campaign_audiences_segment", "campaign_audiences", ["segment"], schema=SCHEMA
    )
