"""Tables of the `scheduler` schema."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import UUID

from herald_common.outbox import outbox_table

SCHEMA = "scheduler"
metadata = sa.MetaData(schema=SCHEMA)

# The newest snapshot of each campaign, as announced by CampaignChanged.
campaigns = sa.Table(
    "campaigns",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("snapshot", sa.LargeBinary, nullable=False),
    sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("campaign", sa.Text, nullable=False),
    sa.Column("scheduled_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("final", sa.Boolean, nullable=False),
    sa.Column("audience_size", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("targeted", sa.BigInteger, nullable=False, server_default="0"),
    # A RUNNING run whose lease has expired was abandoned by a crashed replica; another resumes it.
    sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("error", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.UniqueConstraint("campaign", "scheduled_time", name="runs_campaign_time_key"),
    sa.Index("runs_due", "state", "scheduled_time"),
)

# Every delivery a run planned: a resumed run plans only the users it has not planned yet.
deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("delivery_id", sa.Text, primary_key=True),
    sa.Column("run_id", UUID(as_uuid=True), nullable=False, index=True),
    sa.Column("user_id", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

outbox = outbox_table(metadata)
