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
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("snapshot", sa.LargeBinary, nullable=False),
    # CampaignChanged.version of the snapshot: an older event arriving late changes nothing.
    sa.Column("version", sa.BigInteger, nullable=False),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("campaign", sa.Text, nullable=False),
    sa.Column("scheduled_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("final", sa.Boolean, nullable=False),
    sa.Column("audience_size", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("targeted", sa.BigInteger, nullable=False, server_default="0"),
    # A RUNNING run whose lease has expired was abandoned by a crashed replica, or waits to retry
    # after a transient failure; whichever replica comes first resumes it.
    sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
    sa.Column("lease_owner", sa.Text, nullable=True),
    # The last user id planned: pages commit with it, so a resumed run plans nobody twice.
    sa.Column("cursor", sa.Text, nullable=False, server_default=""),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    # The seed a random cap chose its users with ('' without one).
    sa.Column("sample_seed", sa.Text, nullable=False, server_default=""),
    # One higher on every change; RunChanged carries it so readers keep the newest report.
    sa.Column("version", sa.BigInteger, nullable=False, server_default="1"),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("error", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.UniqueConstraint("campaign", "scheduled_time", name="runs_campaign_time_key"),
    sa.Index("runs_due", "state", "scheduled_time"),
    sa.Index("ix_scheduler_runs_account_campaign", "account_id", "campaign"),
)

outbox = outbox_table(metadata)
