"""SMS delivery safety: a message a provider may have sent is never sent again, through any
provider; what was proved not sent goes on; opt-outs hold at send time; a stop stops."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.events.v1 import events_pb2 as events
from herald.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from herald_common import clock
from herald_common.bus import Subjects
from herald_sandbox.twilio_api import TwilioApi
from herald_sandbox.vonage_api import VonageApi
from tests.conftest import CLOCK_START, Platform, eventually
from tests.helpers import busiest_second
from tests.test_sms_campaign import (
    SmsAccount,
    _completed,
    _group,
    _publish,
    _sms_campaign,
    _twilio_destination,
    _vonage_destination,
    account,
    twilio,
    vonage,
)

__all__ = ["account", "twilio", "vonage"]  # fixtures


async def test_a_group_never_sends_again_what_its_first_provider_may_have_sent(
    account: SmsAccount, twilio: TwilioApi, vonage: VonageApi
) -> None:
    # Twilio takes messages but answers one after the answer timeout, drops the connection of
    # another, and two more get an edge proxy's 502 and 503; two requests get the edge's 504 and
    # never reach Twilio. None of these answers proves "not sent": nothing fails over to Vonage.
    # Twilio is then asked: the four it made are sent, the two it never saw are sent once now.
    twilio.faults = ["late", "drop", 502, 503]
    twilio.edge_timeouts = 2
    campaign = _sms_campaign(account)
    campaign.destination = await _group(
        account, account.destination, await _vonage_destination(account, vonage)
    )
    stats = await _completed(account, await _publish(account, campaign))
    assert (stats.sent, stats.unknown, stats.failed, stats.skipped) == (30, 0, 0, 8)
    assert vonage.messages == []  # nothing failed over
    phones = [m.to for m in twilio.messages]
    assert sorted(phones) == [f"+1415555{i:04d}" for i in range(30)]  # each phone texted once
    assert twilio.listings >= 6  # each unanswered message was looked up


async def test_a_batch_handed_over_again_leaves_what_waits_to_be_looked_up_to_the_lookup(
    platform: Platform, account: SmsAccount, twilio: TwilioApi, js: JetStreamContext
) -> None:
    # Twilio takes the first message but answers after the answer timeout: it waits to be looked
    # up. Before it is, JetStream hands the batch over again (its acknowledgement was lost, as
    # when NATS restarts): the new attempt sends nothing, and the lookup finds the message sent.
    twilio.faults = ["late"]
    subjects = Subjects(platform.settings.namespace)
    subject = subjects.delivery_batch("twilio", account.destination.removeprefix("destinations/"))
    released: list[bytes] = []  # what the scheduler hands dispatch, heard as it is published

    async def heard(msg: Msg) -> None:
        released.append(msg.data)

    listener = await nats.connect(platform.settings.nats_url)
    await listener.subscribe(subject, cb=heard)
    await listener.flush()
    name = await _publish(account, _sms_campaign(account))

    async def answered_but_one() -> bool:
        stats = await account.clients.campaigns.GetCampaignStats(
            campaign_pb.GetCampaignStatsRequest(name=f"{name}/stats")
        )
        return (stats.sent, stats.skipped, stats.unknown) == (29, 8, 0)

    await eventually(answered_but_one, interval=0.02)
    await listener.close()
    unanswered = twilio.messages[0].to
    [again] = [data for data in released if unanswered.encode() in data]  # its batch
    batch = events.DeliveryBatch.FromString(again)
    stream = subjects.stream("jobs")
    copy = await js.publish(subject, again, headers={"Nats-Msg-Id": batch.batch_id + "-again"})

    async def copy_handled() -> bool:
        consumer = await js.consumer_info(stream, "dispatch-twilio")
        floor = consumer.ack_floor.stream_seq if consumer.ack_floor else 0
        return (floor or 0) >= copy.seq and not consumer.num_ack_pending

    await eventually(copy_handled, interval=0.02)
    stats = await _completed(account, name)
    assert (stats.sent, stats.unknown, stats.skipped) == (30, 0, 8)
    phones = [m.to for m in twilio.messages]
    assert phones.count(unanswered) == 1
    assert sorted(phones) == [f"+1415555{i:04d}" for i in range(30)]


async def test_an_unanswered_message_through_a_provider_that_cannot_be_asked_stays_unknown(
    account: SmsAccount, vonage: VonageApi
) -> None:
    vonage.late_answers = 2  # Vonage takes them, but answers after the answer timeout
    campaign = _sms_campaign(account)
    campaign.destination = await _vonage_destination(account, vonage)
    stats = await _completed(account, await _publish(account, campaign))
    assert (stats.sent, stats.unknown, stats.failed) == (28, 2, 0)
    assert sorted("+" + m.to for m in vonage.messages) == [f"+1415555{i:04d}" for i in range(30)]
    [unknown] = [r for r in stats.failure_reasons if "may have been sent" in r.reason]
    assert "no answer within" in unknown.reason and unknown.count == 2


async def test_a_provider_that_cannot_be_reached_fails_over_and_each_phone_is_texted_once(
    account: SmsAccount, vonage: VonageApi
) -> None:
    with socket.socket() as unused:  # a port nothing listens on: every connection is refused
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    unreachable = await _twilio_destination(account, f"http://127.0.0.1:{closed_port}")
    campaign = _sms_campaign(account)
    campaign.destination = await _group(account, unreachable, await _vonage_destination(account, vonage))
    stats = await _completed(account, await _publish(account, campaign))
    assert (stats.sent, stats.unknown, stats.failed) == (30, 0, 0)
    assert sorted("+" + m.to for m in vonage.messages) == [f"+1415555{i:04d}" for i in range(30)]


async def test_a_vonage_message_partly_accepted_is_never_sent_again(
    account: SmsAccount, vonage: VonageApi
) -> None:
    vonage.partly_accepted = 1  # one two-part message: part 1 accepted, part 2 throttled
    campaign = _sms_campaign(account, body="{{ profile.code }} " + "x" * 200)
    campaign.destination = await _vonage_destination(account, vonage)
    stats = await _completed(account, await _publish(account, campaign))
    assert (stats.sent, stats.failed, stats.unknown) == (29, 1, 0)
    assert len(vonage.messages) == 30  # the partly sent one was not posted again
    assert sorted("+" + m.to for m in vonage.messages) == [f"+1415555{i:04d}" for i in range(30)]
    [partly] = [r for r in stats.failure_reasons if r.reason.startswith("partly sent")]
    assert "accepted 1 of 2 parts" in partly.reason


async def _reply(platform: Platform, account: SmsAccount, twilio: TwilioApi, phone: str, body: str) -> None:
    """`phone` replies `body` to the account's Twilio number, signed as Twilio signs it."""
    destination_id = account.destination.removeprefix("destinations/")
    url = f"http://127.0.0.1:{platform.settings.receipts_port}/v1/inbound/twilio/{destination_id}"
    reply = {"MessageSid": "SM" + "2" * 32, "From": phone, "To": "+14155550000", "Body": body}
    async with aiohttp.ClientSession() as http:
        signature = {"X-Twilio-Signature": twilio.sign(url, reply)}
        async with http.post(url, data=reply, headers=signature) as answer:
            assert answer.status == 200


async def test_a_stop_between_planning_and_release_is_honoured_at_send_time(
    platform: Platform, account: SmsAccount, twilio: TwilioApi, manual_clock: clock.ManualClock
) -> None:
    # Published at 12:00 inside do-not-disturb hours: planned now, released at 13:00.
    quiet = campaign_pb.QuietHours(start="11:00", end="13:00", action=campaign_pb.QUIET_HOURS_ACTION_DELAY)
    campaign = _sms_campaign(account, delivery=campaign_pb.DeliveryPreferences(quiet_hours=quiet))
    name = await _publish(account, campaign)

    async def planned() -> bool:
        runs = await account.clients.scheduler.ListRuns(scheduler_pb.ListRunsRequest(parent=name))
        return bool(runs.runs) and runs.runs[0].waiting == 30

    await eventually(planned)
    await _reply(platform, account, twilio, "+14155550004", "STOP")
    await _reply(platform, account, twilio, "+14155550005", "STOP")
    await _reply(platform, account, twilio, "+14155550005", "START")  # and back in
    manual_clock.advance(CLOCK_START.replace(hour=13, second=1) - manual_clock.now())
    stats = await _completed(account, name)
    assert (stats.sent, stats.skipped, stats.failed, stats.unknown) == (29, 9, 0, 0)
    assert "+14155550004" not in {m.to for m in twilio.messages}
    assert "+14155550005" in {m.to for m in twilio.messages}
    assert {r.reason: r.count for r in stats.failure_reasons}["opted out"] == 1

    # A test message to the phone that opted out is refused too, and reaches no provider.
    sent = await account.clients.campaigns.SendTestMessage(
        campaign_pb.SendTestMessageRequest(campaign=name, phone_numbers=["+14155550004", "+14155559999"])
    )
    assert [(r.sent, r.detail.startswith("opted out")) for r in sent.results] == [
        (False, True),
        (True, False),
    ]
    assert [m.to for m in twilio.messages].count("+14155550004") == 0


async def test_once_stop_campaign_returns_no_new_provider_request_starts(
    account: SmsAccount, twilio: TwilioApi
) -> None:
    twilio.answer_seconds = 0.2  # each answer takes a while, so the stop lands mid-campaign
    name = await _publish(account, _sms_campaign(account))
    await eventually(lambda: _arrived(twilio, 5), interval=0.01)
    await account.clients.campaigns.StopCampaign(campaign_pb.StopCampaignRequest(name=name))
    arrived, in_flight = len(twilio.arrivals), twilio.in_flight
    await asyncio.sleep(1.5)
    late = len(twilio.arrivals) - arrived
    assert late <= in_flight, (late, in_flight)
    stats = await _stopped_stats(account, name)
    # Every user ends with one outcome, and what was not sent is "campaign stopped".
    assert stats.sent + stats.skipped + stats.failed + stats.unknown == 38
    assert stats.sent == len(twilio.messages) < 30
    assert {r.reason: r.count for r in stats.failure_reasons}["campaign stopped"] == 30 - stats.sent


async def _arrived(twilio: TwilioApi, count: int) -> bool:
    return len(twilio.arrivals) >= count


async def _stopped_stats(account: SmsAccount, name: str) -> campaign_pb.CampaignStats:
    async def settled() -> campaign_pb.CampaignStats | None:
        stats = await account.clients.campaigns.GetCampaignStats(
            campaign_pb.GetCampaignStatsRequest(name=f"{name}/stats")
        )
        return stats if stats.sent + stats.skipped + stats.failed + stats.unknown >= 38 else None

    await eventually(settled)
    stats = await settled()
    assert stats is not None
    return stats


async def test_a_provider_limit_holds_in_every_rolling_second(account: SmsAccount, twilio: TwilioApi) -> None:
    campaign = _sms_campaign(account)
    campaign.destination = await _twilio_destination(account, twilio.url, requests_per_second=12)
    stats = await _completed(account, await _publish(account, campaign))
    assert stats.sent == 30
    assert busiest_second(twilio.arrivals) <= 12
