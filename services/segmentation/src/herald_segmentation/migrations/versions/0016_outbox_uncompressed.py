"""Outbox payloads are stored without compression: each is read once and deleted within seconds.

Revision ID: 0016
"""

from herald_common.outbox import store_outbox_payloads

revision = "0016"
down_revision = "0015"
SCHEMA = "segmentation"


def upgrade() -> None:
    store_outbox_payloads(SCHEMA, compressed=False)


def downgrade() -> None:
    store_outbox_payloads(SCHEMA, compressed=True)
