"""Batch attempts, campaign snapshots, shared rate windows, resent deliveries, outbox problems.

Revision ID: 0002
"""

import sqlalchemy as sa
from alembic import op

from herald_common.outbox import add_outbox_problem_column

revision = "0002"
down_revision = "0001"
SCHEMA = "dispatch"


def upgrade() -> None:
    op.add_column(
        "deliveries",
        sa.Column("resent", sa.Boolean, nullable=False, server_default=sa.false()),
        schema=SCHEMA,
    )
    op.create_table(
        "batch_attempts",
        sa.Column("batch_id", sa.Text, primary_key=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        schema=SCHEMA,
    )
    op.create_table(
        "campaigns",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("destination", sa.Text, nullable=False),
        sa.Column("snapshot", sa.LargeBinary, nullable=False),
        schema=SCHEMA,
    )
    op.create_index("ix_dispatch_campaigns_destination", "campaigns", ["destination"], schema=SCHEMA)
    op.create_table(
        "rate_windows",
        sa.Column("destination", sa.Text, primary_key=True),
        sa.Column("second", sa.BigInteger, primary_key=True),
        sa.Column("used", sa.Integer, nullable=False),
        schema=SCHEMA,
    )
    add_outbox_problem_column(SCHEMA)


def downgrade() -> None:
    for table in ("rate_windows", "campaigns", "batch_attempts"):
        op.drop_table(table, schema=SCHEMA)
    op.drop_column("deliveries", "resent", schema=SCHEMA)
    op.drop_column("outbox", "problem", schema=SCHEMA)
