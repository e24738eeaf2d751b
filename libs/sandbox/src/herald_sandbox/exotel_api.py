"""A local stand-in for Exotel's SMS API, faithful to its documented behaviour:

- GET /v1/Accounts/{AccountSid}.json: the account; POST /v1/Accounts/{AccountSid}/Sms/send.json,
  form-encoded; both with HTTP Basic auth with the API key and token (401 with a RestException
  otherwise);
- `From` must be one of the account's senders (400), `To` and `Body` are required (400), a body
  is at most 2,000 characters (400), and on the Mumbai cluster `DltEntityId` is mandatory (400);
- 200 with the SMSMessage JSON (`Sid`, `Status` queued, ...);
- 429 with Retry-After and a RestException past its requests per minute, or on demand;
- no de-duplication;
- a status callback to the message's `StatusCallback` once it is final (form-encoded SmsSid, To,
  Status `sent` with DetailedStatus DELIVERED_TO_HANDSET 20000; `failed` with 30005 for the
  numbers told so; `failed_dnd` for numbers on the do-not-call registry); Exotel signs nothing.
"""

from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from herald_sandbox import LocalServer


@dataclass
class ExotelMessage:
    sid: str
    to: str
    sender: str
    body: str
    form: dict[str, str]


@dataclass
class ExotelApi(LocalServer):
    api_key: str
    api_token: str
    account_sid: str
    senders: set[str]
    require_dlt: bool = True
    # Requests per minute before 429 (None: unlimited); Retry-After in seconds on a 429.
    max_per_minute: int | None = None
    retry_after: int = 1
    failing: set[str] = field(default_factory=set)
    # Numbers on India's do-not-call registry: their messages end `failed_dnd`.
    dnd: set[str] = field(default_factory=set)
    callback_answers: list[int] = field(default_factory=list)
    messages: list[ExotelMessage] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)
    _forced: int = 0
    _window: list[float] = field(default_factory=list)

    async def _callback(self, url: str, message: ExotelMessage) -> None:
        status, detailed, code = "sent", "DELIVERED_TO_HANDSET", "20000"
        if message.to in self.failing:
            status, detailed, code = "failed", "DLT_TEMPLATE_MISMATCH", "30005"
        elif message.to in self.dnd:
            status, detailed, code = "failed_dnd", "NUMBER_IN_DND", "30002"
        params = {
            "SmsSid": message.sid,
            "To": message.to,
            "Status": status,
            "DetailedStatus": detailed,
            "DetailedStatusCode": code,
            "DateSent": "2026-11-23 12:00:00",
        }
        async with aiohttp.ClientSession() as http, http.post(url, data=params) as response:
            self.callback_answers.append(response.status)

    def throttle_next(self, count: int) -> None:
        self._forced += count

    def __post_init__(self) -> None:
        LocalServer.__init__(self)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/Accounts/{sid}/Sms/send.json", self._send)
        app.router.add_get("/v1/Accounts/{sid}.json", self._account)
        return await self.serve(app)

    def _error(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> web.Response:
        self.refused.append(status)
        body = {"RestException": {"Status": status, "Message": message, "Code": code}}
        return web.json_response(body, status=status, headers=headers)

    def _over_rate(self) -> bool:
        if self._forced:
            self._forced -= 1
            return True
        if self.max_per_minute is None:
            return False
        now = time.monotonic()
        self._window = [t for t in self._window if now - t < 60.0]
        if len(self._window) >= self.max_per_minute:
            return True
        self._window.append(now)
        return False

    def _authenticated(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        credentials = base64.b64decode(header[6:]).decode() if header.startswith("Basic ") else ""
        return (
            credentials == f"{self.api_key}:{self.api_token}"
            and request.match_info["sid"] == self.account_sid
        )

    async def _account(self, request: web.Request) -> web.Response:
        if not self._authenticated(request):
            return self._error(401, "UNAUTHORIZED", "Authentication failed")
        return web.json_response({"Account": {"Sid": self.account_sid, "Status": "active"}})

    async def _send(self, request: web.Request) -> web.Response:
        if not self._authenticated(request):
            return self._error(401, "UNAUTHORIZED", "Authentication failed")
        if self._over_rate():
            return self._error(
                429, "TOO_MANY_REQUESTS", "Rate limit exceeded", {"Retry-After": str(self.retry_after)}
            )
        form = {k: str(v) for k, v in (await request.post()).items()}
        to, sender, body = form.get("To", ""), form.get("From", ""), form.get("Body", "")
        if not to or not body:
            return self._error(400, "BAD_REQUEST", "To and Body are required")
        if sender not in self.senders:
            return self._error(400, "BAD_REQUEST", f"Invalid sender {sender}")
        if len(body) > 2000:
            return self._error(400, "BAD_REQUEST", "Body is longer than 2000 characters")
        if self.require_dlt and not form.get("DltEntityId"):
            return self._error(400, "BAD_REQUEST", "DltEntityId is mandatory")
        sid = uuid.uuid4().hex
        self.messages.append(ExotelMessage(sid, to, sender, body, form))
        if form.get("StatusCallback"):
            self.in_background(self._callback(form["StatusCallback"], self.messages[-1]))
        message = {
            "Sid": sid,
            "AccountSid": self.account_sid,
            "From": sender,
            "To": to,
            "Body": body,
            "Status": "queued",
            "Direction": "outbound-api",
            "Uri": f"/v1/Accounts/{self.account_sid}/SMS/Messages/{sid}.json",
        }
        return web.json_response({"SMSMessage": message})
