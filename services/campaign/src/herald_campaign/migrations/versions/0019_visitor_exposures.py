"""Anonymous web visitors' exposures, found when they sign in.

Revision ID: 0019
"""

from alembic import op

revision = "0019"
down_revision = "0018"
SCHEMA = "campaign"


def upgrade() -> None:
    op.execute(
        f"CREATE INDEX ix_campaign_exposures_visitor ON {SCHEMA}.exposures (account_id, user_id) "
        "WHERE user_id LIKE 'anon:%'"
    )


def downgrade() -> None:
    op.execute(f"DROP INDEX {SCHEMA}.ix_campaign_exposures_visitor")
