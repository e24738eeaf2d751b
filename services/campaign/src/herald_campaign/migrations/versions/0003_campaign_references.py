"""The segment and destination of each campaign in columns, to find the campaigns using either.

Revision ID: 0003
"""

import sqlalchemy as sa
from alembic import op

from herald.campaign.v1 import campaign_service_pb2 as pb

revision = "0003"
down_revision = "0002"
SCHEMA = "campaign"


def upgrade() -> None:
    for column in ("segment", "destination"):
        op.add_column(
            "campaigns", sa.Column(column, sa.Text, nullable=False, server_default=""), schema=SCHEMA
        )
        op.create_index(f"ix_{SCHEMA}_campaigns_{column}", "campaigns", [column], schema=SCHEMA)
    connection = op.get_bind()
    table = sa.table(
        "campaigns",
        sa.column("id"),
        sa.column("spec"),
        sa.column("segment"),
        sa.column("destination"),
        schema=SCHEMA,
    )
    for row in connection.execute(sa.select(table.c.id, table.c.spec)).all():
        spec = pb.Campaign.FromString(row.spec)
        connection.execute(
            table.update()
            .where(table.c.id == row.id)
            .values(segment=spec.audience.segment, destination=spec.destination)
        )


def downgrade() -> None:
    for column in ("segment", "destination"):
        op.drop_index(f"ix_{SCHEMA}_campaigns_{column}", "campaigns", schema=SCHEMA)
        op.drop_column("campaigns", column, schema=SCHEMA)
