"""Versions order changes; outcomes counted per event; failure reasons; FAILED campaigns.

Revision ID: 0002
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY, UUID

from herald_common.outbox import add_outbox_problem_column

revision = "0002"
down_revision = "0001"
SCHEMA = "campaign"


def upgrade() -> None:
    op.add_column(
        "campaigns", sa.Column("version", sa.BigInteger, nullable=False, server_default="1"), schema=SCHEMA
    )
    op.add_column(
        "campaigns", sa.Column("failure_reason", sa.Text, nullable=False, server_default=""), schema=SCHEMA
    )
    op.drop_column("runs", "reported_at", schema=SCHEMA)
    op.add_column("runs", sa.Column("error", sa.Text, nullable=False, server_default=""), schema=SCHEMA)
    op.add_column(
        "runs", sa.Column("version", sa.BigInteger, nullable=False, server_default="0"), schema=SCHEMA
    )
    op.alter_column("runs", "version", server_default=None, schema=SCHEMA)
    op.drop_table("delivery_outcomes", schema=SCHEMA)
    op.create_table(
        "outcome_events",
        sa.Column("event_id", sa.Text, primary_key=True),
        sa.Column("campaign_id", UUID(as_uuid=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        schema=SCHEMA,
    )
    op.create_table(
        "failure_reasons",
        sa.Column("campaign_id", UUID(as_uuid=True), primary_key=True),
        sa.Column("reason", sa.Text, primary_key=True),
        sa.Column("count", sa.BigInteger, nullable=False),
        sa.Column("example_user_ids", ARRAY(sa.Text), nullable=False),
        schema=SCHEMA,
    )
    for column in ("skipped", "unknown", "resent"):
        op.add_column(
            "campaign_stats",
            sa.Column(column, sa.BigInteger, nullable=False, server_default="0"),
            schema=SCHEMA,
        )
    op.add_column(
        "campaign_stats",
        sa.Column("waiting_reason", sa.Text, nullable=False, server_default=""),
        schema=SCHEMA,
    )
    op.add_column(
        "campaign_stats",
        sa.Column("waiting_changed_at", sa.DateTime(timezone=True), nullable=True),
        schema=SCHEMA,
    )
    add_outbox_problem_column(SCHEMA)


def downgrade() -> None:
    raise NotImplementedError("outcomes counted per event cannot be split back into deliveries")
