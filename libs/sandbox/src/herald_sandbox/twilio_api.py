"""A local stand-in for Twilio's Programmable Messaging API, faithful to its documented behaviour:

- GET /2010-04-01/Accounts/{AccountSid}.json: the account, with the same auth;
- GET /2010-04-01/Accounts/{AccountSid}/Messages.json: the account's messages, newest first,
  filtered by `To` and `From`, `PageSize` at a time (at most 1,000) with `next_page_uri` to the
  next page;
- POST /2010-04-01/Accounts/{AccountSid}/Messages.json, form-encoded, HTTP Basic auth with the
  Account SID and auth token (401, error 20003, otherwise, or once the token is revoked; 404
  error 20404 for another account's path);
- `To` must be E.164 (400, error 21211), `From` or `MessagingServiceSid` is required (400, error
  21603), `Body` is required and at most 1,600 characters (400, errors 21602 and 21617);
- 201 Created with the Message JSON (`sid` SM..., `status` queued, `num_segments`, ...);
- 429 with error 20429 past a concurrency limit or on demand: never processed;
- no de-duplication: what is posted twice is sent twice;
- the faults of a real network, on demand: a message accepted but answered late, accepted and its
  connection dropped before the answer, or accepted and answered 502/503/504 by an edge proxy; or
  a request answered 504 by the edge without reaching Twilio at all;
- status callbacks to a message's `StatusCallback`: `sent`, then `delivered` (or `undelivered`
  with error 30003 for the numbers told so), form-encoded and signed with X-Twilio-Signature
  (base64 HMAC-SHA1 of the URL and the sorted parameters, keyed by the auth token), as Twilio's
  libraries check them.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlencode

import aiohttp
import orjson
import uvloop
from aiohttp import web

from herald_common.sms import measure
from herald_sandbox import LocalServer

E164 = re.compile(r"^\+[1-9]\d{6,14}$")


@dataclass
class SentMessage:
    sid: str
    to: str
    sender: str
    body: str
    created: datetime = field(default_factory=lambda: datetime.now(UTC))
    messaging_service_sid: str = ""


@dataclass
class TwilioApi(LocalServer):
    account_sid: str
    auth_token: str
    # Requests handled at once before 429s (None: unlimited).
    max_concurrent: int | None = None
    # After this many messages the auth token is revoked: every request gets 401 (None: never).
    revoke_after: int | None = None
    # Numbers whose messages end `undelivered` (error 30003) in their status callbacks.
    undelivered: set[str] = field(default_factory=set)
    # Each final callback is sent this many times (providers retry; receivers must not count twice).
    callback_copies: int = 1
    # Status callbacks answered, by HTTP status.
    callback_answers: list[int] = field(default_factory=list)
    messages: list[SentMessage] = field(default_factory=list)
    refused: list[tuple[int, int]] = field(default_factory=list)  # (HTTP status, Twilio error code)
    # Faults on demand for the next accepted messages, in order: "late" (answered after
    # `late_seconds`), "drop" (the connection closes before the answer) or an edge's HTTP status.
    faults: list[str | int] = field(default_factory=list)
    late_seconds: float = 3.0
    # The next this many requests are answered 504 by the edge and never reach Twilio.
    edge_timeouts: int = 0
    # Every message takes this long to answer (0: at once).
    answer_seconds: float = 0.0
    # When each request to create a message arrived (monotonic), and how many are being answered.
    arrivals: list[float] = field(default_factory=list)
    in_flight: int = 0
    listings: int = 0  # GETs of the Message list
    _forced: list[int] = field(default_factory=list)
    # The messages to each number, oldest first: a listing filtered by To reads those alone, so a
    # burst of look-ups does not stall this server's loop (and with it the times it records).
    _to: dict[str, list[SentMessage]] = field(default_factory=dict)
    _failing: tuple[float, int, float | None] = (0.0, 500, None)
    # The Authorization header of the current credentials (a test may rotate the token), as a
    # client writes it: the common case needs nothing decoded.
    _expected_authorization: tuple[tuple[str, str], str] = (("", ""), "")
    _hanging_until: float = 0.0
    _in_flight: int = 0

    def fail_for(self, seconds: float, status: int = 500, retry_after: float | None = None) -> None:
        """For the next `seconds`, answers every message request with `status` without taking it
        (an outage, or a long 429 with Retry-After)."""
        self._failing = (time.monotonic() + seconds, status, retry_after)

    def hang_for(self, seconds: float) -> None:
        """For the next `seconds`, takes messages but answers none until the time is up."""
        self._hanging_until = time.monotonic() + seconds

    def throttle_next(self, count: int) -> None:
        """Answers the next `count` requests with 429 (error 20429)."""
        self._forced.extend([429] * count)

    def __post_init__(self) -> None:
        LocalServer.__init__(self)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", self._create)
        app.router.add_get("/2010-04-01/Accounts/{sid}/Messages.json", self._list)
        app.router.add_get("/_fake/stats", self._stats)
        app.router.add_get("/2010-04-01/Accounts/{sid}.json", self._account)
        return await self.serve(app)

    def sign(self, url: str, params: dict[str, str]) -> str:
        payload = url + "".join(k + v for k, v in sorted(params.items()))
        return base64.b64encode(
            hmac.new(self.auth_token.encode(), payload.encode(), hashlib.sha1).digest()
        ).decode()

    async def _callbacks(self, url: str, message: SentMessage) -> None:
        base = {
            "MessageSid": message.sid,
            "AccountSid": self.account_sid,
            "To": message.to,
            "From": message.sender,
        }
        final = {**base, "MessageStatus": "delivered"}
        if message.to in self.undelivered:
            final = {**base, "MessageStatus": "undelivered", "ErrorCode": "30003"}
        async with aiohttp.ClientSession() as http:
            for params in [{**base, "MessageStatus": "sent"}] + [final] * self.callback_copies:
                headers = {"X-Twilio-Signature": self.sign(url, params)}
                async with http.post(url, data=params, headers=headers) as response:
                    self.callback_answers.append(response.status)

    async def _account(self, request: web.Request) -> web.Response:
        """The Account resource: how a client learns its credentials work, sending nothing."""
        if not self._authenticated(request) or request.match_info["sid"] != self.account_sid:
            return self._error(401, 20003, "Authenticate")
        return web.json_response(
            {"sid": self.account_sid, "friendly_name": "Herald test", "status": "active"}
        )

    async def _list(self, request: web.Request) -> web.Response:
        """The Message list resource, newest first, filtered by To and From, a page at a time."""
        self.listings += 1
        if not self._authenticated(request):
            return self._error(401, 20003, "Authenticate")
        if request.match_info["sid"] != self.account_sid:
            return self._error(404, 20404, "The requested resource was not found")
        query = request.query
        try:
            size = min(int(query.get("PageSize", "50")), 1000)
            page = int(query.get("Page", "0"))
        except ValueError:
            return self._error(400, 20001, "Invalid paging parameters")
        candidates = self._to.get(query["To"], []) if "To" in query else self.messages
        found = [m for m in reversed(candidates) if query.get("From", m.sender) == m.sender]
        chosen = found[page * size : (page + 1) * size]
        base = f"/2010-04-01/Accounts/{self.account_sid}/Messages.json"
        filters = {k: query[k] for k in ("To", "From") if k in query}
        following = None
        if (page + 1) * size < len(found):
            following = f"{base}?{urlencode({**filters, 'PageSize': size, 'Page': page + 1})}"
        return web.json_response(
            {
                "messages": [self._resource(m) for m in chosen],
                "page": page,
                "page_size": size,
                "first_page_uri": f"{base}?{urlencode({**filters, 'PageSize': size, 'Page': 0})}",
                "next_page_uri": following,
                "uri": str(request.rel_url),
            }
        )

    def _resource(self, message: SentMessage) -> dict[str, Any]:
        created = _rfc2822(message.created.replace(microsecond=0))
        return {
            "sid": message.sid,
            "account_sid": self.account_sid,
            "to": message.to,
            "from": message.sender if not message.messaging_service_sid else None,
            "messaging_service_sid": message.messaging_service_sid or None,
            "body": message.body,
            "status": "queued",
            "num_segments": str(measure(message.body).segments),
            "direction": "outbound-api",
            "date_created": created,
            "date_updated": created,
            "date_sent": None,
            "error_code": None,
            "error_message": None,
            "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{message.sid}.json",
        }

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response({"messages": len(self.messages), "refused": len(self.refused)})

    def _error(self, status: int, code: int, message: str) -> web.Response:
        self.refused.append((status, code))
        return web.json_response(
            {
                "code": code,
                "message": message,
                "more_info": f"https://www.twilio.com/docs/errors/{code}",
                "status": status,
            },
            status=status,
        )

    def _authenticated(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        credentials = (self.account_sid, self.auth_token)
        if self._expected_authorization[0] != credentials:
            encoded = base64.b64encode(":".join(credentials).encode()).decode()
            self._expected_authorization = (credentials, f"Basic {encoded}")
        if header == self._expected_authorization[1]:
            return True
        if not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
        return (user, password) == (self.account_sid, self.auth_token)

    async def _create(self, request: web.Request) -> web.Response:
        self.arrivals.append(time.monotonic())
        self.in_flight += 1
        try:
            if self.answer_seconds:
                await asyncio.sleep(self.answer_seconds)
            return await self._created(request)
        finally:
            self.in_flight -= 1

    async def _created(self, request: web.Request) -> web.Response:
        until, status, retry_after = self._failing
        if time.monotonic() < until:
            answer = self._error(status, 20429 if status == 429 else 20500, "Service unavailable")
            if retry_after is not None:
                answer.headers["Retry-After"] = str(int(retry_after))
            return answer
        if self.edge_timeouts:
            self.edge_timeouts -= 1
            return web.Response(status=504, text="<html><body>Gateway Timeout</body></html>")
        if not self._authenticated(request):
            return self._error(401, 20003, "Authenticate")
        if request.match_info["sid"] != self.account_sid:
            return self._error(404, 20404, "The requested resource was not found")
        if self._forced:
            self._forced.pop(0)
            return self._error(429, 20429, "Too Many Requests")
        if self.max_concurrent is not None and self._in_flight >= self.max_concurrent:
            return self._error(429, 20429, "Too Many Requests")
        self._in_flight += 1
        try:
            if self.max_concurrent is not None:
                await asyncio.sleep(0)  # others may arrive while this one is handled
            form = await request.post()
            # Checked and counted with no await in between: exactly `revoke_after` get through.
            if self.revoke_after is not None and len(self.messages) >= self.revoke_after:
                return self._error(401, 20003, "Authenticate")
            answer = self._accept({k: str(v) for k, v in form.items()})
            hanging = self._hanging_until - time.monotonic()
            if hanging > 0:
                await asyncio.sleep(hanging)
            if answer.status != 201 or not self.faults:
                return answer
            fault = self.faults.pop(0)
            if fault == "late":
                await asyncio.sleep(self.late_seconds)
                return answer
            if fault == "drop":
                assert request.transport is not None
                request.transport.close()
                return answer
            return web.Response(status=int(fault), text="<html><body>Bad Gateway</body></html>")
        finally:
            self._in_flight -= 1

    def _accept(self, form: dict[str, str]) -> web.Response:
        to, body = form.get("To", ""), form.get("Body", "")
        sender = form.get("From") or form.get("MessagingServiceSid", "")
        if not E164.match(to):
            return self._error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        if not sender:
            return self._error(400, 21603, "A 'From' or 'MessagingServiceSid' parameter is required")
        if not body:
            return self._error(400, 21602, "Message body is required.")
        if len(body) > 1600:
            return self._error(400, 21617, "The concatenated message body exceeds the 1600 character limit.")
        sid = "SM" + uuid.uuid4().hex
        message = SentMessage(
            sid, to, sender, body, messaging_service_sid=form.get("MessagingServiceSid", "")
        )
        self.messages.append(message)
        self._to.setdefault(to, []).append(message)
        callback = form.get("StatusCallback")
        if callback:
            self.in_background(self._callbacks(callback, message))
        return web.json_response(self._resource(message), status=201, dumps=_json)


def _json(document: Any) -> str:
    """A message's JSON, as compact as Twilio's own."""
    return orjson.dumps(document).decode()


@functools.lru_cache(maxsize=4)
def _rfc2822(moment: datetime) -> str:
    """A message's date as Twilio writes it; messages made in the same second share it."""
    return format_datetime(moment)


async def _serve(account_sid: str, auth_token: str) -> None:
    """Runs the fake alone, for benchmarks that keep it off the services' processes."""
    api = TwilioApi(account_sid, auth_token)
    await api.start()
    print(api.url, flush=True)
    await asyncio.Event().wait()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="A local Twilio Messages API")
    parser.add_argument("--account-sid", required=True)
    parser.add_argument("--auth-token", required=True)
    args = parser.parse_args()
    uvloop.run(_serve(args.account_sid, args.auth_token))


if __name__ == "__main__":
    main()
