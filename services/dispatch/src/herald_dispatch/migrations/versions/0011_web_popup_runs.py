"""Each pop-up's run, so what visitors do with it counts in its run's stats.

Revision ID: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
SCHEMA = "dispatch"
TABLES = ("web_inbox", "web_interactions")


def upgrade() -> None:
    for table in TABLES:
        op.add_column(table, sa.Column("run", sa.Text, nullable=False, server_default=""), schema=SCHEMA)


def downgrade() -> None:
    for table in TABLES:
        op.drop_column(table, "run", schema=SCHEMA)
