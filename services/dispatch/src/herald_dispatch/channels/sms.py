"""What every SMS provider shares: each recipient's phone and rendered text, then one request per
message, a few at a time."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Sequence

from herald.events.v1 import events_pb2 as events
from herald_common import personalization
from herald_dispatch.channels import FAILED, SKIPPED, Outcome, SendContext

E164 = re.compile(r"^\+[1-9]\d{6,14}$")
# Alphanumeric sender ids: 1 to 11 letters, digits and spaces, at least one letter.
ALPHANUMERIC_SENDER = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9 ]{1,11}$")
# Messages of one batch in flight at once.
CONCURRENT_REQUESTS = 16
# Sends one message (recipient, E.164 phone, text) and returns its outcome.
SendOne = Callable[[events.Recipient, str, str], Awaitable[Outcome]]


def _message(recipient: events.Recipient, body: str) -> tuple[str, str] | Outcome:
    """(phone, text) for a recipient, or the outcome that stops it before any provider is called."""
    profile = json.loads(recipient.attributes_json or b"{}")
    phone = profile.get("phone") if isinstance(profile, dict) else None
    if not isinstance(phone, str) or not E164.match(phone):
        return Outcome(recipient, SKIPPED, 0, "no phone number")
    try:
        text = personalization.render(body, profile)
    except personalization.PersonalizationError as error:
        return Outcome(recipient, FAILED, 0, f"personalization failed: {error}")
    if not text.strip():
        return Outcome(recipient, FAILED, 0, "the rendered message is empty")
    return phone, text


async def send_each(
    context: SendContext, recipients: Sequence[events.Recipient], send: SendOne
) -> list[Outcome]:
    """One outcome per recipient, CONCURRENT_REQUESTS messages in flight at once."""
    limit = asyncio.Semaphore(CONCURRENT_REQUESTS)
    body = context.campaign.sms.body

    async def one(recipient: events.Recipient) -> Outcome:
        prepared = _message(recipient, body)
        if isinstance(prepared, Outcome):
            return prepared
        async with limit:
            return await send(recipient, *prepared)

    return list(await asyncio.gather(*(one(r) for r in recipients)))
