"""Outbox payloads are stored without compression: each is read once and deleted within seconds.

Revision ID: 0010
"""

from alembic import op

from herald_common.outbox import store_outbox_payloads_uncompressed

revision = "0010"
down_revision = "0009"
SCHEMA = "scheduler"


def upgrade() -> None:
    store_outbox_payloads_uncompressed(SCHEMA)


def downgrade() -> None:
    op.execute(f"ALTER TABLE {SCHEMA}.outbox ALTER COLUMN payload SET STORAGE EXTENDED")
