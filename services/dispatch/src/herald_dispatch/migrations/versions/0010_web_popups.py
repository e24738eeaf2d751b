"""Web pop-ups: the visitors' pop-up inboxes and what they did with them.

Revision ID: 0010
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0010"
down_revision = "0009"
SCHEMA = "dispatch"


def upgrade() -> None:
    op.create_table(
        "web_inbox",
        sa.Column("delivery_id", sa.Text, primary_key=True),
        sa.Column("account_id", UUID(as_uuid=True), nullable=False),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("campaign", sa.Text, nullable=False),
        sa.Column("popup", sa.Text, nullable=False),
        sa.Column("variant", sa.Text, nullable=False, server_default=""),
        sa.Column("timezone", sa.Text, nullable=False, server_default=""),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_dispatch_web_inbox_visitor", "web_inbox", ["account_id", "user_id", "expires_at"], schema=SCHEMA
    )
    op.create_index("ix_dispatch_web_inbox_expires", "web_inbox", ["expires_at"], schema=SCHEMA)
    op.create_table(
        "web_interactions",
        sa.Column("delivery_id", sa.Text, primary_key=True),
        sa.Column("kind", sa.Text, primary_key=True),
        sa.Column("account_id", UUID(as_uuid=True), nullable=False),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("campaign", sa.Text, nullable=False),
        sa.Column("session_id", sa.Text, nullable=False, server_default=""),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_dispatch_web_interactions_visitor",
        "web_interactions",
        ["account_id", "user_id", "campaign", "at"],
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("web_interactions", schema=SCHEMA)
    op.drop_table("web_inbox", schema=SCHEMA)
