"""Every campaign table carries the account; campaigns from before accounts go to the nil account,
which no key acts for.

Revision ID: 0006
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0006"
down_revision = "0005"
SCHEMA = "campaign"
NO_ACCOUNT = "'00000000-0000-0000-0000-000000000000'::uuid"
CHILDREN = ("runs", "outcome_events", "failure_reasons", "campaign_stats")


def upgrade() -> None:
    op.execute(f"UPDATE {SCHEMA}.campaigns SET account_id = {NO_ACCOUNT} WHERE account_id IS NULL")
    op.alter_column("campaigns", "account_id", nullable=False, schema=SCHEMA)
    for table in CHILDREN:
        op.add_column(
            table,
            sa.Column("account_id", UUID(as_uuid=True), nullable=False, server_default=sa.text(NO_ACCOUNT)),
            schema=SCHEMA,
        )
        op.execute(
            f"""
            UPDATE {SCHEMA}.{table} t SET account_id = c.account_id
            FROM {SCHEMA}.campaigns c WHERE c.id = t.campaign_id
            """
        )
        op.alter_column(table, "account_id", server_default=None, schema=SCHEMA)


def downgrade() -> None:
    for table in CHILDREN:
        op.drop_column(table, "account_id", schema=SCHEMA)
    op.alter_column("campaigns", "account_id", nullable=True, schema=SCHEMA)
