"""Users and segments belong to an account; a user id and a request_id are unique within it.

Rows from before accounts go to the nil account, which no key acts for.

Revision ID: 0004
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0004"
down_revision = "0003"
SCHEMA = "segmentation"
NO_ACCOUNT = sa.text("'00000000-0000-0000-0000-000000000000'::uuid")


def upgrade() -> None:
    for table in ("users", "segments"):
        op.add_column(
            table,
            sa.Column("account_id", UUID(as_uuid=True), nullable=False, server_default=NO_ACCOUNT),
            schema=SCHEMA,
        )
        op.alter_column(table, "account_id", server_default=None, schema=SCHEMA)
    op.drop_constraint("users_pkey", "users", schema=SCHEMA)
    op.create_primary_key("users_pkey", "users", ["account_id", "user_id"], schema=SCHEMA)
    op.drop_constraint("segments_request_id_key", "segments", schema=SCHEMA)
    op.create_unique_constraint(
        "segments_account_request_id_key", "segments", ["account_id", "request_id"], schema=SCHEMA
    )
    op.create_index(
        "ix_segmentation_segments_account_created", "segments", ["account_id", "created_at"], schema=SCHEMA
    )


def downgrade() -> None:
    op.drop_index("ix_segmentation_segments_account_created", "segments", schema=SCHEMA)
    op.drop_constraint("segments_account_request_id_key", "segments", schema=SCHEMA)
    op.create_unique_constraint("segments_request_id_key", "segments", ["request_id"], schema=SCHEMA)
    op.drop_constraint("users_pkey", "users", schema=SCHEMA)
    op.create_primary_key("users_pkey", "users", ["user_id"], schema=SCHEMA)
    for table in ("users", "segments"):
        op.drop_column(table, "account_id", schema=SCHEMA)
