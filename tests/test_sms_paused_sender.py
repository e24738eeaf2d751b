"""A dispatch process paused between its last "may I still send" and the moment its request is
written (getting a connection, building the request) must not text a phone on waking once the
batch was taken over or the campaign stopped meanwhile: its successor may already have asked the
provider, found nothing, and sent. The pause is made real: the process blocks, as under SIGSTOP,
as the SMS client starts the request, after the last look and before the write."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald.events.v1 import events_pb2 as events
from herald_common.db import Database, make_engine, migrate
from herald_common.netguard import NetworkPolicy
from herald_common.settings import Settings
from herald_dispatch import main as dispatch_main
from herald_dispatch.channels import SENT, SKIPPED, SendContext
from herald_dispatch.channels.twilio import TwilioChannel
from herald_dispatch.gate import STALE_ADMISSION_SECONDS, Admission, Sender, SendGate, Superseded
from herald_dispatch.ledger import SETTLING
from herald_dispatch.provider_http import ProviderHttp, RequestObserver
from herald_dispatch.storage import SCHEMA
from herald_sandbox.twilio_api import TwilioApi
from tests.harness import fresh_settings

ACCOUNT_SID = "AC" + "1" * 32
AUTH_TOKEN = "t" * 32
PAUSE_SECONDS = STALE_ADMISSION_SECONDS + 0.5


class PausedOnce:
    """Blocks the whole process for `seconds` as each of the first `count` requests starts (a
    request observer of the SMS client, told before it takes a connection)."""

    def __init__(self, count: int, seconds: float) -> None:
        self.left = count
        self.seconds = seconds

    def started(self, method: str, url: str) -> None:
        if self.left:
            self.left -= 1
            time.sleep(self.seconds)  # the loop stands still, as when the process is stopped

    def ended(self, token: Any, status: int) -> None:
        return None

    def failed(self, token: Any, error: BaseException) -> None:
        return None


def _messages(*observers: RequestObserver) -> ProviderHttp:
    return ProviderHttp(NetworkPolicy(["127.0.0.0/8"]), observers)


@pytest.fixture
async def twilio() -> AsyncIterator[tuple[TwilioApi, str]]:
    api = TwilioApi(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN)
    url = await api.start()
    try:
        yield api, url
    finally:
        await api.stop()


def _context(url: str, wanted: Any) -> SendContext:
    config = dispatch_pb.TwilioConfig(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, endpoint_url=url)
    setattr(config, "from", "Herald")  # `from` is a Python keyword

    async def permit() -> float:
        return time.monotonic() + 1.0

    async def waiting(_: str | None) -> None:
        return None

    campaign = campaign_pb.Campaign(name="campaigns/paused")
    campaign.sms.body = "Your order shipped"
    return SendContext(
        destination=dispatch_pb.Destination(name="destinations/twilio", twilio=config),
        campaign=campaign,
        plan_time=datetime.now(UTC),
        account_id=uuid.uuid4(),
        permit=permit,
        request_slots=asyncio.Semaphore(16),
        wanted=wanted,
        waiting=waiting,
    )


def _recipients(count: int) -> list[events.Recipient]:
    return [
        events.Recipient(
            delivery_id=f"d{i}",
            user_id=f"u{i}",
            attributes_json=f'{{"phone": "+1415555{i:04d}"}}'.encode(),
        )
        for i in range(count)
    ]


class Wanted:
    """The campaign's answer to "may I still send": counts how often it is asked, and answers
    `answer` (or raises it: the batch was taken over)."""

    def __init__(self, answer: bool | Exception) -> None:
        self.answer = answer
        self.times = 0

    async def __call__(self) -> bool:
        self.times += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


async def _deliver(url: str, wanted: Any, pause: PausedOnce, count: int) -> list[Any]:
    messages = _messages(pause)
    async with aiohttp.ClientSession() as http:
        try:
            return await TwilioChannel(http, messages).deliver(_context(url, wanted), _recipients(count))
        finally:
            await messages.close()


async def test_a_sender_paused_before_its_write_sends_nothing_once_its_batch_was_taken_over(
    twilio: tuple[TwilioApi, str],
) -> None:
    api, url = twilio
    # While this process stood still another replica took the batch over.
    wanted = Wanted(Superseded("taken over by attempt 2"))
    with pytest.raises(Superseded):
        await _deliver(url, wanted, PausedOnce(1, PAUSE_SECONDS), 1)
    assert api.messages == [], "a paused sender wrote its request after its batch was taken over"
    assert wanted.times == 1


async def test_a_sender_paused_before_its_write_skips_what_a_stop_halted_meanwhile(
    twilio: tuple[TwilioApi, str],
) -> None:
    api, url = twilio
    stopped = Wanted(False)  # StopCampaign came while this process stood still
    outcomes = await _deliver(url, stopped, PausedOnce(1, PAUSE_SECONDS), 1)
    assert [(o.status, o.reason, o.attempts) for o in outcomes] == [(SKIPPED, "campaign stopped", 0)]
    assert api.messages == []


async def test_a_sender_paused_before_its_write_sends_once_when_still_wanted(
    twilio: tuple[TwilioApi, str],
) -> None:
    api, url = twilio
    wanted = Wanted(True)
    outcomes = await _deliver(url, wanted, PausedOnce(1, PAUSE_SECONDS), 3)
    assert sorted((o.recipient.delivery_id, o.status, o.attempts) for o in outcomes) == [
        ("d0", SENT, 1),
        ("d1", SENT, 1),
        ("d2", SENT, 1),
    ]
    assert sorted(m.to for m in api.messages) == ["+14155550000", "+14155550001", "+14155550002"]
    # Only what the pause made stale was confirmed again: by the paused sender, or by one whose
    # turn came after the pause.
    assert 1 <= wanted.times <= 3


async def test_a_sender_paused_past_its_rate_slot_sends_in_a_later_one(
    twilio: tuple[TwilioApi, str],
) -> None:
    # Its slot lets it write up to 50 ms late; paused longer (its confirmation still fresh), it
    # writes nothing then, and sends once in the next slot: a late request never lands beside the
    # next slot's, over the provider's limit.
    api, url = twilio
    slots: list[float] = []

    async def permit() -> float:
        slots.append(time.monotonic())
        return slots[-1] + 0.05

    messages = _messages(PausedOnce(1, 0.3))
    context = dataclasses.replace(_context(url, Wanted(True)), permit=permit)
    async with aiohttp.ClientSession() as http:
        try:
            outcomes = await TwilioChannel(http, messages).deliver(context, _recipients(1))
        finally:
            await messages.close()
    assert [(o.status, o.attempts) for o in outcomes] == [(SENT, 1)]
    assert [m.to for m in api.messages] == ["+14155550000"]
    assert len(slots) == 2  # the slot it was paused through, and the one it wrote in


async def test_an_unpaused_sender_asks_nothing_more_than_its_wave(
    twilio: tuple[TwilioApi, str],
) -> None:
    api, url = twilio
    wanted = Wanted(True)
    outcomes = await _deliver(url, wanted, PausedOnce(0, 0.0), 20)
    assert {o.status for o in outcomes} == {SENT} and len(api.messages) == 20
    assert wanted.times == 0


async def test_a_sender_paused_while_its_wave_was_admitted_confirms_before_sending(
    twilio: tuple[TwilioApi, str],
) -> None:
    """The wave's admission counts from when it was asked for: a pause while its answer was on the
    way leaves it stale, however fresh the answer looks on waking."""
    api, url = twilio

    async def admit(_: str, wave: Any) -> Admission:
        answer = Admission(admitted=frozenset(entry[0] for entry in wave))
        time.sleep(PAUSE_SECONDS)  # noqa: ASYNC251 - stopped after the database answered
        return answer

    messages = _messages()
    async with aiohttp.ClientSession() as http:
        context = dataclasses.replace(_context(url, Wanted(Superseded("taken over"))), admit=admit)
        with pytest.raises(Superseded):
            await TwilioChannel(http, messages).deliver(context, _recipients(2))
    await messages.close()
    assert api.messages == []


async def test_dispatch_refuses_a_settle_delay_within_a_senders_confirmation() -> None:
    """Looking an unanswered message up sooner than a sender may still write it could find it not
    sent, send it, and then see the first request arrive too."""
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql+asyncpg://nowhere/x",
            "NATS_URL": "nats://nowhere:1",
            "HERALD_SMS_SETTLE_SECONDS": str(STALE_ADMISSION_SECONDS),
        }
    )
    with pytest.raises(RuntimeError, match="HERALD_SMS_SETTLE_SECONDS must be over"):
        await dispatch_main.start(settings)


async def test_a_settler_whose_lease_is_running_out_sends_nothing_more(servers: tuple[str, str]) -> None:
    """The settler holds the unanswered deliveries it looks up by a lease, not by attempt number:
    once the lease would run out before a request confirmed now is written, another settler may
    claim them, ask the provider and send, so this one is refused."""
    async with fresh_settings(*servers) as settings:
        database = Database(make_engine(settings.database_url, pool_size=1, max_overflow=0))
        try:
            await migrate(database.engine, SCHEMA, dispatch_main.MIGRATIONS)
            gate = SendGate(database)
            lapsing = Sender(
                uuid.uuid4(),
                "campaigns/c",
                "batch-1",
                SETTLING,
                fenced=False,
                held_until=time.monotonic() + STALE_ADMISSION_SECONDS / 2,
            )
            wave = [("d1", "+14155550001", "u1")]
            assert (await gate.admit(lapsing, "destinations/d", wave)).superseded
            with pytest.raises(Superseded):
                await gate.may_send(lapsing)
            holding = dataclasses.replace(lapsing, held_until=time.monotonic() + 60)
            assert (await gate.admit(holding, "destinations/d", wave)).admitted == {"d1"}
            assert await gate.may_send(holding)
        finally:
            await database.dispose()
