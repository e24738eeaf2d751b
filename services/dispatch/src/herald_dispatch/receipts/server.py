"""One small HTTP server for every provider's callbacks: delivery receipts and inbound replies.

A provider calls `/v1/receipts/{provider}/{destination id}` with receipts and
`/v1/inbound/{provider}/{destination id}` with replies; a provider that does not sign its
callbacks (Exotel, MSG91, Vonage without a signature secret) calls the same with a secret token
appended. Each provider's module (`receipts/<provider>.py`) says how its callbacks are checked and
what they carry. A body larger than 64 KB gets 413; one that is not UTF-8, or not the provider's
format, gets 400; an unknown destination 404; a signature or token that does not verify 403; none
of them changes anything.
"""

from __future__ import annotations

import hmac
import json
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald.events.v1 import events_pb2 as events
from herald_common import api
from herald_common.auth import account_name
from herald_common.bus import Subjects
from herald_common.db import Database, Statement
from herald_common.logging import get_logger
from herald_common.loops import WakeableLoop
from herald_common.outbox import OutboxEvent, enqueue
from herald_common.sms import E164
from herald_dispatch.gate import record_opt_out
from herald_dispatch.http import serve
from herald_dispatch.receipts.callbacks import Body, Callbacks, Receipt, path_token
from herald_dispatch.receipts.exotel import ExotelCallbacks
from herald_dispatch.receipts.msg91 import Msg91Callbacks
from herald_dispatch.receipts.recording import FORGET_APPLIED, SWEEP_SECONDS, apply_receipts
from herald_dispatch.receipts.twilio import TwilioCallbacks
from herald_dispatch.receipts.vonage import VonageCallbacks
from herald_dispatch.storage import outbox

# Final receipts, kept until their deliveries have them (the first of a message's receipts wins).
_KEEP_RECEIPTS = Statement(
    """
    INSERT INTO dispatch.receipts (destination, provider_message_id, account_id, status, error_code)
    SELECT :destination, m, :account_id, s, e
    FROM unnest(CAST(:ids AS text[]), CAST(:statuses AS text[]), CAST(:error_codes AS text[])) AS t(m, s, e)
    ON CONFLICT DO NOTHING
    """
)

log = get_logger(__name__)
PROVIDERS: dict[str, Callbacks] = {
    p.kind: p for p in (TwilioCallbacks(), VonageCallbacks(), ExotelCallbacks(), Msg91Callbacks())
}
MAX_BODY_BYTES = 64 * 1024
# Replies that opt out of SMS, and back in, as carriers and Twilio's Advanced Opt-Out know them.
OPT_OUT_KEYWORDS = {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"}
OPT_IN_KEYWORDS = {"START", "UNSTOP", "YES"}
# A reply longer than the longest message is cut there.
MAX_REPLY_CHARACTERS = 1600


def _base(base: str, path: str, destination: pb.Destination) -> str:
    kind = destination.WhichOneof("config") or ""
    url = f"{base.rstrip('/')}/v1/{path}/{kind}/{destination.name.removeprefix('destinations/')}"
    secret = PROVIDERS[kind].path_secret(destination)
    return url if secret is None else f"{url}/{path_token(destination, secret)}"


def receipt_url(base: str, destination: pb.Destination) -> str:
    """Where the destination's provider sends delivery receipts; '' when receipts are not taken."""
    if not base or (destination.WhichOneof("config") or "") not in PROVIDERS:
        return ""
    return _base(base, "receipts", destination)


def reply_url(base: str, destination: pb.Destination) -> str:
    """Where the destination's provider sends replies (STOP); '' when replies are not taken."""
    provider = PROVIDERS.get(destination.WhichOneof("config") or "")
    if not base or provider is None or not provider.takes_replies:
        return ""
    return _base(base, "inbound", destination)


def _bad_request(text: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=text)


class ReceiptServer:
    """The HTTP endpoint providers call with delivery receipts and replies."""

    def __init__(
        self,
        database: Database,
        subjects: Subjects,
        destination_for_receipts: Callable[[uuid.UUID], Any],
        notify_outbox: Callable[[], None],
        public_url: str,
    ) -> None:
        self.database = database
        self.subjects = subjects
        self.destination_for_receipts = destination_for_receipts
        self.notify_outbox = notify_outbox
        self.public_url = public_url.rstrip("/")
        self._runner: web.AppRunner | None = None
        self.sweeper = WakeableLoop("receipt-sweeper", self.sweep, SWEEP_SECONDS)

    async def start(self, host: str, port: int) -> int:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        for path in ("/v1/receipts/{kind}/{destination}", "/v1/receipts/{kind}/{destination}/{token}"):
            app.router.add_post(path, self._receipts)
        for path in ("/v1/inbound/{kind}/{destination}", "/v1/inbound/{kind}/{destination}/{token}"):
            app.router.add_post(path, self._inbound)
        self._runner, taken = await serve(app, host, port)
        self.sweeper.start()
        return taken

    async def stop(self) -> None:
        await self.sweeper.stop()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _receipts(self, request: web.Request) -> web.Response:
        provider, account_id, destination, body = await self._authentic(request)
        try:
            found = provider.receipts(body)
        except ValueError:
            raise _bad_request(f"the body is not a {provider.kind} delivery receipt") from None
        return await self._record(account_id, destination, found)

    async def _inbound(self, request: web.Request) -> web.Response:
        provider, account_id, destination, body = await self._authentic(request)
        if not provider.takes_replies:
            raise web.HTTPNotFound()
        reply = provider.reply(body)
        if reply is not None:
            await self._reply(account_id, destination, reply.phone, reply.text)
        if provider.kind == "twilio":  # TwiML that sends nothing back
            return web.Response(text="<Response></Response>", content_type="text/xml")
        return web.Response(status=200)

    async def _authentic(self, request: web.Request) -> tuple[Callbacks, uuid.UUID, pb.Destination, Body]:
        """The provider, owner, destination and body of a callback whose signature or URL token
        verifies; raises the HTTP answer otherwise."""
        provider = PROVIDERS.get(request.match_info["kind"])
        if provider is None:
            raise web.HTTPNotFound()
        try:
            destination_id = uuid.UUID(request.match_info["destination"])
        except ValueError:
            raise web.HTTPNotFound() from None
        found = await self.destination_for_receipts(destination_id)
        if found is None or found[1].WhichOneof("config") != provider.kind:
            raise web.HTTPNotFound()
        account_id, destination = found
        body = await _body(request)
        secret = provider.path_secret(destination)
        if secret is not None:
            verified = hmac.compare_digest(
                path_token(destination, secret), request.match_info.get("token", "")
            )
        else:
            verified = provider.signed(destination, self._url(request), request.headers, body)
        if not verified:
            log.warning("callback_signature_refused", provider=provider.kind, destination=destination.name)
            raise web.HTTPForbidden(text="signature does not verify")
        return provider, account_id, destination, body

    def _url(self, request: web.Request) -> str:
        """The URL the provider called, as it saw it (behind a proxy, the public base URL)."""
        return f"{self.public_url}{request.path_qs}" if self.public_url else str(request.url)

    async def _reply(self, account_id: uuid.UUID, destination: pb.Destination, phone: str, text: str) -> None:
        """Every reply is published (segmentation records it as the users' Notification Replied).
        A STOP reply opts the phone out of the account's SMS at once (dispatch skips it from its
        next message on) and unsubscribes its users; a START reply lets the phone be texted again."""
        if not E164.match(phone):
            return
        keyword = text.strip().upper()
        replied = events.SmsReplied(
            event_id=str(uuid.uuid4()),
            account=account_name(account_id),
            phone=phone,
            text=text[:MAX_REPLY_CHARACTERS],
            destination=destination.name,
            occur_time=api.timestamp(api.utcnow()),
        )
        async with self.database.transaction() as session:
            await enqueue(
                session, outbox, [OutboxEvent.of(self.subjects.sms_replies, replied, replied.event_id)]
            )
            if keyword in OPT_OUT_KEYWORDS | OPT_IN_KEYWORDS:
                await record_opt_out(session, account_id, phone, opted_out=keyword in OPT_OUT_KEYWORDS)
            if keyword in OPT_OUT_KEYWORDS:
                event = events.SmsOptOut(
                    event_id=str(uuid.uuid4()),
                    account=account_name(account_id),
                    phone=phone,
                    destination=destination.name,
                    occur_time=api.timestamp(api.utcnow()),
                )
                await enqueue(
                    session, outbox, [OutboxEvent.of(self.subjects.sms_opt_outs, event, event.event_id)]
                )
        self.notify_outbox()

    async def _record(
        self, account_id: uuid.UUID, destination: pb.Destination, found: Sequence[Receipt]
    ) -> web.Response:
        final = {r.message_id: r for r in found if r.message_id}
        if not final:
            return web.Response(status=200)  # progress (queued, sent, ...): nothing final yet
        async with self.database.direct_transaction() as connection:
            await _KEEP_RECEIPTS.execute(
                connection,
                destination=destination.name,
                account_id=account_id,
                ids=list(final),
                statuses=[r.status for r in final.values()],
                error_codes=[r.error_code for r in final.values()],
            )
            await apply_receipts(connection, self.subjects, account_id, list(final))
        self.notify_outbox()
        return web.Response(status=200)

    async def sweep(self) -> bool:
        """Applies receipts that arrived while their delivery was being recorded, and forgets
        repeats; True when more may be waiting."""
        async with self.database.direct_transaction() as connection:
            applied = await apply_receipts(connection, self.subjects)
            await FORGET_APPLIED.execute(connection)
        if applied:
            self.notify_outbox()
        return applied >= 1000


async def _body(request: web.Request) -> Body:
    """The callback's body, UTF-8 as a form or JSON; 400 when it is neither."""
    raw = await request.read()
    try:
        text = raw.decode("utf-8")
        if request.content_type == "application/json":
            document = json.loads(text)
            fields = document if isinstance(document, dict) else {}
            params = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
            return Body(params, document)
        params = dict(parse_qsl(text, keep_blank_values=True, errors="strict"))
    except (UnicodeDecodeError, ValueError):
        raise _bad_request("the body is not UTF-8 form fields or JSON") from None
    return Body(params, params)
