"""Segment HTTP Tracking API channel: one `track` event per delivery, sent through /v1/batch."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from google.protobuf import json_format
from liquid.exceptions import LiquidError

from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald.events.v1 import events_pb2 as events
from herald_common import api, personalization
from herald_common.logging import get_logger
from herald_dispatch.ledger import FAILED, SENT, DeliveryResult
from herald_dispatch.retry import backoff_seconds, is_retryable, retry_after_seconds

log = get_logger(__name__)

MAX_EVENT_BYTES = 32 * 1024
# Segment takes up to 500 KB per batch; leave room for sentAt and writeKey as analytics-python does.
MAX_BATCH_BYTES = 475_000
MAX_BATCH_EVENTS = 500
LIBRARY = {"name": "herald", "version": "0.1.0"}


def _iso_millis(job: events.DeliveryJob) -> str:
    when = api.from_timestamp(job.plan_time) if job.HasField("plan_time") else api.utcnow()
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def track_event(job: events.DeliveryJob) -> dict[str, Any]:
    """The Segment `track` call for one delivery; messageId is the delivery id, stable across retries.

    Custom properties are rendered against the recipient's profile; traits carry only the
    profile attributes the campaign selected.
    """
    content = job.segment_export
    profile = json_format.MessageToDict(job.attributes)
    return {
        "type": "track",
        "event": content.event_name,
        "userId": job.user_id,
        "messageId": job.delivery_id,
        "timestamp": _iso_millis(job),
        "properties": {
            key: personalization.render(value, profile) for key, value in content.custom_properties.items()
        },
        "context": {
            "traits": {key: profile[key] for key in content.profile_attributes if key in profile},
            "library": LIBRARY,
        },
    }


@dataclass
class _Encoded:
    job: events.DeliveryJob
    event: dict[str, Any]
    size: int


def _batches(items: Sequence[_Encoded]) -> list[list[_Encoded]]:
    batches: list[list[_Encoded]] = []
    current: list[_Encoded] = []
    size = 0
    for item in items:
        if current and (size + item.size + 1 > MAX_BATCH_BYTES or len(current) >= MAX_BATCH_EVENTS):
            batches.append(current)
            current, size = [], 0
        current.append(item)
        size += item.size + 1
    if current:
        batches.append(current)
    return batches


class SegmentChannel:
    destination_type = "segment"
    content_field = "segment_export"

    def __init__(
        self,
        http: aiohttp.ClientSession,
        *,
        max_attempts: int = 10,
        max_rate_limited_seconds: float = 3600.0,
        request_timeout_seconds: float = 15.0,
    ) -> None:
        self.http = http
        self.max_attempts = max_attempts
        self.max_rate_limited_seconds = max_rate_limited_seconds
        self.timeout = aiohttp.ClientTimeout(total=request_timeout_seconds)

    async def deliver(
        self,
        destination: pb.Destination,
        jobs: Sequence[events.DeliveryJob],
    ) -> list[DeliveryResult]:
        results: list[DeliveryResult] = []
        encoded: list[_Encoded] = []
        for job in jobs:
            try:
                event = track_event(job)
            except LiquidError as error:
                results.append(DeliveryResult(job, FAILED, 0, f"personalization failed: {error}"))
                continue
            size = len(json.dumps(event, separators=(",", ":")).encode())
            if size > MAX_EVENT_BYTES:
                results.append(
                    DeliveryResult(job, FAILED, 0, f"event is {size} bytes; Segment accepts at most 32 KB")
                )
            else:
                encoded.append(_Encoded(job, event, size))
        for batch in _batches(encoded):
            status, attempts, reason = await self._post(destination.segment, batch)
            results.extend(DeliveryResult(item.job, status, attempts, reason) for item in batch)
        return results

    async def _post(
        self,
        config: pb.SegmentConfig,
        batch: Sequence[_Encoded],
    ) -> tuple[events.DeliveryStatus.ValueType, int, str]:
        url = config.endpoint_url.rstrip("/") + "/v1/batch"
        credentials = base64.b64encode(f"{config.write_key}:".encode()).decode()
        attempts = 0
        retries = 0
        rate_limited_for = 0.0
        while True:
            attempts += 1
            body = {
                "batch": [item.event for item in batch],
                "sentAt": api.utcnow().isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "writeKey": config.write_key,
            }
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
                    url, data=json.dumps(body, separators=(",", ":")), headers=headers, timeout=self.timeout
                ) as response:
                    status = response.status
                    text = await response.text()
                    retry_after = retry_after_seconds(response.headers.get("Retry-After"))
                if 200 <= status < 300:
                    return SENT, attempts, ""
                problem = f"Segment answered {status}: {_error_message(text)}"
                if not is_retryable(status):
                    return FAILED, attempts, problem
            except (aiohttp.ClientError, TimeoutError) as error:
                problem = f"Segment unreachable: {error!r}"
            if retry_after:
                # A rate limit with a deadline: wait it out without spending the retry budget.
                rate_limited_for += retry_after
                if rate_limited_for > self.max_rate_limited_seconds:
                    return (
                        FAILED,
                        attempts,
                        f"rate limited for over {self.max_rate_limited_seconds:.0f}s; {problem}",
                    )
                wait = retry_after
            else:
                retries += 1
                if retries >= self.max_attempts:
                    return FAILED, attempts, f"gave up after {attempts} attempts; {problem}"
                wait = backoff_seconds(retries)
            log.info("segment_retry", url=url, events=len(batch), wait=wait, reason=problem)
            await asyncio.sleep(wait)


def _error_message(text: str) -> str:
    try:
        payload = json.loads(text)
    except ValueError:
        return text[:200] or "no body"
    if isinstance(payload, dict):
        return f"{payload.get('code', 'unknown')}: {payload.get('message', '')}"
    return text[:200]
