"""Outbox rows keep the trace context of the work that wrote them.

Revision ID: 0020
"""

from alembic import op

from herald_common.outbox import add_outbox_trace_column

revision = "0020"
down_revision = "0019"
SCHEMA = "campaign"


def upgrade() -> None:
    add_outbox_trace_column(SCHEMA)


def downgrade() -> None:
    op.drop_column("outbox", "trace_context", schema=SCHEMA)
