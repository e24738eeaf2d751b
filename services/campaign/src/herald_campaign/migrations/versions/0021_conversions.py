"""Conversions in a table of their own: written once each, where setting them on the exposure
rewrote the exposure and every one of its index entries.

Revision ID: 0021
"""

from alembic import op

revision = "0021"
down_revision = "0020"
SCHEMA = "campaign"


def upgrade() -> None:
    op.execute(
        f"""
        CREATE TABLE {SCHEMA}.conversions (
            campaign_id uuid NOT NULL,
            client_event_id text NOT NULL,
            delivery_id text NOT NULL UNIQUE,
            account_id uuid NOT NULL,
            run text NOT NULL,
            control boolean NOT NULL,
            converted_at timestamptz NOT NULL,
            revenue double precision NOT NULL,
            PRIMARY KEY (campaign_id, client_event_id)
        )
        """
    )
    op.execute(
        f"""
        INSERT INTO {SCHEMA}.conversions
        SELECT campaign_id, conversion_event, delivery_id, account_id, run, control, converted_at, revenue
        FROM {SCHEMA}.exposures WHERE conversion_event IS NOT NULL
        """
    )
    op.execute(f"DROP INDEX {SCHEMA}.ux_campaign_exposures_conversion")
    for column in ("converted_at", "conversion_event", "revenue"):
        op.execute(f"ALTER TABLE {SCHEMA}.exposures DROP COLUMN {column}")


def downgrade() -> None:
    op.execute(
        f"""
        ALTER TABLE {SCHEMA}.exposures ADD COLUMN converted_at timestamptz,
            ADD COLUMN conversion_event text, ADD COLUMN revenue double precision NOT NULL DEFAULT 0
        """
    )
    op.execute(
        f"""
        UPDATE {SCHEMA}.exposures x
        SET converted_at = v.converted_at, conversion_event = v.client_event_id, revenue = v.revenue
        FROM {SCHEMA}.conversions v WHERE v.delivery_id = x.delivery_id
        """
    )
    op.execute(
        f"CREATE UNIQUE INDEX ux_campaign_exposures_conversion ON {SCHEMA}.exposures "
        "(campaign_id, conversion_event) WHERE conversion_event IS NOT NULL"
    )
    op.execute(f"DROP TABLE {SCHEMA}.conversions")
