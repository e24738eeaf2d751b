"""Accounts carry their delivery settings: default time zone, throttle, frequency caps, alert
webhook.

Revision ID: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
SCHEMA = "campaign"


def upgrade() -> None:
    op.add_column(
        "accounts",
        sa.Column("settings", sa.LargeBinary, nullable=False, server_default=sa.text("''::bytea")),
        schema=SCHEMA,
    )
    version = sa.Column("settings_version", sa.BigInteger, nullable=False, server_default="0")
    op.add_column("accounts", version, schema=SCHEMA)


def downgrade() -> None:
    op.drop_column("accounts", "settings_version", schema=SCHEMA)
    op.drop_column("accounts", "settings", schema=SCHEMA)
