"""What the export destinations (Segment, mParticle) share: the readable form of a profile's
system fields, the device whose push token an export carries, and posting one request until the
destination answers for good (429 and 5xx retried, Retry-After honoured without spending the
retry budget, other 4xx final)."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.events.v1 import events_pb2 as events
from herald_common import personalization
from herald_common.logging import get_logger
from herald_dispatch.channels import FAILED, SENT, SKIPPED, UNKNOWN, Outcome, SendContext
from herald_dispatch.retry import backoff_seconds, is_retryable, retry_after_seconds

log = get_logger(__name__)

# How long one request may go on failing or being rate limited before its deliveries fail.
MAX_RETRY_SECONDS = 12 * 3600.0
# After this long failing, the campaign is told the destination is holding deliveries back.
WAITING_AFTER_SECONDS = 5.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=15.0)

_GENDERS = {"GENDER_FEMALE": "female", "GENDER_MALE": "male", "GENDER_OTHER": "other"}
PLATFORMS = {"PLATFORM_ANDROID": "android", "PLATFORM_IOS": "ios", "PLATFORM_WEB": "web"}
TOKEN_TYPES = {"PUSH_TOKEN_TYPE_GCM": "gcm", "PUSH_TOKEN_TYPE_APNS": "apns"}


def readable(key: str, value: Any) -> Any:
    """A profile value as an export carries it: the system fields' enum names in plain words."""
    if key == "gender" and isinstance(value, str):
        return _GENDERS.get(value, value)
    if key == "devices" and isinstance(value, list):
        return [
            {
                **device,
                "platform": PLATFORMS.get(device.get("platform", ""), ""),
                "push_token_type": TOKEN_TYPES.get(device.get("push_token_type", ""), ""),
            }
            for device in value
            if isinstance(device, dict)
        ]
    return value


def push_device(profile: dict[str, Any], selection: campaign_pb.PushTokenSelection) -> dict[str, Any] | None:
    """The user's most recently seen device with a push token of a chosen kind (devices come
    most recent first), in readable form; None when there is none."""
    wanted = {kind for kind, chosen in (("gcm", selection.gcm), ("apns", selection.apns)) if chosen}
    if not wanted:
        return None
    for device in readable("devices", profile.get("devices")) or []:
        if device.get("push_token") and device["push_token_type"] in wanted:
            return dict(device)
    return None


_UNSAFE = re.compile(r"[^A-Za-z0-9 _.:-]")


def code_text(code: object) -> str:
    """A destination's error code for a failure reason: short and sanitized, since response
    bodies are not copied into events."""
    return f" ({_UNSAFE.sub('', str(code))[:40]})"


class PastLimits(Exception):
    """A user's event or batch goes past what the destination takes: that delivery fails with
    the reason, the others go on."""


@dataclass
class Encoded:
    recipient: events.Recipient
    json: bytes


async def encode_each(
    recipients: Sequence[events.Recipient],
    build: Callable[[events.Recipient], dict[str, Any]],
    max_bytes: int,
    too_large: Callable[[int], str],
    templates: Iterable[str] = (),
) -> tuple[list[Encoded], list[Outcome]]:
    """Each recipient's event as compact JSON, and the outcomes of those that cannot go: profile
    attributes too large to carry, a template that fails, a value or a size past the limits.
    Where `templates` take the Liquid engine, the batch is built off the event loop."""
    if any(personalization.needs_engine(template) for template in templates):
        return await asyncio.to_thread(_encode_each, recipients, build, max_bytes, too_large)
    return _encode_each(recipients, build, max_bytes, too_large)


def _encode_each(
    recipients: Sequence[events.Recipient],
    build: Callable[[events.Recipient], dict[str, Any]],
    max_bytes: int,
    too_large: Callable[[int], str],
) -> tuple[list[Encoded], list[Outcome]]:
    encoded: list[Encoded] = []
    failed: list[Outcome] = []
    for recipient in recipients:
        if recipient.oversized_attributes_bytes:
            reason = f"profile attributes are {recipient.oversized_attributes_bytes} bytes; too large"
            failed.append(Outcome(recipient, FAILED, 0, reason))
            continue
        try:
            item = compact_json(build(recipient))
        except personalization.PersonalizationError as error:
            failed.append(Outcome(recipient, FAILED, 0, f"personalization failed: {error}"))
            continue
        except PastLimits as error:
            failed.append(Outcome(recipient, FAILED, 0, str(error)))
            continue
        if len(item) > max_bytes:
            failed.append(Outcome(recipient, FAILED, 0, too_large(len(item))))
        else:
            encoded.append(Encoded(recipient, item))
    return encoded, failed


def compact_json(value: Any) -> bytes:
    """Compact UTF-8 JSON; orjson, an order of magnitude faster per event than the standard
    library, which serves only for the integers past 64 bits orjson refuses."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def packed(items: Sequence[Encoded], max_items: int, max_bytes: int) -> list[list[Encoded]]:
    """Items in order, packed into requests of at most `max_items` and `max_bytes` of JSON."""
    requests: list[list[Encoded]] = []
    current: list[Encoded] = []
    size = 0
    for item in items:
        if current and (size + len(item.json) + 1 > max_bytes or len(current) >= max_items):
            requests.append(current)
            current, size = [], 0
        current.append(item)
        size += len(item.json) + 1
    if current:
        requests.append(current)
    return requests


def outcomes_of(
    context: SendContext,
    request: Sequence[Encoded],
    answered: tuple[events.DeliveryStatus.ValueType, int, str, bool],
) -> list[Outcome]:
    """One outcome per delivery a request carried, from how the destination answered it."""
    status, attempts, reason, sent_twice = answered
    return [
        Outcome(
            item.recipient,
            status,
            attempts,
            reason,
            sent_twice or item.recipient.delivery_id in context.resent,
        )
        for item in request
    ]


@dataclass(frozen=True)
class ExportRequest:
    """One request to an export destination, as each attempt sends it."""

    provider: str  # as reasons name it: "Segment", "mParticle"
    url: str
    # (body, headers) for an attempt, given how many retries came before it.
    prepare: Callable[[int], tuple[bytes, dict[str, str]]]
    # A short, sanitized error code from an error answer's body ('' for none).
    error_code: Callable[[str], str]
    # Rate-limit permits each attempt takes (mParticle counts batches, not requests).
    permits: int = 1


async def post_until_answered(
    http: aiohttp.ClientSession,
    context: SendContext,
    request: ExportRequest,
    max_retry_seconds: float = MAX_RETRY_SECONDS,
) -> tuple[events.DeliveryStatus.ValueType, int, str, bool]:
    """Posts until the destination answers for good: (status, attempts, reason, sent again after
    an attempt that may have arrived). Such a resend is safe only because the destinations
    de-duplicate on the delivery ids the body carries."""
    attempts = 0
    retries = 0
    started = time.monotonic()
    waiting = False
    # A request that timed out or lost its connection after being sent may have arrived.
    maybe_arrived = False

    async def answered(
        status: events.DeliveryStatus.ValueType, reason: str, resent: bool
    ) -> tuple[events.DeliveryStatus.ValueType, int, str, bool]:
        if waiting:  # these deliveries wait on the destination no more
            await context.waiting(None)
        return status, attempts, reason, resent

    while True:
        async with context.request_slots:  # a connection is free before the slots are taken
            send_by = math.inf
            for _ in range(request.permits):
                send_by = await context.permit()
            # Asked after the rate limit's wait, just before the request, so a stop made meanwhile
            # holds.
            wanted = await context.wanted()
            if wanted and time.monotonic() > send_by:  # asking took the slots' time: new ones
                for _ in range(request.permits):
                    await context.permit()
            # A stop this process heard of while asking, or during that second wait.
            wanted = wanted and not context.halted()
            if not wanted:
                if maybe_arrived:
                    return await answered(
                        UNKNOWN, "campaign stopped; an earlier attempt may have arrived", False
                    )
                return await answered(SKIPPED, "campaign stopped", False)
            attempts += 1
            body, headers = request.prepare(retries)
            retry_after: float | None = None
            try:
                async with http.post(
                    request.url, data=body, headers=headers, timeout=REQUEST_TIMEOUT, allow_redirects=False
                ) as answer:
                    status = answer.status
                    text = await answer.text()
                    retry_after = retry_after_seconds(answer.headers.get("Retry-After"))
                if 200 <= status < 300:
                    return await answered(SENT, "", maybe_arrived)
                problem = f"{request.provider} answered {status}{request.error_code(text)}"
                if not is_retryable(status):
                    return await answered(FAILED, problem, maybe_arrived)
            except (aiohttp.ClientError, TimeoutError, OSError) as error:
                problem = f"{request.provider} unreachable: {type(error).__name__}"
                maybe_arrived = maybe_arrived or not isinstance(error, aiohttp.ClientConnectorError)
        elapsed = time.monotonic() - started
        if elapsed > max_retry_seconds:
            reason = f"gave up after {elapsed / 3600:.1f} h of failures; {problem}"
            return await answered(FAILED, reason, maybe_arrived)
        if retry_after:
            wait = retry_after  # a rate limit with a deadline: it does not spend the retry budget
        else:
            retries += 1
            wait = backoff_seconds(retries)
        if not waiting and elapsed + wait >= WAITING_AFTER_SECONDS:
            waiting = True
            await context.waiting(problem)
        log.info(
            "export_retry",
            provider=request.provider,
            destination=context.destination.name,
            wait=wait,
            reason=problem,
        )
        await asyncio.sleep(wait)
