"""A local stand-in for the Vonage (Nexmo) SMS API, faithful to its documented behaviour:

- GET /account/get-balance?api_key&api_secret: 200 with the balance, 401 for bad credentials;
- POST /sms/json, form-encoded, credentials as `api_key` and `api_secret` in the body or HTTP
  Basic auth;
- HTTP 200 for nearly everything, the outcome in `messages[].status` (all values strings):
  "0" accepted, "1" throttled (past its requests per second, or on demand), "2" missing
  parameter, "3" invalid parameter, "4" bad credentials;
- `client-ref` of at most 40 characters (status "3" otherwise);
- one `messages[]` entry per SMS segment, each with a `message-id`, `client-ref` echoed; on
  demand a message of several parts is partly accepted, its last part throttled;
- no de-duplication: what is posted twice is sent twice;
- a delivery receipt per part to the message's `callback` (form-encoded: msisdn, to, messageId,
  status `delivered`, or `failed` with err-code 6 for the numbers told so, ...), signed with
  timestamp, nonce and a `sig` when the account has a signature secret, by the account's
  signature method: the legacy MD5 hash, or HMAC-MD5, -SHA1, -SHA256 or -SHA512.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from herald_common.sms import measure
from herald_sandbox import LocalServer

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
class VonageApi(LocalServer):
    api_key: str
    api_secret: str
    # Requests per second before status "1" (None: unlimited).
    max_per_second: float | None = None
    # Signs delivery receipts when set, by `signature_method`: "md5hash" (MD5 of the parameters
    # followed by the secret) or an HMAC digest ("md5", "sha1", "sha256", "sha512").
    signature_secret: str = ""
    signature_method: str = "md5hash"
    # Numbers whose messages end `failed` (err-code 6) in their receipts.
    failing: set[str] = field(default_factory=set)
    receipt_answers: list[int] = field(default_factory=list)
    messages: list[VonageMessage] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)  # the status of every answer, in order
    # The next this many messages of several parts have their last part throttled (status "1").
    partly_accepted: int = 0
    # The next this many accepted messages are answered after `late_seconds`.
    late_answers: int = 0
    late_seconds: float = 3.0
    _forced: list[str] = field(default_factory=list)
    _window: list[float] = field(default_factory=list)

    def sign(self, params: dict[str, str]) -> str:
        pairs = "".join(
            f"&{k}={v.replace('&', '_').replace('=', '_')}" for k, v in sorted(params.items()) if k != "sig"
        )
        if self.signature_method == "md5hash":
            return hashlib.md5((pairs + self.signature_secret).encode()).hexdigest()
        return hmac.new(self.signature_secret.encode(), pairs.encode(), self.signature_method).hexdigest()

    async def _receipts(self, url: str, message: VonageMessage, message_ids: list[str]) -> None:
        async with aiohttp.ClientSession() as http:
            for message_id in message_ids:
                failed = message.to in self.failing
                params = {
                    "msisdn": message.to,
                    "to": message.sender,
                    "network-code": "23410",
                    "messageId": message_id,
                    "price": "0.03330000",
                    "status": "failed" if failed else "delivered",
                    "scts": "2611231200",
                    "err-code": "6" if failed else "0",
                    "api-key": self.api_key,
                    "message-timestamp": "2026-11-23 12:00:00",
                    "client-ref": message.client_ref,
                }
                if self.signature_secret:
                    params |= {"timestamp": str(int(time.time())), "nonce": uuid.uuid4().hex}
                    params["sig"] = self.sign(params)
                async with http.post(url, data=params) as response:
                    self.receipt_answers.append(response.status)

    def throttle_next(self, count: int) -> None:
        """Answers the next `count` requests with status "1" (throttled)."""
        self._forced.extend(["1"] * count)

    def __post_init__(self) -> None:
        LocalServer.__init__(self)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/sms/json", self._send)
        app.router.add_get("/account/get-balance", self._balance)
        return await self.serve(app)

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

    async def _balance(self, request: web.Request) -> web.Response:
        """GET /account/get-balance: 200 with the balance, 401 for bad credentials."""
        if (request.query.get("api_key"), request.query.get("api_secret")) != (self.api_key, self.api_secret):
            return web.json_response(
                {"error-code": "401", "error-code-label": "authentication failed"}, status=401
            )
        return web.json_response({"value": 15.5359, "autoReload": False})

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
        if len(client_ref) > 40:
            return self._answer([{"status": "3", "error-text": "Invalid client-ref: at most 40 characters"}])
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
        if len(parts) > 1 and self.partly_accepted > 0:
            self.partly_accepted -= 1
            parts[-1] = {"status": "1", "error-text": "Throughput Rate Exceeded", "client-ref": client_ref}
        if self.late_answers > 0:
            self.late_answers -= 1
            await asyncio.sleep(self.late_seconds)
        callback = form.get("callback")
        if callback:
            ids = [str(p["message-id"]) for p in parts if p["status"] == "0"]
            self.in_background(self._receipts(callback, self.messages[-1], ids))
        return self._answer(parts)
