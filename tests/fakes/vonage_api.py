"""A local stand-in for the Vonage (Nexmo) SMS API, faithful to its documented behaviour:

- POST /sms/json, form-encoded, credentials as `api_key` and `api_secret` in the body or HTTP
  Basic auth;
- HTTP 200 for nearly everything, the outcome in `messages[].status` (all values strings):
  "0" accepted, "1" throttled (past its requests per second, or on demand), "2" missing
  parameter, "3" invalid parameter, "4" bad credentials;
- one `messages[]` entry per SMS segment, each with a `message-id`, `client-ref` echoed;
- no de-duplication: what is posted twice is sent twice.
"""

from __future__ import annotations

import base64
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from herald_common.sms import measure

NUMBER = re.compile(r"^[1-9]\d{6,14}$")


@dataclass
class VonageMessage:
    to: str
    sender: str
    text: str
    type: str
    client_ref: str
    extra: dict[str, str]


@dataclass
class VonageApi:
    api_key: str
    api_secret: str
    # Requests per second before status "1" (None: unlimited).
    max_per_second: float | None = None
    messages: list[VonageMessage] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)  # the status of every answer, in order
    url: str = ""
    _forced: list[str] = field(default_factory=list)
    _window: list[float] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    def throttle_next(self, count: int) -> None:
        """Answers the next `count` requests with status "1" (throttled)."""
        self._forced.extend(["1"] * count)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/sms/json", self._send)
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

    def _answer(self, parts: list[dict[str, Any]]) -> web.Response:
        self.statuses.extend(str(p["status"]) for p in parts)
        return web.json_response({"message-count": str(len(parts)), "messages": parts})

    def _credentials(self, request: web.Request, form: dict[str, str]) -> tuple[str, str]:
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            return user, password
        return form.get("api_key", ""), form.get("api_secret", "")

    def _over_rate(self) -> bool:
        if self.max_per_second is None:
            return False
        now = time.monotonic()
        self._window = [t for t in self._window if now - t < 1.0]
        if len(self._window) >= self.max_per_second:
            return True
        self._window.append(now)
        return False

    async def _send(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        if self._credentials(request, form) != (self.api_key, self.api_secret):
            return self._answer([{"status": "4", "error-text": "Bad Credentials"}])
        if self._forced:
            return self._answer([{"status": self._forced.pop(0), "error-text": "Throughput Rate Exceeded"}])
        if self._over_rate():
            return self._answer(
                [{"status": "1", "error-text": "You are sending SMS faster than the account limit."}]
            )
        to, sender, text = form.get("to", ""), form.get("from", ""), form.get("text", "")
        if not to:
            return self._answer([{"status": "2", "error-text": "Missing to param"}])
        if not sender:
            return self._answer([{"status": "2", "error-text": "Missing from param"}])
        if not NUMBER.match(to):
            return self._answer([{"status": "3", "error-text": "Invalid to param"}])
        client_ref = form.get("client-ref", "")
        extra = {k: v for k, v in form.items() if k in ("entity-id", "content-id")}
        self.messages.append(VonageMessage(to, sender, text, form.get("type", "text"), client_ref, extra))
        parts = [
            {
                "to": to,
                "message-id": uuid.uuid4().hex[:16].upper(),
                "status": "0",
                "remaining-balance": "15.53590000",
                "message-price": "0.03330000",
                "network": "23410",
                "client-ref": client_ref,
            }
            for _ in range(max(measure(text).segments, 1))
        ]
        return self._answer(parts)
