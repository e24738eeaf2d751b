"""Dispatch's channel registry: how each kind of destination is configured and sent to.

A channel module declares one `Channel`; registering it here is all dispatch needs to validate
and mask its destinations, run its worker type and deliver its batches.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import aiohttp
from google.protobuf.message import Message

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald.events.v1 import events_pb2 as events
from herald_common.channels import ChannelKind
from herald_common.db import Database
from herald_common.errors import Validator
from herald_dispatch.gate import Admission, WaveEntry
from herald_dispatch.provider_http import ProviderHttp

SENT = events.DeliveryStatus.DELIVERY_STATUS_SENT
FAILED = events.DeliveryStatus.DELIVERY_STATUS_FAILED
SKIPPED = events.DeliveryStatus.DELIVERY_STATUS_SKIPPED
UNKNOWN = events.DeliveryStatus.DELIVERY_STATUS_UNKNOWN


@dataclass(frozen=True)
class Settlement:
    """An unanswered message a provider can be asked about later: the destination it went to,
    the phone and the text."""

    provider_destination: str
    phone: str
    text: str


@dataclass(frozen=True)
class Outcome:
    """The final result of one delivery."""

    recipient: events.Recipient
    status: events.DeliveryStatus.ValueType
    attempts: int = 0
    reason: str = ""
    resent: bool = False
    # Another provider could succeed where this one failed (in a provider group, the next is tried).
    failover: bool = False
    # The provider's id of the message it accepted: its delivery receipts name it.
    provider_message_id: str = ""
    # An UNKNOWN outcome the provider can settle: the delivery waits to be looked up instead of
    # ending unknown.
    settle: Settlement | None = None


@dataclass
class SendContext:
    """What a channel may use while it sends one batch."""

    destination: pb.Destination
    campaign: campaign_pb.Campaign
    plan_time: datetime
    account_id: uuid.UUID
    # Waits for the destination's shared rate limit before each request; answers the latest
    # (monotonic) time the request may still go out in its slot.
    permit: Callable[[], Awaitable[float]]
    # Held from before a request's permit until its answer: as many as the HTTP client has
    # connections, so a request never waits for a connection after its rate-limit slot (it would
    # go out late, bunched with later ones).
    request_slots: asyncio.Semaphore
    # False once the campaign was stopped: the channel skips what it has not sent yet.
    wanted: Callable[[], Awaitable[bool]]
    # Tells the campaign a destination holds deliveries back (reason) or flows again (None).
    waiting: Callable[[str | None], Awaitable[None]]
    # Deliveries attempted before a crash and sent again (de-duplicated by the destination).
    resent: set[str] = field(default_factory=set)
    # The batch's run (`campaigns/{campaign}/runs/{run}`).
    run: str = ""
    # Another destination of the account, with its secrets (the members of a provider group).
    destination_named: Callable[[str], Awaitable[pb.Destination]] | None = None
    # Waits for another destination's shared rate limit: (destination name, requests per second).
    permit_for: Callable[[str, int], Awaitable[float]] | None = None
    # Whether providers are asked to send delivery receipts (to `destination.receipt_url`).
    receipts: bool = True
    # Asked before each wave of messages to providers that cannot de-duplicate, with the provider's
    # destination and the wave's messages: whether the campaign was halted and which phones opted
    # out; the intent to send the others is recorded.
    admit: Callable[[str, Sequence[WaveEntry]], Awaitable[Admission]] | None = None
    # True once this process is shutting down: the channel takes no new recipient, and those it
    # has not reached get no outcome (the batch is handed back to another replica).
    draining: Callable[[], bool] = lambda: False
    # True once this process heard the campaign was halted: a request admitted before is skipped.
    halted: Callable[[], bool] = lambda: False

    @property
    def receipt_url(self) -> str:
        """The callback URL to give the provider with each message ('' for none)."""
        return self.destination.receipt_url if self.receipts else ""


class Channel(Protocol):
    kind: ChannelKind
    # Whether a delivery attempted before a crash, with no recorded result, is sent again: true
    # when the destination de-duplicates by our delivery id, else it is reported UNKNOWN.
    resend_unknown: bool

    def validate_config(self, config: Message, field: str, check: Validator) -> list[str]:
        """Checks a config; returns the URLs it will call, for the network policy."""
        ...

    def mask(self, config: Message) -> None:
        """Hides the config's secrets before it leaves the service."""
        ...

    def requests_per_second(self, destination: pb.Destination) -> int:
        """At most this many requests per second to the destination, across every replica."""
        ...

    async def check_credentials(self, destination: pb.Destination) -> tuple[bool, str]:
        """(accepted?, what the provider said) for the destination's credentials, sending
        nothing; CannotCheck when the provider offers no way to."""
        ...

    async def deliver(self, context: SendContext, recipients: Sequence[events.Recipient]) -> list[Outcome]:
        """Sends to every recipient and returns one outcome for each."""
        ...


class CannotCheck(Exception):
    """The provider cannot check credentials without sending a message."""


@functools.lru_cache(maxsize=1024)  # made for every message of a destination
def basic_auth(user: str, password: str) -> str:
    """An HTTP Basic Authorization header value."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def mask_secret(secret: str) -> str:
    return "*" * max(len(secret) - 4, 4) + secret[-4:] if len(secret) > 4 else "****"


def registry(
    http: aiohttp.ClientSession,
    messages: ProviderHttp,
    *,
    answer_timeout_seconds: float,
    database: Database | None = None,
) -> dict[str, Channel]:
    """Every channel, by destination type, sending through `http`, SMS messages through
    `messages`; SMS providers have `answer_timeout_seconds` to answer each message; web pop-ups
    go to `database`."""
    from herald_dispatch.channels.exotel import ExotelChannel
    from herald_dispatch.channels.mparticle import MparticleChannel
    from herald_dispatch.channels.msg91 import Msg91Channel
    from herald_dispatch.channels.netcore import NetcoreChannel
    from herald_dispatch.channels.provider_group import ProviderGroupChannel
    from herald_dispatch.channels.segment import SegmentChannel
    from herald_dispatch.channels.sms import SmsChannel
    from herald_dispatch.channels.twilio import TwilioChannel
    from herald_dispatch.channels.vonage import VonageChannel
    from herald_dispatch.channels.web_popup import WebPopupChannel

    providers: list[SmsChannel] = [
        TwilioChannel(http, messages, answer_timeout_seconds=answer_timeout_seconds),
        VonageChannel(http, messages, answer_timeout_seconds=answer_timeout_seconds),
        ExotelChannel(http, messages, answer_timeout_seconds=answer_timeout_seconds),
        NetcoreChannel(http, messages, answer_timeout_seconds=answer_timeout_seconds),
        Msg91Channel(http, messages, answer_timeout_seconds=answer_timeout_seconds),
    ]
    channels: list[Channel] = [
        SegmentChannel(http),
        MparticleChannel(http),
        *providers,
        ProviderGroupChannel(providers),
        WebPopupChannel(database),
    ]
    return {channel.kind.destination_type: channel for channel in channels}
