"""Every dispatch table carries the account; a request_id is unique within its account. Rows from
before accounts go to the nil account, which no key acts for.

Revision ID: 0005
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0005"
down_revision = "0004"
SCHEMA = "dispatch"
NO_ACCOUNT = sa.text("'00000000-0000-0000-0000-000000000000'::uuid")
TABLES = ("destinations", "deliveries", "batch_attempts", "campaigns", "rate_windows")


def upgrade() -> None:
    for table in TABLES:
        op.add_column(
            table,
            sa.Column("account_id", UUID(as_uuid=True), nullable=False, server_default=NO_ACCOUNT),
            schema=SCHEMA,
        )
        op.alter_column(table, "account_id", server_default=None, schema=SCHEMA)
    op.drop_constraint("destinations_request_id_key", "destinations", schema=SCHEMA)
    op.create_unique_constraint(
        "destinations_account_request_id_key", "destinations", ["account_id", "request_id"], schema=SCHEMA
    )
    op.create_index(
        "ix_dispatch_destinations_account_created",
        "destinations",
        ["account_id", "created_at"],
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_index("ix_dispatch_destinations_account_created", "destinations", schema=SCHEMA)
    op.drop_constraint("destinations_account_request_id_key", "destinations", schema=SCHEMA)
    op.create_unique_constraint("destinations_request_id_key", "destinations", ["request_id"], schema=SCHEMA)
    for table in TABLES:
        op.drop_column(table, "account_id", schema=SCHEMA)
