"""SMS through a provider group: each message goes to the group's first provider, and what that
provider fails in a way another could fix goes on to the next, with the same delivery id. A
message's own final error (an invalid number, a rejected template) stays final."""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from datetime import datetime

from google.protobuf.message import Message

from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald.events.v1 import events_pb2 as events
from herald_common import channels
from herald_common.errors import Validator
from herald_dispatch.channels import FAILED, CannotCheck, Outcome, SendContext
from herald_dispatch.channels.sms import CANNOT_TELL, Lookup, SmsChannel

KIND = channels.for_config("sms_provider_group")
MIN_MEMBERS, MAX_MEMBERS = 2, 5
DESTINATION_NAME = re.compile(r"^destinations/[0-9a-f-]{36}\Z")


class ProviderGroupChannel:
    kind = KIND
    resend_unknown = False
    can_settle = False  # its members settle what went through them

    def __init__(self, providers: Sequence[SmsChannel]) -> None:
        self.providers = {int(p.kind.destination_enum): p for p in providers}

    def validate_config(self, config: Message, field: str, check: Validator) -> list[str]:
        """The members' shape; that each is an SMS provider of the account is checked on save."""
        assert isinstance(config, pb.SmsProviderGroupConfig)
        members = list(config.destinations)
        check.require(
            MIN_MEMBERS <= len(members) <= MAX_MEMBERS,
            f"{field}.destinations",
            f"{MIN_MEMBERS} to {MAX_MEMBERS} SMS provider destinations",
        )
        for i, name in enumerate(members):
            check.require(
                bool(DESTINATION_NAME.match(name)),
                f"{field}.destinations[{i}]",
                "must look like destinations/<id>",
            )
            check.require(name not in members[:i], f"{field}.destinations[{i}]", "appears twice")
        return []

    def is_provider(self, destination: pb.Destination) -> bool:
        return int(destination.type) in self.providers

    def requests_per_second(self, destination: pb.Destination) -> int:
        return 1_000_000  # the group calls nothing itself; each member keeps its own limit

    async def check_credentials(self, destination: pb.Destination) -> tuple[bool, str]:
        raise CannotCheck("a provider group is checked member by member")

    def mask(self, config: Message) -> None:
        """Nothing secret: the members hold the credentials."""

    async def look_up(self, destination: pb.Destination, phone: str, text: str, since: datetime) -> Lookup:
        return CANNOT_TELL

    async def send_one(
        self, context: SendContext, recipient: events.Recipient, phone: str, text: str
    ) -> Outcome:
        """One message through the members in turn, as far as failover takes it."""
        assert context.destination_named is not None and context.permit_for is not None
        permit_for = context.permit_for
        members = list(context.destination.sms_provider_group.destinations)
        outcome = Outcome(recipient, FAILED, 0, "the group has no SMS provider")
        for name in members:
            member = await context.destination_named(name)
            provider = self.providers.get(int(member.type))
            if provider is None:
                continue
            permit = functools.partial(permit_for, name, provider.requests_per_second(member))
            outcome = await provider.send_one(
                dataclasses.replace(context, destination=member, permit=permit), recipient, phone, text
            )
            if not outcome.failover:
                break
        return outcome

    async def deliver(self, context: SendContext, recipients: Sequence[events.Recipient]) -> list[Outcome]:
        assert context.destination_named is not None and context.permit_for is not None
        permit_for = context.permit_for
        members = list(context.destination.sms_provider_group.destinations)
        outcomes: list[Outcome] = []
        pending = list(recipients)
        for i, name in enumerate(members):
            last = i == len(members) - 1
            member = await context.destination_named(name)
            provider = self.providers.get(int(member.type))
            if provider is None:  # changed since the group was saved
                if last:
                    outcomes += [Outcome(r, FAILED, 0, f"{name} is not an SMS provider") for r in pending]
                continue
            permit = functools.partial(permit_for, name, provider.requests_per_second(member))
            through = dataclasses.replace(context, destination=member, permit=permit)
            results = await provider.deliver(through, pending)
            outcomes += [o for o in results if last or not o.failover]
            pending = [o.recipient for o in results if o.failover and not last]
            if not pending:
                break
        return outcomes
