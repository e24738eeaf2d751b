"""Providers' delivery receipts: each sent delivery keeps the provider's message id and its final
receipt; receipts that arrive before their delivery is recorded wait in `receipts`.

Revision ID: 0007
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0007"
down_revision = "0006"
SCHEMA = "dispatch"


def upgrade() -> None:
    op.add_column("deliveries", sa.Column("provider_message_id", sa.Text, nullable=True), schema=SCHEMA)
    op.add_column("deliveries", sa.Column("receipt_status", sa.Text, nullable=True), schema=SCHEMA)
    op.create_index(
        "ix_dispatch_deliveries_provider_message",
        "deliveries",
        ["account_id", "provider_message_id"],
        schema=SCHEMA,
        postgresql_where=sa.text("provider_message_id IS NOT NULL"),
    )
    op.create_table(
        "receipts",
        sa.Column("destination", sa.Text, primary_key=True),
        sa.Column("provider_message_id", sa.Text, primary_key=True),
        sa.Column("account_id", UUID(as_uuid=True), nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("error_code", sa.Text, nullable=False, server_default=""),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("receipts", schema=SCHEMA)
    op.drop_index("ix_dispatch_deliveries_provider_message", "deliveries", schema=SCHEMA)
    op.drop_column("deliveries", "receipt_status", schema=SCHEMA)
    op.drop_column("deliveries", "provider_message_id", schema=SCHEMA)
