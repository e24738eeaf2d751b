"""Events keep their client id: a live campaign's trigger that arrives after events it should
have matched finds them again by it.

Revision ID: 0015
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
SCHEMA = "segmentation"


def upgrade() -> None:
    op.add_column("events", sa.Column("client_event_id", sa.Text, nullable=True), schema=SCHEMA)


def downgrade() -> None:
    op.drop_column("events", "client_event_id", schema=SCHEMA)
