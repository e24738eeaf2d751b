"""Segment HTTP Tracking API: one `track` event per delivery, sent through /v1/batch.

messageId is the delivery id, so Segment de-duplicates a delivery sent again after a crash.
Failures follow analytics-python: 429 and 5xx are retried (Retry-After honoured without spending
the retry budget), other 4xx fail the deliveries; an outage is ridden out for up to 12 hours.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson
from google.protobuf.message import Message

from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald.events.v1 import events_pb2 as events
from herald_common import channels, personalization
from herald_common.errors import Validator
from herald_dispatch.channels import CannotCheck, Outcome, SendContext, basic_auth, mask_secret
from herald_dispatch.channels.export import (
    MAX_RETRY_SECONDS,
    Encoded,
    ExportRequest,
    code_text,
    encode_each,
    outcomes_of,
    packed,
    post_until_answered,
    push_device,
    readable,
)

KIND = channels.for_config("segment")
MAX_EVENT_BYTES = 32 * 1024
# Segment takes up to 500 KB per batch; leave room for sentAt and writeKey as analytics-python does.
MAX_BATCH_BYTES = 475_000
MAX_BATCH_EVENTS = 500
LIBRARY = {"name": "herald", "version": "0.1.0"}


def _iso_millis(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds * 1000) % 1000:03d}Z"


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
        self.push_tokens = content.push_tokens
        self.timestamp = _iso_millis(context.plan_time.timestamp())

    def build(self, recipient: events.Recipient) -> dict[str, Any]:
        profile = orjson.loads(recipient.attributes_json) if recipient.attributes_json else {}
        properties = dict(self.static)
        for key, template in self.templates.items():
            properties[key] = personalization.render(template, profile)
        context: dict[str, Any] = {
            "traits": {key: readable(key, profile[key]) for key in self.traits if key in profile},
            "library": LIBRARY,
        }
        device = push_device(profile, self.push_tokens)
        if device is not None:
            # Segment's context.device: one device, its push token in `token`.
            context["device"] = {
                "id": device.get("device_id", ""),
                "type": device["platform"],
                "token": device["push_token"],
                "manufacturer": device.get("make", ""),
                "model": device.get("model", ""),
            }
        return {
            "type": "track",
            "event": self.event_name,
            "userId": recipient.user_id,
            "messageId": recipient.delivery_id,
            "timestamp": self.timestamp,
            "properties": properties,
            "context": context,
        }


class SegmentChannel:
    kind = KIND
    resend_unknown = True  # Segment de-duplicates on messageId

    def __init__(self, http: aiohttp.ClientSession, *, max_retry_seconds: float = MAX_RETRY_SECONDS) -> None:
        self.http = http
        self.max_retry_seconds = max_retry_seconds

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
        builder = _EventBuilder(context)
        encoded, outcomes = await encode_each(
            recipients,
            builder.build,
            MAX_EVENT_BYTES,
            lambda size: f"event is {size} bytes; Segment accepts at most 32 KB",
            builder.templates.values(),
        )
        config = context.destination.segment
        for batch in packed(encoded, MAX_BATCH_EVENTS, MAX_BATCH_BYTES):
            outcomes += outcomes_of(context, batch, await self._post(context, config, batch))
        return outcomes

    async def _post(
        self, context: SendContext, config: pb.SegmentConfig, batch: Sequence[Encoded]
    ) -> tuple[events.DeliveryStatus.ValueType, int, str, bool]:
        """Posts one batch until Segment answers for good."""
        authorization = basic_auth(config.write_key, "")
        events_json = b",".join(item.json for item in batch)
        write_key = json.dumps(config.write_key)

        def prepare(retries: int) -> tuple[bytes, dict[str, str]]:
            tail = f'],"sentAt":"{_iso_millis(time.time())}","writeKey":{write_key}}}'
            body = b'{"batch":[' + events_json + tail.encode()
            headers = {
                "Content-Type": "application/json",
                "User-Agent": f"herald/{LIBRARY['version']}",
                "Authorization": authorization,
            }
            if retries:
                headers["X-Retry-Count"] = str(retries)
            return body, headers

        request = ExportRequest(
            "Segment", config.endpoint_url.rstrip("/") + "/v1/batch", prepare, _error_code
        )
        return await post_until_answered(self.http, context, request, self.max_retry_seconds)


def _error_code(text: str) -> str:
    """Segment's error code."""
    try:
        payload = json.loads(text)
    except ValueError:
        return ""
    if isinstance(payload, dict) and isinstance(payload.get("code"), str):
        return code_text(payload["code"])
    return ""
