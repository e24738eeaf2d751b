"""Segments used by campaigns; outbox problems.

Revision ID: 0002
"""

import sqlalchemy as sa
from alembic import op

from herald_common.outbox import add_outbox_problem_column

revision = "0002"
down_revision = "0001"
SCHEMA = "segmentation"


def upgrade() -> None:
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
    add_outbox_problem_column(SCHEMA)


def downgrade() -> None:
    op.drop_table("campaign_audiences", schema=SCHEMA)
    op.drop_column("outbox", "problem", schema=SCHEMA)
