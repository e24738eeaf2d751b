"""What is checked just before a provider request: the intent to send each delivery (so a crash
leaves only the deliveries really attempted unknown), halted campaigns and opted-out phones; and
the unknown deliveries waiting to be settled with a provider that can be asked.

Revision ID: 0008
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0008"
down_revision = "0007"
SCHEMA = "dispatch"


def upgrade() -> None:
    op.create_table(
        "delivery_intents",
        sa.Column("delivery_id", sa.Text, primary_key=True),
        sa.Column("account_id", UUID(as_uuid=True), nullable=False),
        sa.Column("destination", sa.Text, nullable=False),
        sa.Column("batch_id", sa.Text, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("campaign", sa.Text, nullable=False),
        sa.Column("intended_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Index("ix_dispatch_delivery_intents_campaign", "campaign"),
        schema=SCHEMA,
    )
    op.create_table(
        "unsettled",
        sa.Column("delivery_id", sa.Text, primary_key=True),
        sa.Column("account_id", UUID(as_uuid=True), nullable=False),
        sa.Column("destination_type", sa.Text, nullable=False),
        sa.Column("batch", sa.LargeBinary, nullable=False),
        sa.Column("recipient", sa.LargeBinary, nullable=False),
        sa.Column("provider_destination", sa.Text, nullable=False),
        sa.Column("phone", sa.Text, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("attempted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("settle_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rounds", sa.Integer, nullable=False, server_default="0"),
        sa.Index("ix_dispatch_unsettled_due", "destination_type", "settle_after"),
        schema=SCHEMA,
    )
    op.create_table(
        "halted_campaigns",
        sa.Column("campaign", sa.Text, primary_key=True),
        sa.Column("account_id", UUID(as_uuid=True), nullable=False),
        sa.Column("halted_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        schema=SCHEMA,
    )
    op.create_table(
        "sms_opt_outs",
        sa.Column("account_id", UUID(as_uuid=True), primary_key=True),
        sa.Column("phone", sa.Text, primary_key=True),
        sa.Column("opted_out_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("sms_opt_outs", schema=SCHEMA)
    op.drop_table("halted_campaigns", schema=SCHEMA)
    op.drop_table("unsettled", schema=SCHEMA)
    op.drop_table("delivery_intents", schema=SCHEMA)
