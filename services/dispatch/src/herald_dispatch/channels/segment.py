"""Segment HTTP Tracking API: one `track` event per delivery, sent through /v1/batch.

messageId is the delivery id, so Segment de-duplicates a delivery sent again after a crash.
Failures follow analytics-python: 429 and 5xx are retried (Retry-After honoured without spending
the retry budget), other 4xx fail the deliveries; an outage is ridden out for up to 12 hours.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from google.protobuf.message import Message

from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald.events.v1 import events_pb2 as events
from herald_common import channels, personalization
from herald_common.errors import Validator
from herald_common.logging import get_logger
from herald_dispatch.channels import (
    FAILED,
    SENT,
    SKIPPED,
    UNKNOWN,
    CannotCheck,
    Outcome,
    SendContext,
    mask_secret,
)
from herald_dispatch.retry import backoff_seconds, is_retryable, retry_after_seconds

log = get_logger(__name__)

KIND = channels.for_config("segment")
MAX_EVENT_BYTES = 32 * 1024
# Segment takes up to 500 KB per batch; leave room for sentAt and writeKey as analytics-python does.
MAX_BATCH_BYTES = 475_000
MAX_BATCH_EVENTS = 500
LIBRARY = {"name": "herald", "version": "0.1.0"}
# How long one request may go on failing or being rate limited before its deliveries fail.
MAX_RETRY_SECONDS = 12 * 3600.0
# After this long failing, the campaign is told the destination is holding deliveries back.
WAITING_AFTER_SECONDS = 5.0
REQUEST_TIMEOUT_SECONDS = 15.0


def _iso_millis(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds * 1000) % 1000:03d}Z"


@dataclass
class _Encoded:
    recipient: events.Recipient
    json: str


class _EventBuilder:
    """Builds each recipient's `track` event from the campaign's export content."""

    def __init__(self, context: SendContext) -> None:
        content = context.campaign.segment_export
        self.event_name = content.event_name
        self.static = {k: v for k, v in content.custom_properties.items() if personalization.is_static(v)}
        self.templates = {
            k: v for k, v in content.custom_properties.items() if not personalization.is_static(v)
        }
        self.traits = list(content.profile_attributes)
        self.timestamp = _iso_millis(context.plan_time.timestamp())

    def build(self, recipient: events.Recipient) -> dict[str, Any]:
        profile = json.loads(recipient.attributes_json) if recipient.attributes_json else {}
        properties = dict(self.static)
        for key, template in self.templates.items():
            properties[key] = personalization.render(template, profile)
        return {
            "type": "track",
            "event": self.event_name,
            "userId": recipient.user_id,
            "messageId": recipient.delivery_id,
            "timestamp": self.timestamp,
            "properties": properties,
            "context": {
                "traits": {key: profile[key] for key in self.traits if key in profile},
                "library": LIBRARY,
            },
        }


def _batches(items: Sequence[_Encoded]) -> list[list[_Encoded]]:
    batches: list[list[_Encoded]] = []
    current: list[_Encoded] = []
    size = 0
    for item in items:
        if current and (size + len(item.json) + 1 > MAX_BATCH_BYTES or len(current) >= MAX_BATCH_EVENTS):
            batches.append(current)
            current, size = [], 0
        current.append(item)
        size += len(item.json) + 1
    if current:
        batches.append(current)
    return batches


class SegmentChannel:
    kind = KIND
    resend_unknown = True  # Segment de-duplicates on messageId

    def __init__(self, http: aiohttp.ClientSession, *, max_retry_seconds: float = MAX_RETRY_SECONDS) -> None:
        self.http = http
        self.max_retry_seconds = max_retry_seconds
        self.timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)

    def validate_config(self, config: Message, field: str, check: Validator) -> list[str]:
        assert isinstance(config, pb.SegmentConfig)
        check.require(bool(config.write_key.strip()), f"{field}.write_key", "required")
        check.require(len(config.write_key) <= 200, f"{field}.write_key", "at most 200 characters")
        check.require(bool(config.endpoint_url), f"{field}.endpoint_url", "required: an https URL")
        return [config.endpoint_url] if config.endpoint_url else []

    def requests_per_second(self, destination: pb.Destination) -> int:
        return 1000  # Segment's recommended ceiling per workspace

    async def check_credentials(self, destination: pb.Destination) -> tuple[bool, str]:
        raise CannotCheck(
            "Segment accepts any write key and drops events for unknown ones; send a test event"
        )

    def mask(self, config: Message) -> None:
        assert isinstance(config, pb.SegmentConfig)
        config.write_key = mask_secret(config.write_key)

    async def deliver(self, context: SendContext, recipients: Sequence[events.Recipient]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        encoded: list[_Encoded] = []
        builder = _EventBuilder(context)
        for recipient in recipients:
            if recipient.oversized_attributes_bytes:
                size = recipient.oversized_attributes_bytes
                outcomes.append(
                    Outcome(recipient, FAILED, 0, f"profile attributes are {size} bytes; too large")
                )
                continue
            try:
                event = json.dumps(builder.build(recipient), separators=(",", ":"), ensure_ascii=False)
            except personalization.PersonalizationError as error:
                outcomes.append(Outcome(recipient, FAILED, 0, f"personalization failed: {error}"))
                continue
            size = len(event.encode())
            if size > MAX_EVENT_BYTES:
                outcomes.append(
                    Outcome(recipient, FAILED, 0, f"event is {size} bytes; Segment accepts at most 32 KB")
                )
            else:
                encoded.append(_Encoded(recipient, event))
        config = context.destination.segment
        for batch in _batches(encoded):
            status, attempts, reason, sent_twice = await self._post(context, config, batch)
            outcomes.extend(
                Outcome(
                    item.recipient,
                    status,
                    attempts,
                    reason,
                    sent_twice or item.recipient.delivery_id in context.resent,
                )
                for item in batch
            )
        return outcomes

    async def _post(
        self, context: SendContext, config: pb.SegmentConfig, batch: Sequence[_Encoded]
    ) -> tuple[events.DeliveryStatus.ValueType, int, str, bool]:
        """Posts one batch until Segment answers for good: (status, attempts, reason, sent again
        after an attempt that may have arrived)."""
        url = config.endpoint_url.rstrip("/") + "/v1/batch"
        credentials = base64.b64encode(f"{config.write_key}:".encode()).decode()
        events_json = ",".join(item.json for item in batch)
        write_key = json.dumps(config.write_key)
        attempts = 0
        retries = 0
        started = time.monotonic()
        waiting = False
        # A request that timed out or lost its connection after being sent may have arrived:
        # the retry is a resend that Segment de-duplicates on messageId.
        maybe_arrived = False
        while True:
            if not await context.wanted():
                if maybe_arrived:
                    return UNKNOWN, attempts, "campaign stopped; an earlier attempt may have arrived", False
                return SKIPPED, attempts, "campaign stopped", False
            await context.permit()
            attempts += 1
            body = f'{{"batch":[{events_json}],"sentAt":"{_iso_millis(time.time())}","writeKey":{write_key}}}'
            headers = {
                "Content-Type": "application/json",
                "User-Agent": f"herald/{LIBRARY['version']}",
                "Authorization": f"Basic {credentials}",
            }
            if retries:
                headers["X-Retry-Count"] = str(retries)
            retry_after: float | None = None
            try:
                async with self.http.post(
                    url, data=body.encode(), headers=headers, timeout=self.timeout
                ) as response:
                    status = response.status
                    text = await response.text()
                    retry_after = retry_after_seconds(response.headers.get("Retry-After"))
                if 200 <= status < 300:
                    if waiting:
                        await context.waiting(None)
                    return SENT, attempts, "", maybe_arrived
                problem = f"Segment answered {status}{_error_code(text)}"
                if not is_retryable(status):
                    if waiting:
                        await context.waiting(None)
                    return FAILED, attempts, problem, maybe_arrived
            except (aiohttp.ClientError, TimeoutError, OSError) as error:
                problem = f"Segment unreachable: {type(error).__name__}"
                maybe_arrived = maybe_arrived or not isinstance(error, aiohttp.ClientConnectorError)
            elapsed = time.monotonic() - started
            if elapsed > self.max_retry_seconds:
                reason = f"gave up after {elapsed / 3600:.1f} h of failures; {problem}"
                return FAILED, attempts, reason, maybe_arrived
            if retry_after:
                wait = retry_after  # a rate limit with a deadline: it does not spend the retry budget
            else:
                retries += 1
                wait = backoff_seconds(retries)
            if not waiting and elapsed + wait >= WAITING_AFTER_SECONDS:
                waiting = True
                await context.waiting(problem)
            log.info(
                "segment_retry",
                destination=context.destination.name,
                events=len(batch),
                wait=wait,
                reason=problem,
            )
            await asyncio.sleep(wait)


_UNSAFE = re.compile(r"[^A-Za-z0-9 _.:-]")


def _error_code(text: str) -> str:
    """Segment's error code, short and sanitized: response bodies are not copied into events."""
    try:
        payload = json.loads(text)
    except ValueError:
        return ""
    if isinstance(payload, dict) and isinstance(payload.get("code"), str):
        return f" ({_UNSAFE.sub('', payload['code'])[:40]})"
    return ""
