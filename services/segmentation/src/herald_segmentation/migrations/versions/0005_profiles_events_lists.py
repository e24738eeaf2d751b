"""Typed profiles with devices, events partitioned by month, custom lists, and audience snapshots.

Revision ID: 0005
"""

import sqlalchemy as sa
from alembic import op
from google.protobuf.unknown_fields import UnknownFieldSet
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

from herald.segmentation.v1 import segmentation_service_pb2 as pb

revision = "0005"
down_revision = "0004"
SCHEMA = "segmentation"


def _tree(blob: bytes) -> bytes | None:
    """A filter saved as `match` + `conditions` (fields 1 and 2), as all_of / any_of."""
    saved = pb.SegmentFilter.FromString(blob)
    match_any, conditions = False, []
    for field in UnknownFieldSet(saved):  # type: ignore[attr-defined]
        if field.field_number == 1:
            match_any = field.data == 2  # MATCH_ANY
        elif field.field_number == 2:
            conditions.append(pb.Condition(property=pb.PropertyCondition.FromString(field.data)))
    if not conditions:
        return None
    tree = pb.SegmentFilter()
    (tree.any_of if match_any else tree.all_of).extend(conditions)
    return tree.SerializeToString()


def _convert_saved_filters() -> None:
    connection = op.get_bind()
    for row in connection.execute(sa.text(f"SELECT id, filter FROM {SCHEMA}.segments")).all():
        tree = _tree(row.filter)
        if tree is not None:
            connection.execute(
                sa.text(f"UPDATE {SCHEMA}.segments SET filter = :tree WHERE id = :id"),
                {"tree": tree, "id": row.id},
            )


def upgrade() -> None:
    _convert_saved_filters()
    for column in (
        sa.Column("email", sa.Text, nullable=False, server_default=""),
        sa.Column("phone", sa.Text, nullable=False, server_default=""),
        sa.Column("identities", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("gender", sa.Text, nullable=False, server_default=""),
        sa.Column("date_of_birth", sa.Date, nullable=True),
        sa.Column("country", sa.Text, nullable=False, server_default=""),
        sa.Column("region", sa.Text, nullable=False, server_default=""),
        sa.Column("city", sa.Text, nullable=False, server_default=""),
        sa.Column("latitude", sa.Float, nullable=True),
        sa.Column("longitude", sa.Float, nullable=True),
        sa.Column("email_unsubscribed", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("sms_unsubscribed", sa.Boolean, nullable=False, server_default=sa.false()),
    ):
        op.add_column("users", column, schema=SCHEMA)
    op.create_index(
        "ix_segmentation_users_email", "users", ["account_id", sa.text("lower(email)")], schema=SCHEMA
    )
    op.create_index("ix_segmentation_users_phone", "users", ["account_id", "phone"], schema=SCHEMA)
    op.create_index("ix_segmentation_users_city", "users", ["account_id", "city"], schema=SCHEMA)
    op.create_index("ix_segmentation_users_latitude", "users", ["account_id", "latitude"], schema=SCHEMA)
    op.add_column(
        "segments",
        sa.Column("uses", ARRAY(sa.Text), nullable=False, server_default=sa.text("'{}'::text[]")),
        schema=SCHEMA,
    )
    op.create_table(
        "devices",
        sa.Column("account_id", UUID(as_uuid=True), primary_key=True),
        sa.Column("user_id", sa.Text, primary_key=True),
        sa.Column("device_id", sa.Text, primary_key=True),
        sa.Column("platform", sa.Text, nullable=False),
        sa.Column("app_version", sa.Text, nullable=False),
        sa.Column("make", sa.Text, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("os_version", sa.Text, nullable=False),
        sa.Column("sdk_version", sa.Text, nullable=False),
        sa.Column("push_token", sa.Text, nullable=False),
        sa.Column("push_token_type", sa.Text, nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True),
        schema=SCHEMA,
    )
    op.create_table(
        "property_types",
        sa.Column("account_id", UUID(as_uuid=True), primary_key=True),
        sa.Column("subject", sa.Text, primary_key=True),
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("type", sa.Text, nullable=False),
        schema=SCHEMA,
    )
    # Partitioned by month so a window reads only its months; partitions are made as events arrive.
    op.execute(
        f"""
        CREATE TABLE {SCHEMA}.events (
            account_id uuid NOT NULL,
            user_id text NOT NULL,
            name text NOT NULL,
            occurred_at timestamptz NOT NULL,
            properties jsonb NOT NULL DEFAULT '{{}}'::jsonb,
            received_at timestamptz NOT NULL DEFAULT now()
        ) PARTITION BY RANGE (occurred_at)
        """
    )
    op.execute(
        f"CREATE INDEX ix_segmentation_events_name ON {SCHEMA}.events (account_id, name, occurred_at) "
        "INCLUDE (user_id)"
    )
    op.execute(
        f"CREATE INDEX ix_segmentation_events_user ON {SCHEMA}.events (account_id, user_id, occurred_at)"
    )
    op.create_table(
        "event_receipts",
        sa.Column("account_id", UUID(as_uuid=True), primary_key=True),
        sa.Column("client_event_id", sa.Text, primary_key=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        schema=SCHEMA,
    )
    op.create_table(
        "lists",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column("account_id", UUID(as_uuid=True), nullable=False),
        sa.Column("display_name", sa.Text, nullable=False),
        sa.Column("identity_kind", sa.Text, nullable=False),
        sa.Column("row_count", sa.BigInteger, nullable=False),
        sa.Column("matched_count", sa.BigInteger, nullable=False),
        sa.Column("unmatched_count", sa.BigInteger, nullable=False),
        sa.Column("rejected_count", sa.BigInteger, nullable=False),
        sa.Column("rejected_rows", JSONB, nullable=False),
        sa.Column("request_id", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.UniqueConstraint("account_id", "request_id", name="lists_account_request_id_key"),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_segmentation_lists_account_created", "lists", ["account_id", "created_at"], schema=SCHEMA
    )
    op.create_table(
        "list_members",
        sa.Column("account_id", UUID(as_uuid=True), primary_key=True),
        sa.Column("list_id", UUID(as_uuid=True), primary_key=True),
        sa.Column("user_id", sa.Text, primary_key=True),
        schema=SCHEMA,
    )
    # The members of an audience being streamed, fixed when the stream starts.
    op.execute(
        f"""
        CREATE UNLOGGED TABLE {SCHEMA}.audience_snapshots (
            snapshot_id uuid NOT NULL,
            account_id uuid NOT NULL,
            user_id text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (snapshot_id, user_id)
        )
        """
    )


def downgrade() -> None:
    for table in (
        "audience_snapshots",
        "list_members",
        "lists",
        "event_receipts",
        "events",
        "property_types",
        "devices",
    ):
        op.drop_table(table, schema=SCHEMA)
    op.drop_column("segments", "uses", schema=SCHEMA)
    for index in ("email", "phone", "city", "latitude"):
        op.drop_index(f"ix_segmentation_users_{index}", "users", schema=SCHEMA)
    for column in (
        "email",
        "phone",
        "identities",
        "gender",
        "date_of_birth",
        "country",
        "region",
        "city",
        "latitude",
        "longitude",
        "email_unsubscribed",
        "sms_unsubscribed",
    ):
        op.drop_column("users", column, schema=SCHEMA)
