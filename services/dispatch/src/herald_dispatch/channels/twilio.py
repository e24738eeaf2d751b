"""SMS through Twilio Programmable Messaging: one form POST per message to
/2010-04-01/Accounts/{AccountSid}/Messages.json with Basic auth (Account SID and auth token).

Twilio has no idempotency key, so a request whose answer was lost (a timeout, a dropped
connection after sending) is never simply sent again. Twilio can be asked, though: its Message
list, filtered by To and From and read newest first back to the attempt, shows whether such a
message was made. That settles the delivery as sent (with its SID, so its receipts link) or as
not sent, and then it is sent once. A 429 (error 20429) is never processed and is retried with
backoff; other answers are final.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlencode

import aiohttp
from google.protobuf.message import Message

from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald.events.v1 import events_pb2 as events
from herald_common import channels
from herald_common.errors import Validator
from herald_common.sms import E164
from herald_dispatch.channels import UNKNOWN, Outcome, SendContext, Settlement, basic_auth, mask_secret
from herald_dispatch.channels.sms import (
    ALPHANUMERIC_SENDER,
    CANNOT_TELL,
    AnswerTable,
    Lookup,
    Meaning,
    SmsProvider,
    Verdict,
    check_with,
    json_object,
)

KIND = channels.for_config("twilio")
# Looking up an unanswered message: pages of the Message list read at most, their size, how long
# each may take, and how far before the attempt a message may be dated (the clocks may differ).
LOOKUP_MAX_PAGES = 20
LOOKUP_PAGE_SIZE = 100
LOOKUP_TIMEOUT = aiohttp.ClientTimeout(total=15.0)
LOOKUP_CLOCK_MARGIN = timedelta(minutes=5)
DEFAULT_REQUESTS_PER_SECOND = 100
DEFAULT_ENDPOINT = "https://api.twilio.com"
ACCOUNT_SID = re.compile(r"^AC[0-9a-f]{32}\Z")
MESSAGING_SERVICE_SID = re.compile(r"^MG[0-9a-f]{32}\Z")


def sender_problem(sender: str) -> str | None:
    """Why a `From` cannot be a Twilio sender, or None."""
    if E164.match(sender) or ALPHANUMERIC_SENDER.match(sender):
        return None
    return "an E.164 number (+14155550100) or 1-11 letters, digits and spaces with a letter"


# The form fields every message of a destination gives the same value.
_DESTINATION_FIELDS = frozenset({"From", "MessagingServiceSid", "StatusCallback"})


def _auth(config: pb.TwilioConfig) -> dict[str, str]:
    return {"Accept": "application/json", "Authorization": basic_auth(config.account_sid, config.auth_token)}


ANSWERS = AnswerTable(
    "Twilio",
    {
        200: Meaning.SENT,
        201: Meaning.SENT,
        429: Meaning.THROTTLED,  # error 20429: "never processed and always safe to retry"
        401: Meaning.NOT_SENT,  # error 20003: the credentials
        403: Meaning.NOT_SENT,
        404: Meaning.NOT_SENT,  # error 20404: the account's path
        (400, "21606"): Meaning.NOT_SENT,  # the sender cannot send SMS
        (400, "21408"): Meaning.NOT_SENT,  # the account may not send to that region
        (400, "21603"): Meaning.NOT_SENT,  # no sender configured
        # Any other 400 is about the message (error 21211 an invalid number, 21617 too long):
        # final. A 5xx is not documented as "not processed": unknown.
    },
)


def _judge(status: int, text: str) -> Verdict:
    body = json_object(text)
    if ANSWERS.meaning(status) is Meaning.SENT:
        return ANSWERS.verdict(status, message_id=body.get("sid"))
    return ANSWERS.verdict(status, str(body.get("code", "")), reason=_error(status, text))


def _error(status: int, text: str) -> str:
    """Twilio's error code and message, short, from its JSON answer."""
    body = json_object(text)
    code = body.get("code", "")
    message = str(body.get("message", ""))[:160]
    return f"twilio {status}" + (f" error {code}" if code else "") + (f": {message}" if message else "")


def _twilio_time(value: object) -> datetime | None:
    """A Twilio date (RFC 2822, "Mon, 23 Nov 2026 12:00:00 +0000")."""
    try:
        return parsedate_to_datetime(str(value))
    except (TypeError, ValueError):
        return None


class TwilioChannel(SmsProvider):
    kind = KIND
    resend_unknown = False  # Twilio sends twice what is posted twice
    can_settle = True

    def validate_config(self, config: Message, field: str, check: Validator) -> list[str]:
        assert isinstance(config, pb.TwilioConfig)
        check.require(
            bool(ACCOUNT_SID.match(config.account_sid)),
            f"{field}.account_sid",
            "AC followed by 32 hex digits",
        )
        check.require(
            bool(config.auth_token.strip()) and len(config.auth_token) <= 200,
            f"{field}.auth_token",
            "required",
        )
        sender = config.WhichOneof("sender")
        if sender == "from":
            problem = sender_problem(getattr(config, "from"))
            if problem:
                check.add(f"{field}.from", problem)
        elif sender == "messaging_service_sid":
            check.require(
                bool(MESSAGING_SERVICE_SID.match(config.messaging_service_sid)),
                f"{field}.messaging_service_sid",
                "MG followed by 32 hex digits",
            )
        else:
            check.add(f"{field}.sender", "required: from or messaging_service_sid")
        check.require(
            0 <= config.requests_per_second <= 100_000,
            f"{field}.requests_per_second",
            "0 (the default) to 100,000",
        )
        return [config.endpoint_url or DEFAULT_ENDPOINT]

    def requests_per_second(self, destination: pb.Destination) -> int:
        return destination.twilio.requests_per_second or DEFAULT_REQUESTS_PER_SECOND

    async def check_credentials(self, destination: pb.Destination) -> tuple[bool, str]:
        config = destination.twilio
        base = (config.endpoint_url or DEFAULT_ENDPOINT).rstrip("/")

        def describe(text: str) -> str:
            account = json_object(text)
            name = account.get("friendly_name", config.account_sid)
            return f"Twilio account {name} is {account.get('status', 'known')}"

        return await check_with(
            self.http,
            "Twilio",
            f"{base}/2010-04-01/Accounts/{config.account_sid}.json",
            _auth(config),
            describe,
        )

    def mask(self, config: Message) -> None:
        assert isinstance(config, pb.TwilioConfig)
        config.auth_token = mask_secret(config.auth_token)

    async def look_up(self, destination: pb.Destination, phone: str, text: str, since: datetime) -> Lookup:
        """Reads the account's messages to `phone` (from the destination's sender), newest first,
        back to `since` (less a margin for clocks), for one with `text`. The list is not filtered
        by DateSent: a message still queued has none yet."""
        config = destination.twilio
        base = (config.endpoint_url or DEFAULT_ENDPOINT).rstrip("/")
        query = {"To": phone, "PageSize": str(LOOKUP_PAGE_SIZE)}
        if config.WhichOneof("sender") == "from":
            query["From"] = getattr(config, "from")
        url: str | None = f"{base}/2010-04-01/Accounts/{config.account_sid}/Messages.json?{urlencode(query)}"
        oldest = since - LOOKUP_CLOCK_MARGIN
        for _ in range(LOOKUP_MAX_PAGES):
            assert url is not None
            page = await self._get_json(url, _auth(config))
            if page is None:
                return CANNOT_TELL
            messages = page.get("messages")
            for message in messages if isinstance(messages, list) else []:
                created = _twilio_time(message.get("date_created"))
                if created is None:
                    return CANNOT_TELL
                if created < oldest:
                    return Lookup(sent=False)  # newest first: the rest are older still
                if message.get("body") == text and str(message.get("direction", "")).startswith("outbound"):
                    return Lookup(sent=True, message_id=str(message.get("sid", "")))
            following = page.get("next_page_uri")
            if not following:
                return Lookup(sent=False)
            url = base + str(following)
        return CANNOT_TELL

    async def _get_json(self, url: str, headers: dict[str, str]) -> dict[str, Any] | None:
        try:
            async with self.http.get(
                url, headers=headers, timeout=LOOKUP_TIMEOUT, allow_redirects=False
            ) as response:
                if response.status != 200:
                    return None
                return json_object(await response.text())
        except (TimeoutError, aiohttp.ClientError):
            return None

    async def send_one(
        self, context: SendContext, recipient: events.Recipient, phone: str, text: str
    ) -> Outcome:
        """Sends one rendered message to one number; an unanswered one waits to be looked up."""
        outcome = await self._post_one(context, recipient, phone, text)
        if outcome.status == UNKNOWN:
            return dataclasses.replace(outcome, settle=Settlement(context.destination.name, phone, text))
        return outcome

    async def _post_one(
        self, context: SendContext, recipient: events.Recipient, phone: str, text: str
    ) -> Outcome:
        config = context.destination.twilio
        base = (config.endpoint_url or DEFAULT_ENDPOINT).rstrip("/")
        form = {"To": phone, "Body": text}
        callback = context.receipt_url
        if callback:
            form["StatusCallback"] = callback
        if config.WhichOneof("sender") == "messaging_service_sid":
            form["MessagingServiceSid"] = config.messaging_service_sid
        else:
            form["From"] = getattr(config, "from")
        return await self.post(
            context,
            recipient,
            provider="Twilio",
            url=f"{base}/2010-04-01/Accounts/{config.account_sid}/Messages.json",
            form=form,
            repeated_form_fields=_DESTINATION_FIELDS,
            headers=_auth(config),
            judge=_judge,
        )
