"""Tables of the `dispatch` schema."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import UUID

from herald_common.outbox import outbox_table

SCHEMA = "dispatch"
metadata = sa.MetaData(schema=SCHEMA)

destinations = sa.Table(
    "destinations",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("type", sa.Text, nullable=False),
    # The Destination message with its credentials, serialized and sealed (nonce, ciphertext and
    # tag) under the key-encryption key `key_id`; NULL only for rows not yet sealed at start.
    sa.Column("config", sa.LargeBinary, nullable=False),
    sa.Column("key_id", sa.Text, nullable=True),
    sa.Column("request_id", sa.Text, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.UniqueConstraint("account_id", "request_id", name="destinations_account_request_id_key"),
    sa.Index("ix_dispatch_destinations_account_created", "account_id", "created_at"),
)

# One row per delivery whose result is final: the idempotency record for redelivered jobs. A
# delivery id names one user of one campaign, so the key (account, campaign, user, id) is as unique
# as the id, and also finds a user's deliveries: one index for both.
deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("delivery_id", sa.Text, nullable=False),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("campaign", sa.Text, nullable=False),
    sa.Column("run", sa.Text, nullable=False),
    sa.Column("destination", sa.Text, nullable=False),
    sa.Column("user_id", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
    sa.Column("resent", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("completed_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    # The provider's id of a sent message, and the final status its receipts gave.
    sa.Column("provider_message_id", sa.Text, nullable=True),
    sa.Column("receipt_status", sa.Text, nullable=True),
    sa.PrimaryKeyConstraint("account_id", "campaign", "user_id", "delivery_id", name="deliveries_pkey"),
    sa.Index(
        "ix_dispatch_deliveries_provider_message",
        "account_id",
        "provider_message_id",
        postgresql_where=sa.text("provider_message_id IS NOT NULL"),
    ),
)

# Final delivery receipts by provider message id, first one wins; kept so a receipt that arrives
# before its delivery is recorded is applied when it is.
receipts = sa.Table(
    "receipts",
    metadata,
    sa.Column("destination", sa.Text, primary_key=True),
    sa.Column("provider_message_id", sa.Text, primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("error_code", sa.Text, nullable=False, server_default=""),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

# One row per DeliveryBatch attempted: written before sending, so a batch handed over again after
# a crash is known to have perhaps been sent.
batch_attempts = sa.Table(
    "batch_attempts",
    metadata,
    sa.Column("batch_id", sa.Text, primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

# The newest version of each campaign, from CampaignChanged: its content and whether it still
# wants deliveries.
campaigns = sa.Table(
    "campaigns",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("destination", sa.Text, nullable=False, index=True),
    sa.Column("snapshot", sa.LargeBinary, nullable=False),
)

# Each destination's schedule of request slots, shared by every dispatch replica: the end of the
# slots reserved so far.
rate_schedules = sa.Table(
    "rate_schedules",
    metadata,
    sa.Column("destination", sa.Text, primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("next_slot", sa.DateTime(timezone=True), nullable=False),
)

outbox = outbox_table(metadata)

# Deliveries about to be sent through a provider that cannot de-duplicate, written just before
# their request and removed with their result: one left behind by a crash may have been sent.
delivery_intents = sa.Table(
    "delivery_intents",
    metadata,
    sa.Column("delivery_id", sa.Text, primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    # The provider's destination the request goes to (a member, for a provider group).
    sa.Column("destination", sa.Text, nullable=False),
    # The attempt at a batch that claimed it: no other attempt may send it.
    sa.Column("batch_id", sa.Text, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("campaign", sa.Text, nullable=False),
    sa.Column("intended_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Index("ix_dispatch_delivery_intents_campaign", "campaign"),
)

# Deliveries whose provider request may have been sent, waiting to be looked up with a provider
# that can tell (Twilio lists its messages): found, they are sent; not found, sent once now.
unsettled = sa.Table(
    "unsettled",
    metadata,
    sa.Column("delivery_id", sa.Text, primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    # The worker type that settles it (the campaign's destination's), and its batch without
    # recipients, so the delivery is recorded, or sent, as its batch would have been.
    sa.Column("destination_type", sa.Text, nullable=False),
    sa.Column("batch", sa.LargeBinary, nullable=False),
    sa.Column("recipient", sa.LargeBinary, nullable=False),
    # Where the request went, and what: the provider is asked for a message to that phone with
    # that text made since `attempted_at`.
    sa.Column("provider_destination", sa.Text, nullable=False),
    sa.Column("phone", sa.Text, nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("attempted_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("settle_after", sa.DateTime(timezone=True), nullable=False),
    sa.Column("rounds", sa.Integer, nullable=False, server_default="0"),
    sa.Index("ix_dispatch_unsettled_due", "destination_type", "settle_after"),
)

# Campaigns whose deliveries stop at once on every replica (StopCampaign).
halted_campaigns = sa.Table(
    "halted_campaigns",
    metadata,
    sa.Column("campaign", sa.Text, primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("halted_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

# Phones that replied STOP to one of the account's numbers: never texted by it again until they
# reply START.
sms_opt_outs = sa.Table(
    "sms_opt_outs",
    metadata,
    sa.Column("account_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("phone", sa.Text, primary_key=True),
    sa.Column("opted_out_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

# Web pop-ups delivered and waiting for their visitor's exit intent: the visitor's pop-up inbox.
web_inbox = sa.Table(
    "web_inbox",
    metadata,
    sa.Column("delivery_id", sa.Text, primary_key=True),
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("user_id", sa.Text, nullable=False),
    sa.Column("campaign", sa.Text, nullable=False),
    # `campaigns/{campaign}/runs/{run}`: what visitors do with the pop-up counts in its run's stats.
    sa.Column("run", sa.Text, nullable=False, server_default=""),
    # The pop-up as the web SDK takes it (its texts rendered for the visitor).
    sa.Column("popup", sa.Text, nullable=False),
    sa.Column("variant", sa.Text, nullable=False, server_default=""),
    sa.Column("timezone", sa.Text, nullable=False, server_default=""),
    sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_dispatch_web_inbox_visitor", "account_id", "user_id", "expires_at"),
    sa.Index("ix_dispatch_web_inbox_expires", "expires_at"),
)

# What visitors did with pop-ups: each kind once per delivery.
web_interactions = sa.Table(
    "web_interactions",
    metadata,
    sa.Column("delivery_id", sa.Text, primary_key=True),
    sa.Column("kind", sa.Text, primary_key=True),  # viewed, clicked, closed, expired
    sa.Column("account_id", UUID(as_uuid=True), nullable=False),
    sa.Column("user_id", sa.Text, nullable=False),
    sa.Column("campaign", sa.Text, nullable=False),
    sa.Column("run", sa.Text, nullable=False, server_default=""),
    sa.Column("session_id", sa.Text, nullable=False, server_default=""),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_dispatch_web_interactions_visitor", "account_id", "user_id", "campaign", "at"),
)
