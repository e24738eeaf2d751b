"""API key states carry a version from one sequence, so followers keep the newest.

Revision ID: 0011
"""

from alembic import op

revision = "0011"
down_revision = "0010"
SCHEMA = "campaign"


def upgrade() -> None:
    op.execute(f"CREATE SEQUENCE {SCHEMA}.api_key_state_versions")


def downgrade() -> None:
    op.execute(f"DROP SEQUENCE {SCHEMA}.api_key_state_versions")
