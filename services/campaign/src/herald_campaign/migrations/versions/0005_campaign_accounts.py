"""Campaigns belong to an account; a request_id is unique within its account.

Revision ID: 0005
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0005"
down_revision = "0004"
SCHEMA = "campaign"


def upgrade() -> None:
    op.add_column("campaigns", sa.Column("account_id", UUID(as_uuid=True), nullable=True), schema=SCHEMA)
    op.create_index("ix_campaign_campaigns_account_id", "campaigns", ["account_id"], schema=SCHEMA)
    op.drop_constraint("campaigns_request_id_key", "campaigns", schema=SCHEMA)
    op.create_unique_constraint(
        "campaigns_account_request_id_key", "campaigns", ["account_id", "request_id"], schema=SCHEMA
    )


def downgrade() -> None:
    op.drop_constraint("campaigns_account_request_id_key", "campaigns", schema=SCHEMA)
    op.create_unique_constraint("campaigns_request_id_key", "campaigns", ["request_id"], schema=SCHEMA)
    op.drop_index("ix_campaign_campaigns_account_id", "campaigns", schema=SCHEMA)
    op.drop_column("campaigns", "account_id", schema=SCHEMA)
