"""Rates as a schedule of slots per destination (no rolling second over the limit), in place of
per-second windows.

Revision ID: 0009
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0009"
down_revision = "0008"
SCHEMA = "dispatch"


def upgrade() -> None:
    op.create_table(
        "rate_schedules",
        sa.Column("destination", sa.Text, primary_key=True),
        sa.Column("account_id", UUID(as_uuid=True), nullable=False),
        sa.Column("next_slot", sa.DateTime(timezone=True), nullable=False),
        schema=SCHEMA,
    )
    op.drop_table("rate_windows", schema=SCHEMA)


def downgrade() -> None:
    op.create_table(
        "rate_windows",
        sa.Column("destination", sa.Text, primary_key=True),
        sa.Column("account_id", UUID(as_uuid=True), nullable=False),
        sa.Column("second", sa.BigInteger, primary_key=True),
        sa.Column("used", sa.Integer, nullable=False),
        sa.Column("granted", sa.Integer, nullable=False, server_default="0"),
        schema=SCHEMA,
    )
    op.drop_table("rate_schedules", schema=SCHEMA)
