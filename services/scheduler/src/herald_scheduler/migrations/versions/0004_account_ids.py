"""Campaigns and runs carry their account's id; rows from before accounts get the nil account.

Revision ID: 0004
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0004"
down_revision = "0003"
SCHEMA = "scheduler"
NO_ACCOUNT = "'00000000-0000-0000-0000-000000000000'::uuid"


def upgrade() -> None:
    op.add_column(
        "campaigns",
        sa.Column("account_id", UUID(as_uuid=True), nullable=False, server_default=sa.text(NO_ACCOUNT)),
        schema=SCHEMA,
    )
    op.execute(
        f"""
        UPDATE {SCHEMA}.campaigns SET account_id = substr(account, 10)::uuid
        WHERE account ~ '^accounts/[0-9a-f-]{{36}}$'
        """
    )
    op.drop_column("campaigns", "account", schema=SCHEMA)
    op.add_column(
        "runs",
        sa.Column("account_id", UUID(as_uuid=True), nullable=False, server_default=sa.text(NO_ACCOUNT)),
        schema=SCHEMA,
    )
    op.execute(
        f"""
        UPDATE {SCHEMA}.runs r SET account_id = c.account_id
        FROM {SCHEMA}.campaigns c WHERE c.name = r.campaign
        """
    )
    for table in ("campaigns", "runs"):
        op.alter_column(table, "account_id", server_default=None, schema=SCHEMA)
    op.create_index("ix_scheduler_runs_account_campaign", "runs", ["account_id", "campaign"], schema=SCHEMA)


def downgrade() -> None:
    op.drop_index("ix_scheduler_runs_account_campaign", "runs", schema=SCHEMA)
    op.drop_column("runs", "account_id", schema=SCHEMA)
    op.add_column(
        "campaigns", sa.Column("account", sa.Text, nullable=False, server_default=""), schema=SCHEMA
    )
    op.execute(f"UPDATE {SCHEMA}.campaigns SET account = 'accounts/' || account_id")
    op.drop_column("campaigns", "account_id", schema=SCHEMA)
