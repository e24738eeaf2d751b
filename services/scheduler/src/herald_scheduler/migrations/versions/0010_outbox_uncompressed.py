"""Outbox payloads are stored without compression: each is read once and deleted within seconds.

Revision ID: 0010
"""

from herald_common.outbox import store_outbox_payloads

revision = "0010"
down_revision = "0009"
SCHEMA = "scheduler"


def upgrade() -> None:
    store_outbox_payloads(SCHEMA, compressed=False)


def downgrade() -> None:
    store_outbox_payloads(SCHEMA, compressed=True)
