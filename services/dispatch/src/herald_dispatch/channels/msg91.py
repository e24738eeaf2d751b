"""SMS through MSG91's flow API: one JSON POST per message to /api/v5/flow with the `authkey`
header. MSG91 sends a template made in its panel (mapped there to the DLT template); Herald's
rendered body goes in as the template's one variable (`body_variable`, VAR1 by default), so the
flow template is registered as `##VAR1##`. The number goes as digits without `+`.

MSG91 answers `{"type": "success", "message": <request id>}` or `{"type": "error", "message":
...}`; a refused IP (418) or key fails over in a group. No idempotency key: a request whose
answer was lost is reported UNKNOWN, not sent again.
"""

from __future__ import annotations

import re

from google.protobuf.message import Message

from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald.events.v1 import events_pb2 as events
from herald_common import channels, sms
from herald_common.errors import Validator
from herald_dispatch.channels import CannotCheck, Outcome, SendContext, mask_secret
from herald_dispatch.channels.sms import (
    AnswerTable,
    Meaning,
    SmsProvider,
    Verdict,
    json_object,
)

KIND = channels.for_config("msg91")
DEFAULT_ENDPOINT = "https://control.msg91.com"
DEFAULT_REQUESTS_PER_SECOND = 50
SENDER = re.compile(r"^[A-Za-z]{6}\Z")
TEMPLATE_ID = re.compile(r"^[0-9a-f]{24}\Z")
VARIABLE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,29}\Z")


ANSWERS = AnswerTable(
    "MSG91",
    {
        (200, "success"): Meaning.SENT,
        (200, "error"): Meaning.FINAL,  # refused, with MSG91's reason
        429: Meaning.THROTTLED,
        401: Meaning.NOT_SENT,  # the authkey
        403: Meaning.NOT_SENT,
        418: Meaning.NOT_SENT,  # the calling IP is not whitelisted
        # Any other answer, a 200 without a type included, proves nothing: unknown.
    },
)


def _judge(status: int, text: str) -> Verdict:
    answer = json_object(text)
    kind = str(answer.get("type", ""))
    reason = f"msg91 {status}: {str(answer.get('message', ''))[:160]}".rstrip(": ")
    if ANSWERS.meaning(status, kind) is Meaning.SENT:
        return ANSWERS.verdict(status, kind, message_id=answer.get("message"))
    return ANSWERS.verdict(status, kind, reason=reason)


class Msg91Channel(SmsProvider):
    kind = KIND
    resend_unknown = False

    def validate_config(self, config: Message, field: str, check: Validator) -> list[str]:
        assert isinstance(config, pb.Msg91Config)
        check.require(
            bool(config.authkey.strip()) and len(config.authkey) <= 200, f"{field}.authkey", "required"
        )
        check.require(bool(SENDER.match(config.sender)), f"{field}.sender", "a 6-letter DLT sender id")
        check.require(len(config.route) <= 20, f"{field}.route", "at most 20 characters")
        check.require(
            bool(TEMPLATE_ID.match(config.flow_template_id)), f"{field}.flow_template_id", "24 hex digits"
        )
        if config.body_variable:
            check.require(
                bool(VARIABLE.match(config.body_variable)),
                f"{field}.body_variable",
                "a template variable name",
            )
        if config.dlt_entity_id:
            check.require(sms.is_dlt_id(config.dlt_entity_id), f"{field}.dlt_entity_id", "19 digits")
        return [config.endpoint_url or DEFAULT_ENDPOINT]

    def requests_per_second(self, destination: pb.Destination) -> int:
        return DEFAULT_REQUESTS_PER_SECOND

    async def check_credentials(self, destination: pb.Destination) -> tuple[bool, str]:
        raise CannotCheck("MSG91's flow API has no way to check an authkey without sending")

    def mask(self, config: Message) -> None:
        assert isinstance(config, pb.Msg91Config)
        config.authkey = mask_secret(config.authkey)

    async def send_one(
        self, context: SendContext, recipient: events.Recipient, phone: str, text: str
    ) -> Outcome:
        """Sends one rendered message to one number."""
        config = context.destination.msg91
        body: dict[str, object] = {
            "template_id": config.flow_template_id,
            "short_url": "0",
            "sender": config.sender,
            "recipients": [{"mobiles": phone.removeprefix("+"), config.body_variable or "VAR1": text}],
        }
        if config.route:
            body["route"] = config.route
        if sms.measure(text).encoding is sms.Encoding.UCS2:
            body["unicode"] = "1"
        return await self.post(
            context,
            recipient,
            provider="MSG91",
            url=(config.endpoint_url or DEFAULT_ENDPOINT).rstrip("/") + "/api/v5/flow",
            json_body=body,
            headers={"authkey": config.authkey, "accept": "application/json"},
            judge=_judge,
        )
