"""The ledger keeps one index where it kept two: its key leads with the account, campaign and
user (a user's deliveries are found by it) and ends with the delivery id, which names one user of
one campaign, so the key is as unique as the id alone. One index entry less per delivery, and
each batch's entries land side by side rather than at random places in an index of ids.

Revision ID: 0014
"""

from alembic import op

revision = "0014"
down_revision = "0013"
SCHEMA = "dispatch"


def upgrade() -> None:
    op.drop_constraint("deliveries_pkey", "deliveries", schema=SCHEMA)
    op.drop_index("ix_dispatch_deliveries_user", "deliveries", schema=SCHEMA)
    op.create_primary_key(
        "deliveries_pkey", "deliveries", ["account_id", "campaign", "user_id", "delivery_id"], schema=SCHEMA
    )


def downgrade() -> None:
    op.drop_constraint("deliveries_pkey", "deliveries", schema=SCHEMA)
    op.create_primary_key("deliveries_pkey", "deliveries", ["delivery_id"], schema=SCHEMA)
    op.create_index(
        "ix_dispatch_deliveries_user", "deliveries", ["account_id", "campaign", "user_id"], schema=SCHEMA
    )
