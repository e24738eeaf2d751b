"""Web Exit Intent pop-ups: a delivery puts the pop-up, rendered for its visitor, in the visitor's
pop-up inbox, where the web SDK finds it at their next exit intent (see `herald_dispatch.web`).

The inbox keeps one row per delivery id, so a batch delivered again changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from google.protobuf.message import Message
from sqlalchemy.dialects.postgresql import insert

from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald.events.v1 import events_pb2 as events
from herald_common import api, channels
from herald_common.channels import popup_templates
from herald_common.db import Database
from herald_common.errors import Validator
from herald_common.popups import rendered, variant_for
from herald_dispatch.channels import SENT, Outcome, SendContext
from herald_dispatch.channels.export import encode_each
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
        variants: dict[str, str] = {}  # delivery id -> the variant its visitor got

        def build(recipient: events.Recipient) -> dict[str, Any]:
            profile = json.loads(recipient.attributes_json or b"{}")
            variants[recipient.delivery_id], message = variant_for(content, profile)
            return rendered(message, profile)

        # As exports encode their events: oversized profiles, failing templates and pop-ups past
        # the size limit fail alone, and Liquid renders off the event loop.
        encoded, outcomes = await encode_each(
            recipients,
            build,
            MAX_POPUP_BYTES,
            lambda size: f"the rendered pop-up is {size:,} bytes; at most {MAX_POPUP_BYTES:,}",
            popup_templates(content),
        )
        now = api.utcnow()
        expires = now + expiry(context.destination.web_popup)
        rows = [
            {
                "delivery_id": item.recipient.delivery_id,
                "account_id": context.account_id,
                "user_id": item.recipient.user_id,
                "campaign": context.campaign.name,
                "run": context.run,
                "popup": item.json.decode(),
                "variant": variants[item.recipient.delivery_id],
                "timezone": item.recipient.timezone,
                "delivered_at": now,
                "expires_at": expires,
            }
            for item in encoded
        ]
        if rows:
            async with self.database.transaction() as session:
                await session.execute(insert(web_inbox).on_conflict_do_nothing(), rows)
        sent = [
            Outcome(item.recipient, SENT, 1, resent=item.recipient.delivery_id in context.resent)
            for item in encoded
        ]
        return outcomes + sent
