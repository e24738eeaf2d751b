"""A local stand-in for Segment's HTTP Tracking API, faithful to its documented behaviour:

- POST /v1/{identify,track,page,screen,group,alias,batch}, JSON only;
- auth by `writeKey` in the body or HTTP Basic (write key as user name, empty password);
- 400 with {"code","message"} for invalid JSON, a single call over 32 KB, a batch over 500 KB,
  or any batch event over 32 KB;
- 200 for everything else, even for events it then drops (unknown write key, missing type,
  userId/anonymousId or event name, more than 2500 events in a batch);
- 429 with Retry-After and X-RateLimit-Reset (seconds) past its request rate, or on demand;
- de-duplication on messageId.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any

import uvloop
from aiohttp import web

MAX_EVENT_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500 * 1024
MAX_BATCH_EVENTS = 2500
CALL_TYPES = {"identify", "track", "page", "screen", "group", "alias"}


@dataclass
class RecordedRequest:
    path: str
    status: int
    at: float
    headers: dict[str, str]
    body: Any


@dataclass
class SegmentApi:
    write_keys: set[str]
    # Requests per second allowed before 429s (None: unlimited).
    max_requests_per_second: float | None = None
    requests: list[RecordedRequest] = field(default_factory=list)
    # Accepted events by messageId, first copy wins.
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    duplicates: int = 0
    # The messageIds that arrived more than once.
    duplicated_ids: set[str] = field(default_factory=set)
    dropped: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    _forced: list[tuple[int, float]] = field(default_factory=list)
    _window: list[float] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    url: str = ""
    # Off for long benchmarks: keep message ids only, not every request and event body.
    record_bodies: bool = True
    request_count: int = 0
    # When each request arrived (monotonic), and how many are being answered now.
    arrivals: list[float] = field(default_factory=list)
    in_flight: int = 0
    # An outage: every request answered with (status, Retry-After) until the monotonic deadline.
    _failing: tuple[float, int, float | None] = (0.0, 0, None)
    _hanging_until: float = 0.0

    def fail_next(self, count: int, status: int = 429, retry_after: float | None = 1) -> None:
        """Answers the next `count` requests with `status` (and Retry-After for 429/503)."""
        self._forced.extend([(status, retry_after or 0)] * count)

    def fail_for(self, seconds: float, status: int = 500, retry_after: float | None = None) -> None:
        """Answers every request with `status` for the next `seconds` (an outage, or a long 429)."""
        self._failing = (time.monotonic() + seconds, status, retry_after)

    def hang_for(self, seconds: float) -> None:
        """For the next `seconds`, takes requests in but answers none of them until the time is up:
        the events arrive, the caller times out, and its retries are duplicates."""
        self._hanging_until = time.monotonic() + seconds

    async def start(self, port: int = 0) -> str:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_post("/v1/{call}", self._handle)
        app.router.add_get("/_fake/stats", self._stats)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _error(self, status: int, code: str, message: str) -> web.Response:
        return web.json_response({"code": code, "message": message}, status=status)

    def _rate_limited(self) -> web.Response | None:
        now = time.monotonic()
        failing_until, failing_status, failing_retry_after = self._failing
        if self._forced or now < failing_until:
            if self._forced:
                status, retry_after = self._forced.pop(0)
            else:
                status, retry_after = failing_status, failing_retry_after or 0
            headers = {}
            if retry_after:
                headers = {"Retry-After": str(int(retry_after)), "X-RateLimit-Reset": str(int(retry_after))}
            return web.json_response(
                {"code": "rate_limited" if status == 429 else "error", "message": "try later"},
                status=status,
                headers=headers,
            )
        if self.max_requests_per_second is None:
            return None
        self._window = [t for t in self._window if now - t < 1.0]
        if len(self._window) >= self.max_requests_per_second:
            return web.json_response(
                {"code": "rate_limited", "message": "too many requests"},
                status=429,
                headers={"Retry-After": "1", "X-RateLimit-Reset": "1"},
            )
        self._window.append(now)
        return None

    async def _stats(self, request: web.Request) -> web.Response:
        """What a test in another process checks: accepted events, duplicates, requests."""
        return web.json_response(
            {"events": len(self.events), "duplicates": self.duplicates, "requests": self.request_count}
        )

    async def _handle(self, request: web.Request) -> web.Response:
        self.arrivals.append(time.monotonic())
        self.in_flight += 1
        try:
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.Response:
        call = request.match_info["call"]
        raw = await request.read()
        self.request_count += 1
        response, body = self._respond(call, raw, request.headers.get("Authorization", ""))
        hang = self._hanging_until - time.monotonic()
        if hang > 0:
            await asyncio.sleep(hang)
        if self.record_bodies:
            recorded = body if body is not None else _parsed_or_prefix(raw)
            self.requests.append(
                RecordedRequest(
                    request.path, response.status, time.monotonic(), dict(request.headers), recorded
                )
            )
        return response

    def _respond(self, call: str, raw: bytes, authorization: str) -> tuple[web.Response, Any]:
        if call != "batch" and call not in CALL_TYPES:
            return self._error(404, "not_found", f"unknown endpoint /v1/{call}"), None
        limited = self._rate_limited()
        if limited is not None:
            return limited, None
        limit = MAX_BATCH_BYTES if call == "batch" else MAX_EVENT_BYTES
        if len(raw) > limit:
            return self._error(400, "payload_too_large", f"request is over {limit} bytes"), None
        try:
            body = json.loads(raw)
        except ValueError:
            return self._error(400, "invalid_json", "request body is not valid JSON"), None
        if not isinstance(body, dict):
            return self._error(400, "invalid_json", "request body must be a JSON object"), body
        write_key = body.get("writeKey") or _basic_user(authorization)
        if call == "batch":
            items = body.get("batch")
            if not isinstance(items, list):
                return self._error(400, "invalid_batch", "batch must be a list"), body
            for item in items:
                if len(json.dumps(item).encode()) > MAX_EVENT_BYTES:
                    return self._error(400, "payload_too_large", "an event in the batch is over 32 KB"), body
        else:
            items = [{**body, "type": call}]
        for index, item in enumerate(items):
            self._accept(item, write_key, over_limit=index >= MAX_BATCH_EVENTS)
        return web.json_response({"success": True}), body

    def _accept(self, item: Any, write_key: str | None, *, over_limit: bool) -> None:
        reason = None
        if write_key not in self.write_keys:
            reason = "unknown write key"
        elif over_limit:
            reason = "more than 2500 events in one batch"
        elif not isinstance(item, dict) or item.get("type") not in CALL_TYPES:
            reason = "missing or unknown type"
        elif not item.get("userId") and not item.get("anonymousId"):
            reason = "no_user_anon_id"
        elif item["type"] == "track" and not item.get("event"):
            reason = "track without event"
        if reason is not None:
            self.dropped.append((reason, item))
            return
        message_id = item.get("messageId") or f"server-{len(self.events)}"
        if message_id in self.events:
            self.duplicates += 1
            self.duplicated_ids.add(message_id)
            return
        self.events[message_id] = {**item, "writeKey": write_key} if self.record_bodies else {}


def _parsed_or_prefix(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw[:200]


def _basic_user(authorization: str) -> str | None:
    if not authorization.startswith("Basic "):
        return None
    try:
        decoded = base64.b64decode(authorization[6:]).decode()
    except ValueError:
        return None
    return decoded.split(":", 1)[0]


async def _serve(port: int, write_key: str) -> None:
    """Runs the fake alone, for benchmarks that keep it off the services' processes."""
    api = SegmentApi(write_keys={write_key}, record_bodies=False)
    await api.start(port)
    print(api.url, flush=True)
    await asyncio.Event().wait()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="A local Segment HTTP Tracking API")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--write-key", required=True)
    args = parser.parse_args()
    uvloop.run(_serve(args.port, args.write_key))


if __name__ == "__main__":
    main()
