"""Outbox payloads are stored without compression: each is read once and deleted within seconds.

Revision ID: 0013
"""

from herald_common.outbox import store_outbox_payloads

revision = "0013"
down_revision = "0012"
SCHEMA = "dispatch"


def upgrade() -> None:
    store_outbox_payloads(SCHEMA, compressed=False)


def downgrade() -> None:
    store_outbox_payloads(SCHEMA, compressed=True)
