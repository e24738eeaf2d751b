"""Runs resume from a cursor instead of a row per delivery; versions order changes; outbox problems.

Revision ID: 0002
"""

import sqlalchemy as sa
from alembic import op

from herald_common.outbox import add_outbox_problem_column

revision = "0002"
down_revision = "0001"
SCHEMA = "scheduler"


def upgrade() -> None:
    op.drop_table("deliveries", schema=SCHEMA)
    op.drop_column("campaigns", "changed_at", schema=SCHEMA)
    op.add_column(
        "campaigns", sa.Column("version", sa.BigInteger, nullable=False, server_default="0"), schema=SCHEMA
    )
    op.alter_column("campaigns", "version", server_default=None, schema=SCHEMA)
    op.add_column("runs", sa.Column("lease_owner", sa.Text, nullable=True), schema=SCHEMA)
    op.add_column("runs", sa.Column("cursor", sa.Text, nullable=False, server_default=""), schema=SCHEMA)
    op.add_column(
        "runs", sa.Column("attempts", sa.Integer, nullable=False, server_default="0"), schema=SCHEMA
    )
    op.add_column(
        "runs", sa.Column("version", sa.BigInteger, nullable=False, server_default="1"), schema=SCHEMA
    )
    add_outbox_problem_column(SCHEMA)


def downgrade() -> None:
    raise NotImplementedError("runs planned by cursor cannot be turned back into delivery rows")
