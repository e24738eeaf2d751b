"""The web SDK's HTTP JSON API, served by dispatch's web pop-up worker.

    GET  /sdk.js                               the web SDK
    POST /v1/web/{publishable key}/events       events the visitor did (IngestEvents semantics)
    POST /v1/web/{publishable key}/identify     an anonymous visitor signed in (MergeVisitor)
    POST /v1/web/{publishable key}/popups       the pop-ups this visitor may see now, on this page
    POST /v1/web/{publishable key}/interactions a pop-up viewed, clicked or closed

The key is in the path, so a CORS preflight (which carries no credentials) is judged by it too.
Every page holding the key is a possible attacker, so each request's cost is bounded:
- the key must be a live publishable key (else 401), and a browser's `Origin` one of its
  allowed origins (else 403, with no CORS grant);
- each key may make `requests_per_second` requests a second, in bursts of twice that (else 429
  with Retry-After);
- a body is at most 32 KB of JSON and carries at most 50 events (else 400 with a JSON error);
- an identified visitor (not `anon:`) must send the signature the site's server made of their id
  for anything but events, so no page can read another user's pop-ups;
- nothing answers 500: a failure of Herald's own answers 503 with Retry-After.
"""

from __future__ import annotations

import gzip
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald_common import api
from herald_common.auth import (
    ANONYMOUS_PREFIX,
    PUBLISHABLE_ROLE,
    AccountRates,
    Caller,
    KeyRegistry,
    Unauthenticated,
    identity_secret,
    user_signature_matches,
)
from herald_common.live import MAX_URL
from herald_common.logging import get_logger
from herald_common.timing import zone_named
from herald_dispatch.http import serve
from herald_dispatch.web.forwarding import Forwarder, Refused
from herald_dispatch.web.inbox import INTERACTIONS, PopupInbox, Visitor

log = get_logger(__name__)
MAX_BODY_BYTES = 32 * 1024
MAX_EVENTS_PER_REQUEST = 50
SDK_PATH = Path(__file__).parent / "sdk" / "herald.js"
ACTIONS = ("events", "identify", "popups", "interactions")
# How long a browser may cache a preflight's answer.
PREFLIGHT_MAX_AGE = "600"


class BadRequest(Exception):
    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field, self.description = field, description


def _error(status: int, message: str, field: str = "", headers: dict[str, str] | None = None) -> web.Response:
    body: dict[str, str] = {"error": message}
    if field:
        body["field"] = field
    return web.json_response(body, status=status, headers=headers)


def _text(body: dict[str, Any], key: str, required: bool = True, most: int = 200, path: str = "") -> str:
    """A string field of the body (of an event at `path`)."""
    value = body.get(key, "")
    if not isinstance(value, str) or len(value) > most or (required and not value):
        field = f"{path}.{key}" if path else key
        raise BadRequest(field, f"{'required: ' if required else ''}a string of at most {most} characters")
    return value


def _visitor_id(body: dict[str, Any], key: str = "user_id") -> str:
    value = _text(body, key)
    if not api.is_valid_id(value):
        raise BadRequest(key, "1-200 letters, digits or ._:@+-")
    return value


def _moment(value: Any, field: str) -> datetime | None:
    """An event time: RFC 3339 text or milliseconds since the epoch; None when not given."""
    if value is None:
        return None
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return datetime.fromtimestamp(value / 1000, UTC)
        if isinstance(value, str):
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return parsed if parsed.tzinfo is not None else None
    except (ValueError, OverflowError, OSError):
        pass
    raise BadRequest(field, "an RFC 3339 time with a zone, or milliseconds since the epoch")


def _events(body: dict[str, Any]) -> list[segmentation_pb.Event]:
    given = body.get("events")
    if not isinstance(given, list) or not 0 < len(given) <= MAX_EVENTS_PER_REQUEST:
        raise BadRequest("events", f"required: a list of 1 to {MAX_EVENTS_PER_REQUEST} events")
    made = []
    for i, item in enumerate(given):
        path = f"events[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(path, "an object")
        properties = item.get("properties", {})
        if not isinstance(properties, dict):
            raise BadRequest(f"{path}.properties", "an object")
        event = segmentation_pb.Event(
            user_id=_text(item, "user_id", path=path),
            name=_text(item, "name", path=path),
            client_event_id=_text(item, "client_event_id", path=path),
            user_signature=_text(item, "user_signature", required=False, path=path),
        )
        at = _moment(item.get("time"), f"{path}.time")
        if at is not None:
            event.time.FromDatetime(at)
        try:
            event.properties.update(properties)
        except (ValueError, TypeError):
            raise BadRequest(f"{path}.properties", "JSON values only") from None
        made.append(event)
    return made


class WebServer:
    def __init__(
        self,
        keys: KeyRegistry,
        inbox: PopupInbox,
        forwarder: Forwarder,
        service_token: str,
        requests_per_second: float,
    ) -> None:
        self.keys = keys
        self.inbox = inbox
        self.forwarder = forwarder
        self.service_token = service_token
        self.requests_per_second = requests_per_second
        self.rates = AccountRates()
        self._runner: web.AppRunner | None = None
        source = SDK_PATH.read_bytes()
        self._sdk = (source, gzip.compress(source, 9))
        self._handlers: dict[str, Callable[[Caller, dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "events": self._events,
            "identify": self._identify,
            "popups": self._popups,
            "interactions": self._interactions,
        }

    async def start(self, host: str, port: int) -> int:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/sdk.js", self._serve_sdk)
        app.router.add_route("OPTIONS", "/v1/web/{key}/{action}", self._preflight)
        app.router.add_post("/v1/web/{key}/{action}", self._call)
        self._runner, taken = await serve(app, host, port)
        return taken

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _serve_sdk(self, request: web.Request) -> web.Response:
        plain, compressed = self._sdk
        headers = {"Cache-Control": "public, max-age=300", "Access-Control-Allow-Origin": "*"}
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            headers["Content-Encoding"] = "gzip"
            return web.Response(body=compressed, content_type="application/javascript", headers=headers)
        return web.Response(body=plain, content_type="application/javascript", headers=headers)

    async def _caller(self, request: web.Request) -> tuple[Caller, dict[str, str]] | web.Response:
        """The key's caller and the CORS headers to answer with, or the refusal."""
        try:
            caller = await self.keys.check(request.match_info["key"])
        except Unauthenticated as error:
            return _error(401, str(error))
        if caller.role != PUBLISHABLE_ROLE:
            return _error(401, "not a publishable key: a web page may only hold a ROLE_PUBLISHABLE key")
        origin = request.headers.get("Origin")
        if origin is None:  # not a browser's cross-origin call: no CORS grant is needed
            return caller, {}
        if api.web_origin(origin) not in caller.allowed_origins:
            return _error(403, f"{origin} is not an allowed origin of this key")
        # The SDK reads Retry-After to know when to send again.
        grant = {
            "Access-Control-Allow-Origin": origin,
            "Vary": "Origin",
            "Access-Control-Expose-Headers": "Retry-After",
        }
        return caller, grant

    async def _preflight(self, request: web.Request) -> web.Response:
        checked = await self._caller(request)
        if isinstance(checked, web.Response):
            return checked
        _, cors = checked
        cors.update(
            {
                "Access-Control-Allow-Methods": "POST",
                "Access-Control-Allow-Headers": "Content-Type",
                "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
            }
        )
        return web.Response(status=204, headers=cors)

    async def _call(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        if action not in self._handlers:
            return _error(404, f"unknown call {action!r}; one of {', '.join(ACTIONS)}")
        cors: dict[str, str] = {}
        try:
            checked = await self._caller(request)
            if isinstance(checked, web.Response):
                return checked
            caller, cors = checked
            wait = self.rates.admit(caller.key_id, self.requests_per_second)
            if wait is not None:
                cors["Retry-After"] = str(max(1, round(wait + 0.5)))
                return _error(429, f"more than {self.requests_per_second:g} requests a second", headers=cors)
            try:
                answer = await self._handlers[action](caller, await self._body(request))
            except BadRequest as error:
                return _error(400, error.description, error.field, headers=cors)
            except Refused as error:
                return _error(400, str(error), headers=cors)
            return web.json_response(answer, headers=cors)
        except Exception as error:  # Herald's own failure: the SDK retries, the page goes on
            log.warning("web_call_failed", action=action, error=str(error) or type(error).__name__)
            return _error(503, "temporarily unavailable; retry", headers={**cors, "Retry-After": "2"})

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        raw = await request.content.read(MAX_BODY_BYTES + 1)
        if len(raw) > MAX_BODY_BYTES:
            raise BadRequest("body", f"at most {MAX_BODY_BYTES // 1024} KB")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("body", "not JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("body", "a JSON object")
        return body

    def _visitor(self, caller: Caller, body: dict[str, Any]) -> Visitor:
        """The visitor a call is for: an identified one must prove it with their signature."""
        user_id = _visitor_id(body)
        if not user_id.startswith(ANONYMOUS_PREFIX):
            secret = identity_secret(self.service_token, caller.account)
            if not user_signature_matches(secret, user_id, _text(body, "user_signature", required=False)):
                raise BadRequest(
                    "user_signature", "required for an identified user, and must match the user id"
                )
        zone = _text(body, "timezone", required=False, most=100)
        if zone and zone_named(zone) is None:
            raise BadRequest("timezone", "an IANA time zone, for example Europe/Berlin")
        url = _text(body, "url", required=False, most=MAX_URL)
        return Visitor(_account_id(caller), user_id, _text(body, "session_id", most=100), zone, url)

    async def _events(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        events = _events(body)
        await self.forwarder.events(_account_id(caller), events)
        return {"accepted": len(events)}

    async def _identify(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        merged = await self.forwarder.identify(
            _account_id(caller),
            segmentation_pb.MergeVisitorRequest(
                anonymous_id=_visitor_id(body, "anonymous_id"),
                user_id=_visitor_id(body),
                user_signature=_text(body, "user_signature", required=False),
            ),
        )
        return {"moved_events": merged.moved_event_count, "already_merged": merged.already_merged}

    async def _popups(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        return {"popups": await self.inbox.eligible(self._visitor(caller, body))}

    async def _interactions(self, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
        visitor = self._visitor(caller, body)
        kind = _text(body, "kind", most=20)
        if kind not in INTERACTIONS:
            raise BadRequest("kind", f"one of {', '.join(INTERACTIONS)}")
        if not await self.inbox.interact(visitor, _text(body, "delivery_id"), kind):
            raise BadRequest("delivery_id", "no such pop-up was delivered to this visitor")
        return {"recorded": True}


def _account_id(caller: Caller) -> uuid.UUID:
    return api.parse_uuid_name(caller.account, "accounts", "key")
