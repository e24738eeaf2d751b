"""Providers' delivery receipts and inbound replies: an HTTP endpoint for their callbacks, checked,
recorded once, and reported to the campaign service (receipts) or segmentation (STOP replies).

Each provider calls `/v1/receipts/{provider}/{destination id}` (Exotel and MSG91, which sign
nothing, with a token derived from the destination's secret in the path). A receipt whose signature does not
verify gets 403 and changes nothing. Only final statuses count (delivered, undelivered, failed);
the first one recorded for a message wins, so a repeated receipt changes nothing, and a receipt
that arrives before its delivery is recorded waits in `receipts` and is applied when it is (by
the recording itself, or by a sweep every few seconds when the two crossed).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald.events.v1 import events_pb2 as events
from herald_common import api
from herald_common.auth import account_name
from herald_common.bus import Subjects
from herald_common.db import Database
from herald_common.logging import get_logger
from herald_common.loops import WakeableLoop
from herald_common.outbox import OutboxEvent, enqueue
from herald_common.sms import E164
from herald_dispatch.gate import record_opt_out
from herald_dispatch.storage import outbox, receipts

log = get_logger(__name__)
ReceiptStatus = events.ReceiptStatus
_STATUS_NAMES = {
    ReceiptStatus.RECEIPT_STATUS_DELIVERED: "delivered",
    ReceiptStatus.RECEIPT_STATUS_UNDELIVERED: "undelivered",
    ReceiptStatus.RECEIPT_STATUS_FAILED: "failed",
}
_BY_NAME = {name: status for status, name in _STATUS_NAMES.items()}
# Each provider's final statuses; the others (queued, sent, accepted, buffered, ...) are progress.
TWILIO_STATUSES = {"delivered": "delivered", "undelivered": "undelivered", "failed": "failed"}
VONAGE_STATUSES = {
    "delivered": "delivered",
    "expired": "undelivered",
    "rejected": "failed",
    "failed": "failed",
}
EXOTEL_STATUSES = {
    "delivered": "delivered",
    "undelivered": "undelivered",
    "expired": "undelivered",
    "failed": "failed",
}
# MSG91's DLR status numbers; the others (submitted, pending, ...) are progress.
MSG91_STATUSES = {
    "1": "delivered",
    "2": "undelivered",
    "9": "failed",  # NDNC: the number is on India's do-not-call registry (promotional)
    "16": "failed",  # rejected
    "17": "failed",  # blocked number
    "25": "failed",  # rejected
}
# Kinds whose receipts come to a secret path, and the secret each path token derives from.
_PATH_SECRETS: dict[str, Callable[[pb.Destination], str]] = {
    "exotel": lambda d: d.exotel.api_token,
    "msg91": lambda d: d.msg91.authkey,
}
_SIGNED = ("twilio", "vonage")

_APPLY = """
    WITH applied AS (
        UPDATE dispatch.deliveries d SET receipt_status = r.status
        FROM dispatch.receipts r
        WHERE r.account_id = d.account_id AND r.provider_message_id = d.provider_message_id
          AND d.receipt_status IS NULL AND {which}
        RETURNING d.delivery_id, d.user_id, d.campaign, d.account_id, r.status, r.error_code,
                  r.destination AS receipt_destination, r.provider_message_id AS receipt_message
    ), handled AS (
        DELETE FROM dispatch.receipts r USING applied a
        WHERE r.destination = a.receipt_destination AND r.provider_message_id = a.receipt_message
    )
    SELECT * FROM applied
"""
# Receipts of these messages (the ledger, as it records sent deliveries).
_APPLY_MESSAGES = sa.text(
    _APPLY.format(which="d.account_id = :account_id AND d.provider_message_id = ANY(CAST(:ids AS text[]))")
)
# Any waiting receipt (the sweeper, for receipts that raced their delivery's recording).
_APPLY_WAITING = sa.text(
    _APPLY.format(
        which="(r.destination, r.provider_message_id) IN "
        "(SELECT destination, provider_message_id FROM dispatch.receipts LIMIT 1000)"
    )
)
# Repeats of receipts already applied, and receipts of messages never recorded here.
_FORGET = sa.text(
    """
    DELETE FROM dispatch.receipts r
    WHERE EXISTS (SELECT 1 FROM dispatch.deliveries d
                  WHERE d.account_id = r.account_id AND d.provider_message_id = r.provider_message_id
                    AND d.receipt_status IS NOT NULL)
       OR r.received_at < now() - interval '7 days'
    """
)
SWEEP_SECONDS = 2.0


async def apply_receipts(
    session: AsyncSession,
    subjects: Subjects,
    account_id: uuid.UUID | None = None,
    message_ids: Sequence[str] = (),
) -> int:
    """Gives recorded deliveries the receipts waiting for their messages (these messages of the
    account, or any), once each, and reports them in DeliveryReceipts events (one per campaign)
    in the same transaction."""
    if account_id is None:
        applied = (await session.execute(_APPLY_WAITING)).all()
    else:
        applied = (
            await session.execute(_APPLY_MESSAGES, {"account_id": account_id, "ids": list(message_ids)})
        ).all()
    by_campaign: dict[tuple[str, uuid.UUID], list[events.ReceiptResult]] = defaultdict(list)
    for row in applied:
        by_campaign[(row.campaign, row.account_id)].append(
            events.ReceiptResult(
                delivery_id=row.delivery_id,
                user_id=row.user_id,
                status=_BY_NAME[row.status],
                error_code=row.error_code,
            )
        )
    queued = []
    for (campaign, owner), results in by_campaign.items():
        event = events.DeliveryReceipts(
            event_id=str(uuid.uuid4()), account=account_name(owner), campaign=campaign, results=results
        )
        queued.append(OutboxEvent.of(subjects.delivery_receipts, event, event.event_id))
    await enqueue(session, outbox, queued)
    return len(applied)


def twilio_signature(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    """X-Twilio-Signature: base64 HMAC-SHA1, keyed by the auth token, of the full URL followed by
    every POST parameter's name and value in name order."""
    payload = url + "".join(f"{key}{value}" for key, value in sorted(params.items()))
    digest = hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def vonage_signature(secret: str, params: Mapping[str, str]) -> str:
    """Vonage's MD5 hash signature: `&name=value` for every parameter but `sig`, in name order
    (`&` and `=` in values as `_`), followed by the signature secret."""
    pairs = "".join(
        f"&{key}={value.replace('&', '_').replace('=', '_')}"
        for key, value in sorted(params.items())
        if key != "sig"
    )
    return hashlib.md5((pairs + secret).encode()).hexdigest()


def path_token(destination: pb.Destination) -> str:
    """The secret path part of the receipt URL of a provider that signs nothing (Exotel, MSG91):
    derived from the destination's own secret, so it changes when that secret does."""
    kind = destination.WhichOneof("config") or ""
    key = _PATH_SECRETS[kind](destination).encode()
    return hmac.new(key, destination.name.encode(), hashlib.sha256).hexdigest()[:32]


def receipt_url(base: str, destination: pb.Destination) -> str:
    """Where the destination's provider sends delivery receipts; '' when receipts are not taken."""
    kind = destination.WhichOneof("config") or ""
    if not base or kind not in (*_SIGNED, *_PATH_SECRETS):
        return ""
    url = f"{base.rstrip('/')}/v1/receipts/{kind}/{destination.name.removeprefix('destinations/')}"
    return f"{url}/{path_token(destination)}" if kind in _PATH_SECRETS else url


def reply_url(base: str, destination: pb.Destination) -> str:
    """Where the destination's provider sends replies (STOP); '' when replies are not taken."""
    kind = destination.WhichOneof("config") or ""
    if not base or kind not in _SIGNED:
        return ""
    return f"{base.rstrip('/')}/v1/inbound/{kind}/{destination.name.removeprefix('destinations/')}"


@dataclass(frozen=True)
class Receipt:
    message_id: str
    status: str  # delivered, undelivered or failed
    error_code: str


def _twilio(params: Mapping[str, str]) -> Receipt | None:
    status = TWILIO_STATUSES.get(params.get("MessageStatus", ""))
    code = params.get("ErrorCode", "")
    return Receipt(params.get("MessageSid", ""), status, f"twilio {code}" if code else "") if status else None


def _vonage(params: Mapping[str, str]) -> Receipt | None:
    status = VONAGE_STATUSES.get(params.get("status", ""))
    code = params.get("err-code", "0")
    error = f"vonage {code}" if code not in ("", "0") else ""
    return Receipt(params.get("messageId", ""), status, error) if status else None


def _exotel(params: Mapping[str, str]) -> Receipt | None:
    status = EXOTEL_STATUSES.get(params.get("Status", "").lower())
    code = params.get("DetailedStatusCode", "")
    error = f"exotel {code}" if code and status != "delivered" else ""
    return Receipt(params.get("SmsSid", ""), status, error) if status else None


def _msg91(payload: object) -> list[Receipt]:
    """MSG91's DLR webhook, any version: a list (or one) of requests, each a `requestId` with its
    `report` of per-number statuses (or the status fields beside it); `data` may wrap it."""
    if isinstance(payload, dict) and "data" in payload:
        payload = payload["data"]
        if isinstance(payload, str):
            payload = json.loads(payload)
    found = []
    for request in payload if isinstance(payload, list) else [payload]:
        if not isinstance(request, dict):
            continue
        reports = request.get("report")
        for report in reports if isinstance(reports, list) else [request]:
            code = str(report.get("status", "")) if isinstance(report, dict) else ""
            status = MSG91_STATUSES.get(code)
            if status:
                error = f"msg91 {code}" if status != "delivered" else ""
                found.append(Receipt(str(request.get("requestId", "")), status, error))
    return found


class ReceiptServer:
    """The HTTP endpoint providers call with delivery receipts."""

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
        self._sweeper = WakeableLoop("receipt-sweeper", self.sweep, SWEEP_SECONDS)

    async def start(self, host: str, port: int) -> int:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_post("/v1/receipts/twilio/{destination}", self._twilio)
        app.router.add_post("/v1/receipts/vonage/{destination}", self._vonage)
        app.router.add_post("/v1/receipts/exotel/{destination}/{token}", self._exotel)
        app.router.add_post("/v1/receipts/msg91/{destination}/{token}", self._msg91)
        app.router.add_post("/v1/inbound/twilio/{destination}", self._twilio_inbound)
        app.router.add_post("/v1/inbound/vonage/{destination}", self._vonage_inbound)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self._sweeper.start()
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def stop(self) -> None:
        await self._sweeper.stop()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _destination(self, request: web.Request, kind: str) -> tuple[uuid.UUID, pb.Destination]:
        try:
            destination_id = uuid.UUID(request.match_info["destination"])
        except ValueError:
            raise web.HTTPNotFound() from None
        found = await self.destination_for_receipts(destination_id)
        if found is None or found[1].WhichOneof("config") != kind:
            raise web.HTTPNotFound()
        return found  # type: ignore[no-any-return]

    def _url(self, request: web.Request) -> str:
        """The URL the provider called, as it saw it (behind a proxy, the public base URL)."""
        return f"{self.public_url}{request.path_qs}" if self.public_url else str(request.url)

    async def _with_path_token(
        self, request: web.Request, kind: str
    ) -> tuple[uuid.UUID, pb.Destination] | None:
        """(owner, destination) of a callback to a secret path; None when the token is wrong."""
        account_id, destination = await self._destination(request, kind)
        if not hmac.compare_digest(path_token(destination), request.match_info["token"]):
            log.warning("callback_signature_refused", provider=kind, destination=destination.name)
            return None
        return account_id, destination

    async def _params(self, request: web.Request) -> dict[str, str]:
        if request.content_type == "application/json":
            body = await request.json()
            return {str(k): str(v) for k, v in body.items()} if isinstance(body, dict) else {}
        return {k: str(v) for k, v in (await request.post()).items()}

    async def _signed_twilio(
        self, request: web.Request
    ) -> tuple[uuid.UUID, pb.Destination, dict[str, str]] | None:
        """(owner, destination, parameters) of a Twilio callback; None when its signature fails."""
        account_id, destination = await self._destination(request, "twilio")
        params = await self._params(request)
        expected = twilio_signature(destination.twilio.auth_token, self._url(request), params)
        if not hmac.compare_digest(expected, request.headers.get("X-Twilio-Signature", "")):
            log.warning("callback_signature_refused", provider="twilio", destination=destination.name)
            return None
        return account_id, destination, params

    async def _signed_vonage(
        self, request: web.Request
    ) -> tuple[uuid.UUID, pb.Destination, dict[str, str]] | None:
        """(owner, destination, parameters) of a Vonage callback; None when its signature fails."""
        account_id, destination = await self._destination(request, "vonage")
        params = await self._params(request)
        secret = destination.vonage.signature_secret
        if secret and not hmac.compare_digest(
            vonage_signature(secret, params), params.get("sig", "").lower()
        ):
            log.warning("callback_signature_refused", provider="vonage", destination=destination.name)
            return None
        return account_id, destination, params

    async def _twilio(self, request: web.Request) -> web.Response:
        signed = await self._signed_twilio(request)
        if signed is None:
            return _forbidden()
        account_id, destination, params = signed
        return await self._record(account_id, destination, [_twilio(params)])

    async def _vonage(self, request: web.Request) -> web.Response:
        signed = await self._signed_vonage(request)
        if signed is None:
            return _forbidden()
        account_id, destination, params = signed
        return await self._record(account_id, destination, [_vonage(params)])

    async def _twilio_inbound(self, request: web.Request) -> web.Response:
        """A reply to one of the account's Twilio numbers; TwiML that sends nothing back."""
        signed = await self._signed_twilio(request)
        if signed is None:
            return _forbidden()
        account_id, destination, params = signed
        await self._reply(account_id, destination, params.get("From", ""), params.get("Body", ""))
        return web.Response(text="<Response></Response>", content_type="text/xml")

    async def _vonage_inbound(self, request: web.Request) -> web.Response:
        signed = await self._signed_vonage(request)
        if signed is None:
            return _forbidden()
        account_id, destination, params = signed
        phone = "+" + params.get("msisdn", "").lstrip("+")
        await self._reply(account_id, destination, phone, params.get("text", ""))
        return web.Response(status=200)

    async def _reply(self, account_id: uuid.UUID, destination: pb.Destination, phone: str, body: str) -> None:
        """A STOP reply opts the phone out of the account's SMS at once (dispatch skips it from its
        next message on) and unsubscribes its users; a START reply lets the phone be texted again."""
        keyword = body.strip().upper()
        if not E164.match(phone) or keyword not in OPT_OUT_KEYWORDS | OPT_IN_KEYWORDS:
            return
        async with self.database.transaction() as session:
            await record_opt_out(session, account_id, phone, opted_out=keyword in OPT_OUT_KEYWORDS)
            if keyword in OPT_OUT_KEYWORDS:
                await enqueue(session, outbox, [self._opt_out_event(account_id, destination, phone)])
        self.notify_outbox()

    def _opt_out_event(self, account_id: uuid.UUID, destination: pb.Destination, phone: str) -> OutboxEvent:
        event = events.SmsOptOut(
            event_id=str(uuid.uuid4()),
            account=account_name(account_id),
            phone=phone,
            destination=destination.name,
            occur_time=api.timestamp(api.utcnow()),
        )
        return OutboxEvent.of(self.subjects.sms_opt_outs, event, event.event_id)

    async def _exotel(self, request: web.Request) -> web.Response:
        found = await self._with_path_token(request, "exotel")
        if found is None:
            return _forbidden()
        return await self._record(*found, [_exotel(await self._params(request))])

    async def _msg91(self, request: web.Request) -> web.Response:
        found = await self._with_path_token(request, "msg91")
        if found is None:
            return _forbidden()
        try:
            if request.content_type == "application/json":
                payload = await request.json()
            else:
                payload = {k: str(v) for k, v in (await request.post()).items()}
            found_receipts = _msg91(payload)
        except ValueError:
            return web.Response(status=400, text="the body is not an MSG91 delivery report")
        return await self._record(*found, found_receipts)

    async def _record(
        self, account_id: uuid.UUID, destination: pb.Destination, found: Sequence[Receipt | None]
    ) -> web.Response:
        final = {r.message_id: r for r in found if r is not None and r.message_id}
        if not final:
            return web.Response(status=200)  # progress (queued, sent, ...): nothing final yet
        rows = [
            {
                "destination": destination.name,
                "provider_message_id": r.message_id,
                "account_id": account_id,
                "status": r.status,
                "error_code": r.error_code,
            }
            for r in final.values()
        ]
        async with self.database.transaction() as session:
            await session.execute(insert(receipts).values(rows).on_conflict_do_nothing())
            await apply_receipts(session, self.subjects, account_id, list(final))
        self.notify_outbox()
        return web.Response(status=200)

    async def sweep(self) -> bool:
        """Applies receipts that arrived while their delivery was being recorded, and forgets
        repeats; True when more may be waiting."""
        async with self.database.transaction() as session:
            applied = await apply_receipts(session, self.subjects)
            await session.execute(_FORGET)
        if applied:
            self.notify_outbox()
        return applied >= 1000


def _forbidden() -> web.Response:
    return web.Response(status=403, text="signature does not verify")


# Replies that opt out of SMS, as carriers and Twilio's Advanced Opt-Out recognise them.
OPT_OUT_KEYWORDS = {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"}
# Replies that opt back in, as carriers and Twilio recognise them.
OPT_IN_KEYWORDS = {"START", "UNSTOP", "YES"}
