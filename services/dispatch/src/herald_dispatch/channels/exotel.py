"""SMS through Exotel: one form POST per message to /v1/Accounts/{AccountSid}/Sms/send.json on
the account's cluster (api.exotel.com in Singapore, api.in.exotel.com in Mumbai), with HTTP
Basic auth (API key and token).

India's DLT ids go as DltEntityId and DltTemplateId. Exotel allows 200 requests a minute; a 429
carries Retry-After and is waited out. Exotel has no idempotency key: a request whose answer was
lost is reported UNKNOWN, not sent again.
"""

from __future__ import annotations

import re

from google.protobuf.message import Message

from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald.events.v1 import events_pb2 as events
from herald_common import channels, sms
from herald_common.errors import Validator
from herald_dispatch.channels import Outcome, SendContext, basic_auth, mask_secret
from herald_dispatch.channels.sms import (
    AnswerTable,
    Meaning,
    SmsProvider,
    Verdict,
    check_with,
    json_object,
)

KIND = channels.for_config("exotel")
CLUSTERS = ("api.exotel.com", "api.in.exotel.com")
INDIA_CLUSTER = "api.in.exotel.com"
DEFAULT_REQUESTS_PER_MINUTE = 200  # Exotel's SMS API limit per account
# An ExoPhone (digits, optionally with +) or a DLT sender header (6 letters).
SENDER = re.compile(r"^(\+?\d{6,15}|[A-Za-z]{6})\Z")


def _auth(config: pb.ExotelConfig) -> dict[str, str]:
    return {"Accept": "application/json", "Authorization": basic_auth(config.api_key, config.api_token)}


ANSWERS = AnswerTable(
    "Exotel",
    {
        200: Meaning.SENT,
        202: Meaning.SENT,
        429: Meaning.THROTTLED,  # past 200 requests a minute: Retry-After says when
        401: Meaning.NOT_SENT,  # the credentials
        402: Meaning.NOT_SENT,  # payment required, or the plan's limit
        403: Meaning.NOT_SENT,
        404: Meaning.NOT_SENT,  # the account's path
        409: Meaning.UNKNOWN,  # "duplicate request": something like it was processed
        # 400 is about the message (a sender or body DLT does not allow): final. 5xx: unknown.
    },
)


def _judge(status: int, text: str) -> Verdict:
    if ANSWERS.meaning(status) is Meaning.SENT:
        message = json_object(text).get("SMSMessage")
        return ANSWERS.verdict(status, message_id=message.get("Sid") if isinstance(message, dict) else "")
    return ANSWERS.verdict(status, reason=_error(status, text))


def _error(status: int, text: str) -> str:
    """Exotel's RestException message, short."""
    exception = json_object(text).get("RestException")
    message = str(exception.get("Message", ""))[:160] if isinstance(exception, dict) else ""
    return f"exotel {status}" + (f": {message}" if message else "")


class ExotelChannel(SmsProvider):
    kind = KIND
    resend_unknown = False

    def validate_config(self, config: Message, field: str, check: Validator) -> list[str]:
        assert isinstance(config, pb.ExotelConfig)
        for name in ("api_key", "api_token", "account_sid"):
            value = getattr(config, name)
            check.require(bool(value.strip()) and len(value) <= 200, f"{field}.{name}", "required")
        check.require(config.subdomain in CLUSTERS, f"{field}.subdomain", f"one of {', '.join(CLUSTERS)}")
        check.require(
            bool(SENDER.match(config.sender)),
            f"{field}.sender",
            "an ExoPhone number or a 6-letter DLT header",
        )
        if config.dlt_entity_id or config.subdomain == INDIA_CLUSTER:
            check.require(
                sms.is_dlt_id(config.dlt_entity_id), f"{field}.dlt_entity_id", "19 digits (required in India)"
            )
        check.require(
            0 <= config.requests_per_minute <= 1_000_000,
            f"{field}.requests_per_minute",
            "0 (200) to 1,000,000",
        )
        return [config.endpoint_url or f"https://{config.subdomain or CLUSTERS[0]}"]

    def requests_per_second(self, destination: pb.Destination) -> int:
        per_minute = destination.exotel.requests_per_minute or DEFAULT_REQUESTS_PER_MINUTE
        return max(per_minute // 60, 1)

    async def check_credentials(self, destination: pb.Destination) -> tuple[bool, str]:
        config = destination.exotel
        base = (config.endpoint_url or f"https://{config.subdomain}").rstrip("/")

        def describe(text: str) -> str:
            account = json_object(text).get("Account")
            status = account.get("Status", "known") if isinstance(account, dict) else "known"
            return f"Exotel account {config.account_sid} is {status}"

        return await check_with(
            self.http, "Exotel", f"{base}/v1/Accounts/{config.account_sid}.json", _auth(config), describe
        )

    def mask(self, config: Message) -> None:
        assert isinstance(config, pb.ExotelConfig)
        config.api_token = mask_secret(config.api_token)

    async def send_one(
        self, context: SendContext, recipient: events.Recipient, phone: str, text: str
    ) -> Outcome:
        """Sends one rendered message to one number."""
        config = context.destination.exotel
        base = (config.endpoint_url or f"https://{config.subdomain}").rstrip("/")
        url = f"{base}/v1/Accounts/{config.account_sid}/Sms/send.json"
        form = {
            "From": config.sender,
            "To": phone,
            "Body": text,
            "EncodingType": "unicode" if sms.measure(text).encoding is sms.Encoding.UCS2 else "plain",
            "CustomField": recipient.delivery_id,
        }
        callback = context.receipt_url
        if callback:
            form["StatusCallback"] = callback
        if config.dlt_entity_id:
            form["DltEntityId"] = config.dlt_entity_id
        if context.campaign.sms.dlt_template_id:
            form["DltTemplateId"] = context.campaign.sms.dlt_template_id
        return await self.post(
            context,
            recipient,
            provider="Exotel",
            url=url,
            form=form,
            headers=_auth(config),
            judge=_judge,
        )
