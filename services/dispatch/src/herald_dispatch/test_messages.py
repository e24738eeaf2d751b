"""Test messages: rendered SMS texts sent through a destination now, outside every campaign's
stats and ledger, each provider's answer returned as it comes."""

from __future__ import annotations

import uuid
from typing import cast

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald.events.v1 import events_pb2 as events
from herald_common import api, sms
from herald_common.auth import current_account_id
from herald_common.errors import Validator, invalid
from herald_common.sms import E164
from herald_dispatch.channels import SENT
from herald_dispatch.channels.sms import SmsChannel
from herald_dispatch.destinations import Destinations
from herald_dispatch.gate import SendGate
from herald_dispatch.ratelimit import SharedRateLimiter

MAX_TEST_MESSAGES = 5


class TestMessages:
    def __init__(self, destinations: Destinations, limiter: SharedRateLimiter, gate: SendGate) -> None:
        self.destinations = destinations
        self.limiter = limiter
        self.gate = gate

    async def send(self, request: pb.SendTestMessagesRequest) -> list[pb.TestMessageAnswer]:
        check = Validator()
        check.require(
            1 <= len(request.messages) <= MAX_TEST_MESSAGES, "messages", f"1 to {MAX_TEST_MESSAGES} messages"
        )
        for i, message in enumerate(request.messages):
            check.require(bool(E164.match(message.phone)), f"messages[{i}].phone", "an E.164 number")
            check.require(
                len(message.text.strip()) > 0 and len(message.text) <= sms.MAX_BODY_CHARACTERS,
                f"messages[{i}].text",
                f"1 to {sms.MAX_BODY_CHARACTERS:,} characters",
            )
        if request.dlt_template_id:
            check.require(sms.is_dlt_id(request.dlt_template_id), "dlt_template_id", "19 digits")
        check.raise_if_any()
        account_id = current_account_id()
        destination = await self.destinations.load(
            request.destination, "destination", account_id, reveal_secrets=True
        )
        channel = self.destinations.channel_of(destination)
        if channel is None or channel.kind.content_field != "sms":
            raise invalid("destination", f"{request.destination} is not an SMS destination")
        provider = cast(SmsChannel, channel)

        async def wanted() -> bool:
            return True

        async def waiting(_: str | None) -> None:
            return None

        context = self.destinations.send_context(
            account_id,
            destination,
            provider,
            self.limiter,
            campaign=campaign_pb.Campaign(
                sms=campaign_pb.SmsContent(dlt_template_id=request.dlt_template_id)
            ),
            plan_time=api.utcnow(),
            wanted=wanted,
            waiting=waiting,
            receipts=False,  # a test message counts nowhere
        )
        tests = [
            (events.Recipient(delivery_id=f"test-{uuid.uuid4().hex}", user_id="test"), message)
            for message in request.messages
        ]
        opted_out = await self.gate.opted_out(account_id, [m.phone for m in request.messages])
        answers = []
        for test, message in tests:
            if message.phone in opted_out:
                answers.append(pb.TestMessageAnswer(sent=False, detail="opted out: the phone replied STOP"))
                continue
            outcome = await provider.send_one(context, test, message.phone, message.text)
            sent = outcome.status == SENT
            answers.append(
                pb.TestMessageAnswer(
                    sent=sent, detail=outcome.provider_message_id if sent else outcome.reason
                )
            )
        return answers
