"""Outbox rows keep the trace context of the work that wrote them, and runs that of the change
that planned them.

Revision ID: 0009
"""

import sqlalchemy as sa
from alembic import op

from herald_common.outbox import add_outbox_trace_column

revision = "0009"
down_revision = "0008"
SCHEMA = "scheduler"


def upgrade() -> None:
    add_outbox_trace_column(SCHEMA)
    # Planning a run and releasing its deliveries continue the trace of the change that planned it.
    op.add_column("runs", sa.Column("trace_context", sa.Text, nullable=True), schema=SCHEMA)


def downgrade() -> None:
    op.drop_column("runs", "trace_context", schema=SCHEMA)
    op.drop_column("outbox", "trace_context", schema=SCHEMA)
