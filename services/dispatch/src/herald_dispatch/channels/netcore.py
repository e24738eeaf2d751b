"""SMS through Netcore's bulk push API: one form POST per message to /BulkSms/SingleMsgApi with the
feed id, username and password in the form, the number as digits without `+`, the text and the
sender id, and India's DLT ids as `entityid` and `templateid` (Netcore's Single Message API
reference, emaildocs.netcorecloud.com/reference/single-message-api). A text that needs UCS-2 goes
with `unicode=1` [unverified: Netcore's public reference names no encoding parameter; this is the
flag its integrations are seen to send]. A +91 number is not sent to without both DLT ids.

Netcore answers in XML. Its exact schema is not published; a `REQUEST-ERROR` or `ERROR` element
means the message was refused (its CODE and DESC are the reason), anything else with HTTP 200 that
it was accepted, with the request id (`REQID`) as the message id. Netcore has no idempotency key:
a request whose answer was lost is reported UNKNOWN, not sent again.
"""

from __future__ import annotations

import re
from xml.etree import ElementTree

from google.protobuf.message import Message

from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald.events.v1 import events_pb2 as events
from herald_common import channels, sms
from herald_common.errors import Validator
from herald_dispatch.channels import FAILED, CannotCheck, Outcome, SendContext, mask_secret
from herald_dispatch.channels.sms import (
    AnswerTable,
    Meaning,
    SmsProvider,
    Verdict,
    dlt_missing,
)

KIND = channels.for_config("netcore")
DEFAULT_ENDPOINT = "https://bulkpush.mytoday.com"
DEFAULT_REQUESTS_PER_SECOND = 50
SENDER = re.compile(r"^[A-Za-z]{6}\Z")


ANSWERS = AnswerTable(
    "Netcore",
    {
        (200, "accepted"): Meaning.SENT,
        # Netcore's error codes are not published, so none is known to be the account's rather
        # than the message's: they are final, not failed over.
        (200, "error"): Meaning.FINAL,
        429: Meaning.THROTTLED,
        401: Meaning.NOT_SENT,
        403: Meaning.NOT_SENT,
        # A 200 that is not XML proves nothing: unknown.
    },
)


def _judge(status: int, text: str) -> Verdict:
    if status != 200:
        return ANSWERS.verdict(status, reason=f"netcore answered HTTP {status}")
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError:
        return ANSWERS.verdict(status, "unreadable", reason="netcore answered something other than XML")
    error = root.find(".//ERROR")
    if error is not None or root.tag in ("ERROR", "REQUEST-ERROR"):
        found = error if error is not None else root
        code, desc = found.findtext("CODE", ""), found.findtext("DESC", "")
        return ANSWERS.verdict(status, "error", reason=f"netcore error {code}: {desc}"[:200])
    return ANSWERS.verdict(status, "accepted", message_id=root.get("REQID") or root.findtext(".//REQID"))


class NetcoreChannel(SmsProvider):
    kind = KIND
    resend_unknown = False

    def validate_config(self, config: Message, field: str, check: Validator) -> list[str]:
        assert isinstance(config, pb.NetcoreConfig)
        for name in ("feed_id", "username", "password"):
            value = getattr(config, name)
            check.require(bool(value.strip()) and len(value) <= 200, f"{field}.{name}", "required")
        check.require(bool(SENDER.match(config.sender)), f"{field}.sender", "a 6-letter DLT sender id")
        if config.dlt_entity_id:
            check.require(sms.is_dlt_id(config.dlt_entity_id), f"{field}.dlt_entity_id", "19 digits")
        return [config.endpoint_url or DEFAULT_ENDPOINT]

    def requests_per_second(self, destination: pb.Destination) -> int:
        return DEFAULT_REQUESTS_PER_SECOND

    async def check_credentials(self, destination: pb.Destination) -> tuple[bool, str]:
        raise CannotCheck("Netcore's bulk push API has no way to check credentials without sending")

    def mask(self, config: Message) -> None:
        assert isinstance(config, pb.NetcoreConfig)
        config.password = mask_secret(config.password)

    async def send_one(
        self, context: SendContext, recipient: events.Recipient, phone: str, text: str
    ) -> Outcome:
        """Sends one rendered message to one number."""
        config = context.destination.netcore
        template_id = context.campaign.sms.dlt_template_id
        missing = dlt_missing(phone, config.dlt_entity_id, template_id)
        if missing:  # another provider of a group may carry the ids
            return Outcome(recipient, FAILED, 0, f"netcore: {missing}", failover=True)
        form = {
            "feedid": config.feed_id,
            "username": config.username,
            "password": config.password,
            "To": phone.removeprefix("+"),
            "Text": text,
            "senderid": config.sender,
            "async": "0",
        }
        if config.dlt_entity_id:
            form["entityid"] = config.dlt_entity_id
        if template_id:
            form["templateid"] = template_id
        if sms.measure(text).encoding is sms.Encoding.UCS2:
            form["unicode"] = "1"
        return await self.post(
            context,
            recipient,
            provider="Netcore",
            url=(config.endpoint_url or DEFAULT_ENDPOINT).rstrip("/") + "/BulkSms/SingleMsgApi",
            form=form,
            headers={"Accept": "application/xml"},
            judge=_judge,
        )
