"""Tables of the `segmentation` schema."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, UUID

from herald_common.outbox import outbox_table

SCHEMA = "segmentation"
metadata = sa.MetaData(schema=SCHEMA)

users = sa.Table(
    "users",
    metadata,
    sa.Column("account_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("user_id", sa.Text, primary_key=True),
    sa.Column("properties", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("timezone", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Index("users_properties_gin", "properties", postgresql_using="gin"),
)

segments = sa.Table(
    "segments",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("display_name", sa.Text, nullable=False),
    # The SegmentFilter message, serialized: the API shape is the source of truth.
    sa.Column("filter", sa.LargeBinary, nullable=False),
    sa.Column("request_id", sa.Text, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.UniqueConstraint("account_id", "request_id", name="segments_account_request_id_key"),
    sa.Index("ix_segmentation_segments_account_created", "account_id", "created_at"),
)

outbox = outbox_table(metadata)
