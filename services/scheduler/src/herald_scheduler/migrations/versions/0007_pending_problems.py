"""Pending deliveries that can never be released are quarantined with the reason, out of the due
order, instead of stopping every release behind them.

Revision ID: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
SCHEMA = "scheduler"


def upgrade() -> None:
    op.add_column("pending_deliveries", sa.Column("problem", sa.Text, nullable=True), schema=SCHEMA)
    op.drop_index("ix_scheduler_pending_due", "pending_deliveries", schema=SCHEMA)
    op.create_index(
        "ix_scheduler_pending_due",
        "pending_deliveries",
        ["due_at", "seq"],
        schema=SCHEMA,
        postgresql_where=sa.text("problem IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_scheduler_pending_due", "pending_deliveries", schema=SCHEMA)
    op.create_index("ix_scheduler_pending_due", "pending_deliveries", ["due_at", "seq"], schema=SCHEMA)
    op.drop_column("pending_deliveries", "problem", schema=SCHEMA)
