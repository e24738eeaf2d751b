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

import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any

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
    dropped: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    _forced: list[tuple[int, float]] = field(default_factory=list)
    _window: list[float] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    url: str = ""

    def fail_next(self, count: int, status: int = 429, retry_after: float | None = 1) -> None:
        """Answers the next `count` requests with `status` (and Retry-After for 429/503)."""
        self._forced.extend([(status, retry_after or 0)] * count)

    async def start(self) -> str:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_post("/v1/{call}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
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
        if self._forced:
            status, retry_after = self._forced.pop(0)
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

    async def _handle(self, request: web.Request) -> web.Response:
        call = request.match_info["call"]
        raw = await request.read()
        headers = dict(request.headers)
        body: Any = None
        response = self._respond(call, raw, request.headers.get("Authorization", ""))
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw[:200]
        self.requests.append(RecordedRequest(request.path, response.status, time.monotonic(), headers, body))
        return response

    def _respond(self, call: str, raw: bytes, authorization: str) -> web.Response:
        if call != "batch" and call not in CALL_TYPES:
            return self._error(404, "not_found", f"unknown endpoint /v1/{call}")
        limited = self._rate_limited()
        if limited is not None:
            return limited
        limit = MAX_BATCH_BYTES if call == "batch" else MAX_EVENT_BYTES
        if len(raw) > limit:
            return self._error(400, "payload_too_large", f"request is over {limit} bytes")
        try:
            body = json.loads(raw)
        except ValueError:
            return self._error(400, "invalid_json", "request body is not valid JSON")
        if not isinstance(body, dict):
            return self._error(400, "invalid_json", "request body must be a JSON object")
        write_key = body.get("writeKey") or _basic_user(authorization)
        if call == "batch":
            items = body.get("batch")
            if not isinstance(items, list):
                return self._error(400, "invalid_batch", "batch must be a list")
            for item in items:
                if len(json.dumps(item).encode()) > MAX_EVENT_BYTES:
                    return self._error(400, "payload_too_large", "an event in the batch is over 32 KB")
        else:
            items = [{**body, "type": call}]
        for index, item in enumerate(items):
            self._accept(item, write_key, over_limit=index >= MAX_BATCH_EVENTS)
        return web.json_response({"success": True})

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
            return
        self.events[message_id] = {**item, "writeKey": write_key}


def _basic_user(authorization: str) -> str | None:
    if not authorization.startswith("Basic "):
        return None
    try:
        decoded = base64.b64decode(authorization[6:]).decode()
    except ValueError:
        return None
    return decoded.split(":", 1)[0]
