"""What every SMS provider shares: each recipient's phone and rendered text, one request per
message a few at a time, and what to do with the answer (sent, throttled, failed, fail over)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlencode

import aiohttp

from herald.events.v1 import events_pb2 as events
from herald_common import personalization
from herald_common.sms import E164
from herald_dispatch.channels import FAILED, SENT, SKIPPED, UNKNOWN, Channel, Outcome, SendContext
from herald_dispatch.retry import backoff_seconds, retry_after_seconds

# Alphanumeric sender ids: 1 to 11 letters, digits and spaces, at least one letter.
ALPHANUMERIC_SENDER = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9 ]{1,11}$")
# Messages of one batch in flight at once.
CONCURRENT_REQUESTS = 16
# Sends one message (recipient, E.164 phone, text) and returns its outcome.
SendOne = Callable[[events.Recipient, str, str], Awaitable[Outcome]]


class SmsChannel(Channel, Protocol):
    """An SMS provider (or a group of them): sends one rendered message to one number."""

    async def send_one(
        self, context: SendContext, recipient: events.Recipient, phone: str, text: str
    ) -> Outcome: ...


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
    """One outcome per recipient (in their order), CONCURRENT_REQUESTS messages in flight at once:
    that many senders take the next recipient in turn (not a task per recipient)."""
    body = context.campaign.sms.body
    outcomes: list[Outcome | None] = [None] * len(recipients)
    turns = iter(enumerate(recipients))

    async def sender() -> None:
        for i, recipient in turns:
            prepared = _message(recipient, body)
            outcomes[i] = prepared if isinstance(prepared, Outcome) else await send(recipient, *prepared)

    await asyncio.gather(*(sender() for _ in range(min(CONCURRENT_REQUESTS, len(recipients)))))
    return [o for o in outcomes if o is not None]


@dataclass(frozen=True)
class Verdict:
    """What a provider's answer to one message means."""

    sent: bool = False
    message_id: str = ""  # the provider's id of the message it accepted
    throttled: bool = False  # not processed: wait and send again
    reason: str = ""  # why it failed
    failover: bool = False  # another provider could take it


THROTTLED = Verdict(throttled=True)
Judge = Callable[[int, str], Verdict]


def accepted(message_id: object) -> Verdict:
    return Verdict(sent=True, message_id=str(message_id or ""))


def json_object(text: str) -> dict[str, Any]:
    """A provider's JSON answer as a dict ({} when it is not one)."""
    try:
        body = json.loads(text)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=15.0)
# A throttled message waits this long in all before it fails (and may fail over).
MAX_THROTTLED_SECONDS = 3600.0


async def post_message(
    http: aiohttp.ClientSession,
    context: SendContext,
    recipient: events.Recipient,
    *,
    provider: str,
    url: str,
    form: dict[str, str] | None = None,
    json_body: object = None,
    headers: dict[str, str],
    judge: Judge,
    max_throttled_seconds: float = MAX_THROTTLED_SECONDS,
) -> Outcome:
    """Posts one message until the provider answers for good. Providers cannot de-duplicate, so a
    request whose answer was lost is not sent again: it is UNKNOWN (and may fail over)."""
    # Encoded once, for every attempt: a form, or JSON.
    if form is not None:
        body = urlencode(form).encode()
        headers = {**headers, "Content-Type": "application/x-www-form-urlencoded"}
    else:
        body = json.dumps(json_body, separators=(",", ":"), ensure_ascii=False).encode()
        headers = {**headers, "Content-Type": "application/json"}
    started = time.monotonic()
    attempts = 0
    while True:
        if not await context.wanted():
            return Outcome(recipient, SKIPPED, attempts, "campaign stopped")
        await context.permit()
        attempts += 1
        try:
            async with http.post(url, data=body, headers=headers, timeout=REQUEST_TIMEOUT) as response:
                status = response.status
                answer = await response.text()
                retry_after = retry_after_seconds(response.headers.get("Retry-After"))
        except (TimeoutError, aiohttp.ClientError) as error:
            reason = f"no answer from {provider} ({type(error).__name__}); it may have been sent"
            return Outcome(recipient, UNKNOWN, attempts, reason, failover=True)
        verdict = judge(status, answer)
        if verdict.sent:
            await context.waiting(None)
            return Outcome(recipient, SENT, attempts, provider_message_id=verdict.message_id)
        if not verdict.throttled:
            return Outcome(recipient, FAILED, attempts, verdict.reason, failover=verdict.failover)
        if time.monotonic() - started > max_throttled_seconds:
            reason = f"{provider} throttled it for {max_throttled_seconds:,.0f} s"
            return Outcome(recipient, FAILED, attempts, reason, failover=True)
        await context.waiting(f"{provider} is throttling; slowing down")
        await asyncio.sleep(retry_after if retry_after is not None else backoff_seconds(attempts + 1))


async def check_with(
    http: aiohttp.ClientSession,
    provider: str,
    url: str,
    headers: dict[str, str],
    describe: Callable[[str], str],
) -> tuple[bool, str]:
    """GETs a provider's account resource: 200 means the credentials work (`describe` words the
    answer); anything else, or no answer, means they do not, or cannot be told."""
    try:
        async with http.get(url, headers=headers, timeout=REQUEST_TIMEOUT) as response:
            status, text = response.status, await response.text()
    except (TimeoutError, aiohttp.ClientError) as error:
        return False, f"{provider} could not be reached ({type(error).__name__})"
    if status == 200:
        return True, describe(text)
    if status in (401, 403):
        return False, f"{provider} refused the credentials (HTTP {status})"
    return False, f"{provider} answered HTTP {status}"


class SmsProvider:
    """What the providers share: a batch is each recipient's message sent through `send_one`."""

    def __init__(
        self, http: aiohttp.ClientSession, *, max_throttled_seconds: float = MAX_THROTTLED_SECONDS
    ) -> None:
        self.http = http
        self.max_throttled_seconds = max_throttled_seconds

    async def send_one(
        self, context: SendContext, recipient: events.Recipient, phone: str, text: str
    ) -> Outcome:
        raise NotImplementedError

    async def deliver(self, context: SendContext, recipients: Sequence[events.Recipient]) -> list[Outcome]:
        return await send_each(
            context, recipients, lambda r, phone, text: self.send_one(context, r, phone, text)
        )
