"""SMS through the Vonage (Nexmo) SMS API: one form POST per message to /sms/json with the
account's api_key and api_secret in the body.

Vonage answers 200 to almost everything and puts the outcome in each message part's `status`:
"0" accepted; "1" throttled (sent faster than the account's 30 requests per second), which waits
and tries again without counting against the message; any other status is final, with Vonage's
error text. Vonage has no idempotency key: a request whose answer was lost is reported UNKNOWN,
not sent again. The delivery id goes out as `client-ref`.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any
from urllib.parse import urlencode

from google.protobuf.message import Message

from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald.events.v1 import events_pb2 as events
from herald_common import channels, sms
from herald_common.errors import Validator
from herald_dispatch.channels import FAILED, Outcome, SendContext, mask_secret
from herald_dispatch.channels.sms import (
    ALPHANUMERIC_SENDER,
    AnswerTable,
    Meaning,
    SmsProvider,
    Verdict,
    check_with,
    dlt_missing,
    json_object,
)

KIND = channels.for_config("vonage")
DEFAULT_REQUESTS_PER_SECOND = 30
DEFAULT_ENDPOINT = "https://rest.nexmo.com"
API_KEY = re.compile(r"^[A-Za-z0-9]{8}\Z")
API_SECRET = re.compile(r"^[A-Za-z0-9]{16}\Z")
NUMBER_SENDER = re.compile(r"^\+?[1-9]\d{6,14}\Z")
MAX_CLIENT_REF = 40
# Vonage answers 200 and a status per message part; each status's meaning, from its API
# specification's error list.
ANSWERS = AnswerTable(
    "Vonage",
    {
        (200, "0"): Meaning.SENT,
        (200, "1"): Meaning.THROTTLED,  # faster than the account's limit: not accepted
        429: Meaning.THROTTLED,
        401: Meaning.NOT_SENT,
        403: Meaning.NOT_SENT,
        # The account's or Vonage's: credentials, internal error, barred account, no credit, too
        # many binds, HTTP not enabled, a bad signature, the sender, demo mode, sig with secret.
        **{
            (200, code): Meaning.NOT_SENT for code in ("4", "5", "8", "9", "10", "11", "14", "15", "29", "32")
        },
        # The message's: missing or invalid parameters, an unknown prefix, a barred number, too
        # long, a bad network code or callback, a de-activated number.
        **{(200, code): Meaning.FINAL for code in ("2", "3", "6", "7", "12", "22", "23", "33")},
        # A status Vonage does not document, or a 200 without parts, proves nothing: unknown.
    },
)


def client_ref(delivery_id: str) -> str:
    """The delivery id as Vonage's `client-ref`, which holds at most 40 characters: longer ids
    go as a digest of them."""
    if len(delivery_id) <= MAX_CLIENT_REF:
        return delivery_id
    return hashlib.sha256(delivery_id.encode()).hexdigest()[:MAX_CLIENT_REF]


def sender_problem(sender: str) -> str | None:
    if NUMBER_SENDER.match(sender) or ALPHANUMERIC_SENDER.match(sender):
        return None
    return "an E.164 number or 1-11 letters, digits and spaces with a letter"


def _judge(status: int, text: str) -> Verdict:
    if status != 200:
        return ANSWERS.verdict(status, reason=f"vonage answered HTTP {status}")
    parts = _parts(text)
    if not parts:
        return ANSWERS.verdict(status, "no parts", reason="vonage answered without message parts")
    accepted = [p for p in parts if str(p.get("status")) == "0"]
    refused = [p for p in parts if str(p.get("status")) != "0"]
    if not refused:  # receipts come per part; the first stands for all
        return ANSWERS.verdict(status, "0", message_id=accepted[0].get("message-id"))
    code = str(refused[0].get("status"))
    reason = f"vonage status {code}: {str(refused[0].get('error-text', ''))[:160]}"
    if accepted:
        # Some parts went out: sending the message again would repeat them, so it ends here.
        reason = f"partly sent: vonage accepted {len(accepted)} of {len(parts)} parts; {reason}"
        return Verdict(Meaning.FINAL, str(accepted[0].get("message-id", "")), reason)
    return ANSWERS.verdict(status, code, reason=reason)


def _parts(text: str) -> list[dict[str, Any]]:
    parts = json_object(text).get("messages")
    return [p for p in parts if isinstance(p, dict)] if isinstance(parts, list) else []


class VonageChannel(SmsProvider):
    kind = KIND
    resend_unknown = False  # Vonage sends twice what is posted twice

    def validate_config(self, config: Message, field: str, check: Validator) -> list[str]:
        assert isinstance(config, pb.VonageConfig)
        check.require(bool(API_KEY.match(config.api_key)), f"{field}.api_key", "8 letters and digits")
        check.require(
            bool(API_SECRET.match(config.api_secret)), f"{field}.api_secret", "16 letters and digits"
        )
        problem = sender_problem(config.sender)
        if problem:
            check.add(f"{field}.sender", problem)
        check.require(
            len(config.signature_secret) <= 200, f"{field}.signature_secret", "at most 200 characters"
        )
        if config.dlt_entity_id:
            check.require(sms.is_dlt_id(config.dlt_entity_id), f"{field}.dlt_entity_id", "19 digits")
        check.require(
            0 <= config.requests_per_second <= 100_000,
            f"{field}.requests_per_second",
            "0 (the default) to 100,000",
        )
        return [config.endpoint_url or DEFAULT_ENDPOINT]

    def requests_per_second(self, destination: pb.Destination) -> int:
        return destination.vonage.requests_per_second or DEFAULT_REQUESTS_PER_SECOND

    async def check_credentials(self, destination: pb.Destination) -> tuple[bool, str]:
        config = destination.vonage
        base = (config.endpoint_url or DEFAULT_ENDPOINT).rstrip("/")
        query = urlencode({"api_key": config.api_key, "api_secret": config.api_secret})

        def describe(text: str) -> str:
            value = json_object(text).get("value")
            return (
                f"Vonage balance {float(value):.2f}"
                if isinstance(value, int | float)
                else "Vonage account known"
            )

        return await check_with(self.http, "Vonage", f"{base}/account/get-balance?{query}", {}, describe)

    def mask(self, config: Message) -> None:
        assert isinstance(config, pb.VonageConfig)
        config.api_secret = mask_secret(config.api_secret)
        if config.signature_secret:
            config.signature_secret = mask_secret(config.signature_secret)

    def _form(
        self, context: SendContext, recipient: events.Recipient, phone: str, text: str
    ) -> dict[str, str]:
        config = context.destination.vonage
        form = {
            "api_key": config.api_key,
            "api_secret": config.api_secret,
            "from": config.sender.removeprefix("+"),
            "to": phone.removeprefix("+"),
            "text": text,
            "type": "unicode" if sms.measure(text).encoding is sms.Encoding.UCS2 else "text",
            "client-ref": client_ref(recipient.delivery_id),
        }
        callback = context.receipt_url
        if callback:
            form["callback"] = callback
        if config.dlt_entity_id:
            form["entity-id"] = config.dlt_entity_id
        if context.campaign.sms.dlt_template_id:
            form["content-id"] = context.campaign.sms.dlt_template_id
        return form

    async def send_one(
        self, context: SendContext, recipient: events.Recipient, phone: str, text: str
    ) -> Outcome:
        """Sends one rendered message to one number."""
        config = context.destination.vonage
        missing = dlt_missing(phone, config.dlt_entity_id, context.campaign.sms.dlt_template_id)
        if missing:  # another provider of a group may carry the ids
            return Outcome(recipient, FAILED, 0, f"vonage: {missing}", failover=True)
        return await self.post(
            context,
            recipient,
            provider="Vonage",
            url=(config.endpoint_url or DEFAULT_ENDPOINT).rstrip("/") + "/sms/json",
            form=self._form(context, recipient, phone, text),
            headers={"Accept": "application/json"},
            judge=_judge,
        )
