"""Web Exit Intent pop-ups: a delivery puts the pop-up, rendered for its visitor, in the visitor's
pop-up inbox, where the web SDK finds it at their next exit intent (see `herald_dispatch.web`).

The inbox keeps one row per delivery id, so a batch delivered again changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import timedelta

from google.protobuf.message import Message
from sqlalchemy.dialects.postgresql import insert

from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald.events.v1 import events_pb2 as events
from herald_common import api, channels
from herald_common.db import Database
from herald_common.errors import Validator
from herald_common.personalization import PersonalizationError
from herald_common.popups import rendered, variant_for
from herald_dispatch.channels import FAILED, SENT, Outcome, SendContext
from herald_dispatch.storage import web_inbox

KIND = channels.for_config("web_popup")
DEFAULT_EXPIRY = timedelta(days=7)
MIN_EXPIRY = timedelta(hours=1)
MAX_EXPIRY = timedelta(days=30)
# A rendered pop-up larger than this is refused: the SDK fetches every pop-up of a visitor at once.
MAX_POPUP_BYTES = 16 * 1024


def expiry(config: pb.WebPopupConfig) -> timedelta:
    return config.expire_after.ToTimedelta() if config.HasField("expire_after") else DEFAULT_EXPIRY


class WebPopupChannel:
    kind = KIND
    resend_unknown = True  # the inbox holds one row per delivery id

    def __init__(self, database: Database | None) -> None:
        self.database = database

    def validate_config(self, config: Message, field: str, check: Validator) -> list[str]:
        assert isinstance(config, pb.WebPopupConfig)
        if config.HasField("expire_after"):
            check.require(
                MIN_EXPIRY <= config.expire_after.ToTimedelta() <= MAX_EXPIRY,
                f"{field}.expire_after",
                "1 hour to 30 days",
            )
        return []  # nothing is called: visitors' browsers fetch the pop-ups

    def mask(self, config: Message) -> None:
        """A web pop-up destination holds no secret."""

    def requests_per_second(self, destination: pb.Destination) -> int:
        return 100_000  # writes to Herald's own database, batched per delivery batch

    async def check_credentials(self, destination: pb.Destination) -> tuple[bool, str]:
        return True, "web pop-ups need no credentials"

    async def deliver(self, context: SendContext, recipients: Sequence[events.Recipient]) -> list[Outcome]:
        assert self.database is not None, "web pop-ups are delivered by a worker with a database"
        content = context.campaign.web_popup
        now = api.utcnow()
        expires = now + expiry(context.destination.web_popup)
        rows, outcomes = [], []
        for recipient in recipients:
            if recipient.oversized_attributes_bytes:
                reason = f"the profile attributes are {recipient.oversized_attributes_bytes:,} bytes"
                outcomes.append(Outcome(recipient, FAILED, 0, reason))
                continue
            profile = json.loads(recipient.attributes_json or b"{}")
            variant, message = variant_for(content, profile)
            try:
                popup = json.dumps(rendered(message, profile))
            except PersonalizationError as error:
                outcomes.append(Outcome(recipient, FAILED, 0, str(error)))
                continue
            if len(popup) > MAX_POPUP_BYTES:
                reason = f"the rendered pop-up is {len(popup):,} bytes; at most {MAX_POPUP_BYTES:,}"
                outcomes.append(Outcome(recipient, FAILED, 0, reason))
                continue
            rows.append(
                {
                    "delivery_id": recipient.delivery_id,
                    "account_id": context.account_id,
                    "user_id": recipient.user_id,
                    "campaign": context.campaign.name,
                    "popup": popup,
                    "variant": variant,
                    "timezone": recipient.timezone,
                    "delivered_at": now,
                    "expires_at": expires,
                }
            )
            outcomes.append(Outcome(recipient, SENT, 1, resent=recipient.delivery_id in context.resent))
        if rows:
            async with self.database.transaction() as session:
                await session.execute(insert(web_inbox).on_conflict_do_nothing(), rows)
        return outcomes
