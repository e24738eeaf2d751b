"""Events: one index, by account, name and time, that also carries each event's user and
properties, so a condition on an event in a window reads only that index's range (an index-only
scan) instead of heap pages scattered across the window.

Revision ID: 0006
"""

from alembic import op

revision = "0006"
down_revision = "0005"
SCHEMA = "segmentation"


def upgrade() -> None:
    op.execute(f"DROP INDEX {SCHEMA}.ix_segmentation_events_user")
    op.execute(f"DROP INDEX {SCHEMA}.ix_segmentation_events_name")
    op.execute(
        f"CREATE INDEX ix_segmentation_events_name ON {SCHEMA}.events (account_id, name, occurred_at) "
        "INCLUDE (user_id, properties)"
    )


def downgrade() -> None:
    op.execute(f"DROP INDEX {SCHEMA}.ix_segmentation_events_name")
    op.execute(
        f"CREATE INDEX ix_segmentation_events_name ON {SCHEMA}.events (account_id, name, occurred_at) "
        "INCLUDE (user_id)"
    )
    op.execute(
        f"CREATE INDEX ix_segmentation_events_user ON {SCHEMA}.events (account_id, user_id, occurred_at)"
    )
