"""Tables of the `dispatch` schema."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import UUID

from herald_common.outbox import outbox_table

SCHEMA = "dispatch"
metadata = sa.MetaData(schema=SCHEMA)

destinations = sa.Table(
    "destinations",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("type", sa.Text, nullable=False),
    # The Destination message with its credentials, serialized.
    sa.Column("config", sa.LargeBinary, nullable=False),
    sa.Column("request_id", sa.Text, nullable=True, unique=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

# One row per delivery whose result is final: the idempotency record for redelivered jobs.
deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("delivery_id", sa.Text, primary_key=True),
    sa.Column("campaign", sa.Text, nullable=False),
    sa.Column("run", sa.Text, nullable=False),
    sa.Column("destination", sa.Text, nullable=False),
    sa.Column("user_id", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
    sa.Column("completed_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

outbox = outbox_table(metadata)
