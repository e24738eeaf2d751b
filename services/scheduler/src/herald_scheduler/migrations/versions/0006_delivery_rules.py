"""Deliveries wait in PostgreSQL for their due time (users' zones, do-not-disturb hours,
throttles); accounts' settings, throttle windows and frequency counts are kept for the rules.

Revision ID: 0006
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0006"
down_revision = "0005"
SCHEMA = "scheduler"


def upgrade() -> None:
    for column in (
        sa.Column("planned_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("waiting", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("released", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("first_release_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_release_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("max_lateness_seconds", sa.Float, nullable=False, server_default="0"),
    ):
        op.add_column("runs", column, schema=SCHEMA)
    op.execute(f"UPDATE {SCHEMA}.runs SET planned_time = scheduled_time")
    op.create_table(
        "accounts",
        sa.Column("account_id", UUID(as_uuid=True), primary_key=True),
        sa.Column("settings", sa.LargeBinary, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        schema=SCHEMA,
    )
    op.create_table(
        "pending_deliveries",
        sa.Column("run_id", UUID(as_uuid=True), primary_key=True),
        # The group's first delivery id.
        sa.Column("group_id", sa.Text, primary_key=True),
        sa.Column("account_id", UUID(as_uuid=True), nullable=False),
        sa.Column("campaign", sa.Text, nullable=False),
        sa.Column("seq", sa.BigInteger, sa.Identity(), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        # Not handed over by then: skipped, never sent late.
        sa.Column("cutoff_at", sa.DateTime(timezone=True), nullable=True),
        # The users' zone: frequency caps count in their local day and week.
        sa.Column("zone", sa.Text, nullable=False),
        # Held back by the campaign's throttle at least once.
        sa.Column("throttled", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("size", sa.Integer, nullable=False),
        # events.PendingRecipients, serialized.
        sa.Column("recipients", sa.LargeBinary, nullable=False),
        schema=SCHEMA,
    )
    op.create_index("ix_scheduler_pending_due", "pending_deliveries", ["due_at", "seq"], schema=SCHEMA)
    op.create_table(
        "throttle_windows",
        sa.Column("account_id", UUID(as_uuid=True), nullable=False),
        sa.Column("campaign", sa.Text, primary_key=True),
        sa.Column("window_start", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("used", sa.Integer, nullable=False),
        schema=SCHEMA,
    )
    op.create_table(
        "frequency_counts",
        sa.Column("account_id", UUID(as_uuid=True), primary_key=True),
        sa.Column("channel", sa.Text, primary_key=True),
        sa.Column("user_id", sa.Text, primary_key=True),
        sa.Column("period", sa.Text, primary_key=True),
        sa.Column("used", sa.Integer, nullable=False),
        sa.Column("expires_on", sa.Date, nullable=False),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_scheduler_frequency_counts_expires_on", "frequency_counts", ["expires_on"], schema=SCHEMA
    )


def downgrade() -> None:
    op.drop_table("frequency_counts", schema=SCHEMA)
    op.drop_table("throttle_windows", schema=SCHEMA)
    op.drop_table("pending_deliveries", schema=SCHEMA)
    op.drop_table("accounts", schema=SCHEMA)
    for column in (
        "max_lateness_seconds",
        "last_release_at",
        "first_release_at",
        "released",
        "waiting",
        "planned_time",
    ):
        op.drop_column("runs", column, schema=SCHEMA)
