"""What is checked just before a provider request: the intent to send each delivery (so a crash
leaves only the deliveries really attempted unknown), halted campaigns and opted-out phones.

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
        sa.Column("intended_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
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
    op.drop_table("delivery_intents", schema=SCHEMA)
