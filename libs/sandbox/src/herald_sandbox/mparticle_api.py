"""A local stand-in for mParticle's Events API (server-to-server), faithful to its documented
behaviour:

- POST /v2/events (one batch) and /v2/bulkevents (a JSON array of batches) with HTTP Basic auth,
  the feed's key and secret: 401 without the header, 403 with a wrong one;
- a request must be under 256 KB (413 otherwise) and /v2/bulkevents carries at most 100 batches
  (400); a body that is not the JSON expected is 400; errors come as
  `{"errors": [{"code": ..., "message": ...}]}`;
- 202 Accepted, also when only some batches were good: a batch over 128 KB, without a valid
  `environment`, without events, or with an event missing `event_type` or a custom event's
  `event_name` / valid `custom_event_type` is dropped (counted in `dropped`);
- batches de-duplicated on `source_request_id`;
- 429 with Retry-After and X-mp-rate-limit-exceeded past its batches per second (each clock
  second counted alone) or on demand (`throttle_next`), and 503 on demand (`fail_next`);
- user identities accepted with the JSON reference's `customer_id` or the SDK's `customerid`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import uvloop
from aiohttp import web

from herald_sandbox import LocalServer

MAX_REQUEST_BYTES = 256 * 1024
MAX_BATCH_BYTES = 128 * 1024
MAX_BATCHES = 100
EVENT_TYPES = {
    "custom_event",
    "commerce_event",
    "session_start",
    "session_end",
    "screen_view",
    "uninstall",
    "crash_report",
    "opt_out",
    "push_registration",
    "application_state_transition",
    "push_message",
    "network_performance",
    "breadcrumb",
}
CUSTOM_EVENT_TYPES = {
    "attribution",
    "location",
    "media",
    "navigation",
    "search",
    "social",
    "transaction",
    "user_content",
    "user_preference",
    "other",
    "unknown",
}


@dataclass
class MparticleApi(LocalServer):
    api_key: str
    api_secret: str
    retry_after: int = 1
    # Batches a clock second takes before 429s (None: unlimited).
    max_batches_per_second: int | None = None
    # Batches accepted, by source_request_id, and every source_message_id recorded, in order.
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    source_message_ids: list[str] = field(default_factory=list)
    # Each request's size in bytes and batch count, and the status answered.
    requests: list[tuple[int, int, int]] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)
    repeated: int = 0
    _throttle: int = 0
    _fail: int = 0
    _second: tuple[int, int] = (0, 0)  # (clock second, batches taken in it)

    def __post_init__(self) -> None:
        LocalServer.__init__(self)

    def throttle_next(self, count: int) -> None:
        self._throttle += count

    def fail_next(self, count: int) -> None:
        self._fail += count

    async def start(self) -> str:
        app = web.Application(client_max_size=4 * MAX_REQUEST_BYTES)
        app.router.add_post("/v2/events", self._events)
        app.router.add_post("/v2/bulkevents", self._bulk)
        app.router.add_get("/_fake/stats", self._stats)
        return await self.serve(app)

    @staticmethod
    def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
        body = {"errors": [{"code": code, "message": message}]}
        return web.json_response(body, status=status, headers=headers)

    def _over_rate(self, batches: int) -> bool:
        if self.max_batches_per_second is None:
            return False
        second, taken = self._second
        now = int(time.time())
        if now != second:
            second, taken = now, 0
        if taken + batches > self.max_batches_per_second:
            return True
        self._second = (second, taken + batches)
        return False

    def _refusal(self, request: web.Request, body: bytes, batches: int = 1) -> web.Response | None:
        header = request.headers.get("Authorization", "")
        if not header:
            return self._error(401, "UNAUTHORIZED", "Authorization header missing")
        expected = "Basic " + base64.b64encode(f"{self.api_key}:{self.api_secret}".encode()).decode()
        if header != expected:
            return self._error(403, "FORBIDDEN", "Invalid API key or secret")
        if self._throttle or self._over_rate(batches):
            self._throttle = max(self._throttle - 1, 0)
            headers = {"Retry-After": str(self.retry_after), "X-mp-rate-limit-exceeded": "workspace"}
            return self._error(429, "TOO_MANY_REQUESTS", "You have exceeded your provisioned limit", headers)
        if self._fail:
            self._fail -= 1
            return self._error(503, "SERVICE_UNAVAILABLE", "Service unavailable")
        if len(body) >= MAX_REQUEST_BYTES:
            return self._error(413, "PAYLOAD_TOO_LARGE", "The total request size must be under 256kb")
        return None

    async def _events(self, request: web.Request) -> web.Response:
        body = await request.read()
        refused = self._refusal(request, body)
        if refused is None:
            try:
                batch = json.loads(body)
            except ValueError:
                refused = self._error(400, "BAD_REQUEST", "Malformed JSON")
            else:
                if not isinstance(batch, dict):
                    refused = self._error(400, "BAD_REQUEST", "A batch must be a JSON object")
        if refused is not None:
            self.requests.append((len(body), 1, refused.status))
            return refused
        self._take(batch, len(body))
        self.requests.append((len(body), 1, 202))
        return web.Response(status=202)

    async def _bulk(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            batches: Any = json.loads(body)
        except ValueError:
            batches = None
        count = len(batches) if isinstance(batches, list) else 0
        refused = self._refusal(request, body, count)
        if refused is None:
            if batches is None:
                refused = self._error(400, "BAD_REQUEST", "Malformed JSON")
            else:
                if not isinstance(batches, list):
                    refused = self._error(400, "BAD_REQUEST", "The body must be a JSON array of batches")
                elif len(batches) > MAX_BATCHES:
                    refused = self._error(
                        400, "BAD_REQUEST", "You may not send more than 100 EVENT DATA items per request"
                    )
        if refused is not None:
            self.requests.append((len(body), count, refused.status))
            return refused
        for batch in batches:
            self._take(batch, len(json.dumps(batch, separators=(",", ":"), ensure_ascii=False).encode()))
        self.requests.append((len(body), count, 202))
        return web.Response(status=202)

    def _take(self, batch: Any, size: int) -> None:
        """Records a good batch once per source_request_id; drops a bad one with why."""
        problem = _problem(batch, size)
        if problem:
            self.dropped[problem] += 1
            return
        request_id = str(batch.get("source_request_id", ""))
        if request_id and request_id in self.batches:
            self.repeated += 1
            return
        self.batches[request_id or f"unnamed-{len(self.batches)}"] = batch
        for event in batch["events"]:
            message_id = event["data"].get("source_message_id")
            if message_id:
                self.source_message_ids.append(str(message_id))

    async def _stats(self, _: web.Request) -> web.Response:
        return web.json_response({"batches": len(self.batches), "requests": len(self.requests)})


def _problem(batch: Any, size: int) -> str:
    if not isinstance(batch, dict):
        return "not an object"
    if size > MAX_BATCH_BYTES:
        return "batch over 128 KB"
    if batch.get("environment") not in ("production", "development"):
        return "environment missing or invalid"
    events = batch.get("events")
    if not isinstance(events, list) or not events:
        return "no events"
    for event in events:
        if not isinstance(event, dict) or event.get("event_type") not in EVENT_TYPES:
            return "event_type missing or invalid"
        data = event.get("data")
        if not isinstance(data, dict):
            return "event data missing"
        if event["event_type"] == "custom_event" and (
            not data.get("event_name") or data.get("custom_event_type") not in CUSTOM_EVENT_TYPES
        ):
            return "custom event without event_name or a valid custom_event_type"
    identities = batch.get("user_identities", {})
    if not isinstance(identities, dict):
        return "user_identities is not an object"
    return ""


def customer_id(batch: dict[str, Any]) -> str:
    """The batch's customer id, in either documented spelling."""
    identities = batch.get("user_identities", {})
    return str(identities.get("customer_id") or identities.get("customerid") or "")


async def _serve(api_key: str, api_secret: str) -> None:
    """Runs the fake alone, for benchmarks that keep it off the services' processes."""
    api = MparticleApi(api_key, api_secret)
    await api.start()
    print(api.url, flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="A local mParticle Events API")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--api-secret", required=True)
    args = parser.parse_args()
    uvloop.run(_serve(args.api_key, args.api_secret))


if __name__ == "__main__":
    main()
