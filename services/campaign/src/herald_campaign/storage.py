"""Tables of the `campaign` schema."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import UUID

from herald_common.outbox import outbox_table

SCHEMA = "campaign"
metadata = sa.MetaData(schema=SCHEMA)

campaigns = sa.Table(
    "campaigns",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("state", sa.Text, nullable=False),
    # The Campaign message as the user defined it (output-only fields live in columns).
    sa.Column("spec", sa.LargeBinary, nullable=False),
    sa.Column("request_id", sa.Text, nullable=True, unique=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
)

# What the scheduler reported about each run of a campaign.
runs = sa.Table(
    "runs",
    metadata,
    sa.Column("run", sa.Text, primary_key=True),
    sa.Column("campaign_id", UUID(as_uuid=True), nullable=False, index=True),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("targeted", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("final", sa.Boolean, nullable=False, server_default=sa.false()),
    # When the scheduler reported this state: older reports arriving late are ignored.
    sa.Column("reported_at", sa.DateTime(timezone=True), nullable=False),
)

# One row per delivery outcome received: makes the outcome consumer idempotent.
outcomes = sa.Table(
    "delivery_outcomes",
    metadata,
    sa.Column("delivery_id", sa.Text, primary_key=True),
    sa.Column("campaign_id", UUID(as_uuid=True), nullable=False),
    sa.Column("status", sa.Text, nullable=False),
)

stats = sa.Table(
    "campaign_stats",
    metadata,
    sa.Column("campaign_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("sent", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("failed", sa.BigInteger, nullable=False, server_default="0"),
)

outbox = outbox_table(metadata)
