"""Events Herald records itself (Notification Delivered, Notification Replied, Control Group, App
Version Changed) are events like any other: segments count them and live campaigns trigger on
them, an mParticle export of an SMS campaign's delivery receipts among them."""

from __future__ import annotations

import aiohttp
import nats.errors
from nats.js import JetStreamContext

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.events.v1 import events_pb2
from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_common.bus import Subjects
from herald_common.live import (
    APP_VERSION_CHANGED,
    CONTROL_GROUP,
    NOTIFICATION_DELIVERED,
    NOTIFICATION_REPLIED,
)
from herald_sandbox.mparticle_api import MparticleApi, customer_id
from herald_sandbox.twilio_api import TwilioApi
from herald_segmentation.events import OwnEvent
from herald_segmentation.system_events import _calls
from tests.conftest import Platform, eventually
from tests.helpers import completed_stats, condition, live_run
from tests.test_mparticle_export import _destination, mparticle
from tests.test_sms_campaign import SmsAccount, _publish, _receipts, _sms_campaign, account, twilio

__all__ = ["account", "mparticle", "twilio"]  # fixtures


async def _count(account: SmsAccount, name: str, *where: pb.PropertyCondition) -> int:
    """How many users did the event (with these properties) exactly once."""
    once = pb.CountCondition(operator=pb.OPERATOR_EQUALS, value=1)
    did = pb.Condition(event=pb.EventCondition(event_name=name, where=list(where), count=once))
    audience = pb.Audience(filter=pb.SegmentFilter(all_of=[did]))
    return (
        await account.clients.segmentation.EstimateReach(pb.EstimateReachRequest(audience=audience))
    ).user_count


async def _counts(account: SmsAccount, name: str, expected: int, *where: pb.PropertyCondition) -> None:
    async def reached() -> bool:
        return await _count(account, name, *where) == expected

    await eventually(reached)


async def test_a_live_mparticle_campaign_exports_an_sms_campaigns_delivery_receipts(
    account: SmsAccount, twilio: TwilioApi, mparticle: MparticleApi
) -> None:
    twilio.undelivered = {"+14155550007", "+14155550008", "+14155550009"}
    texts = await account.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=_sms_campaign(account))
    )
    delivered = campaign_pb.LiveEvent(
        event_name=NOTIFICATION_DELIVERED, where=[condition("campaign", "EQUALS", texts.name)]
    )
    export = campaign_pb.Campaign(
        display_name="Delivered texts to mParticle",
        destination=(await _destination(account.clients, mparticle)).name,
        schedule=campaign_pb.Schedule(
            live=campaign_pb.Live(
                trigger=campaign_pb.LiveTrigger(action=campaign_pb.ActionTrigger(event=delivered))
            )
        ),
        mparticle_export=campaign_pb.MparticleExportContent(event_name="SMS delivered"),
    )
    created = await account.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=export)
    )
    assert created.warnings == []  # Herald's own events need not have been seen
    await account.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    await eventually(lambda: live_run(account.clients, created.name))
    await account.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=texts.name))
    stats = await _receipts(account, texts.name, 30)
    assert stats.receipts.delivered == 27

    async def exported() -> bool:
        return len(mparticle.batches) >= 27

    await eventually(exported)
    undelivered = {f"{account.tag}-{i:02d}" for i in (7, 8, 9)}
    expected = {f"{account.tag}-{i:02d}" for i in range(30)} - undelivered
    assert sorted(customer_id(b) for b in mparticle.batches.values()) == sorted(expected)
    await _counts(account, NOTIFICATION_DELIVERED, 27, condition("campaign", "EQUALS", texts.name))


async def _published(platform: Platform, js: JetStreamContext, owner: str, subject: str) -> list[bytes]:
    """Every message `owner`'s stream holds on `subject`, as it was published."""
    subjects = Subjects(platform.settings.namespace)
    subscription = await js.pull_subscribe(subject, stream=subjects.stream(owner))
    found: list[bytes] = []
    try:
        while True:
            try:
                messages = await subscription.fetch(100, timeout=1)
            except nats.errors.TimeoutError:
                return found
            found += [message.data for message in messages]
    finally:
        await subscription.unsubscribe()


async def _announced(platform: Platform, js: JetStreamContext) -> list[pb.Event]:
    """Every event the segmentation service has announced as recorded (EventsIngested)."""
    subject = Subjects(platform.settings.namespace).events_ingested
    return [
        event
        for data in await _published(platform, js, "segmentation", subject)
        for event in events_pb2.EventsIngested.FromString(data).events
    ]


async def _held_back(account: SmsAccount) -> tuple[str, int]:
    """An SMS campaign with a 40% control group, completed, and how many it held back (each of
    whom did Control Group)."""
    held_back = _sms_campaign(account, targeting=campaign_pb.Targeting(control_group_percent=40))
    name = await _publish(account, held_back)
    stats = await completed_stats(account.clients, name)
    control = {r.reason: r.count for r in stats.failure_reasons}["control group"]
    assert control > 0
    await _counts(account, CONTROL_GROUP, control, condition("campaign", "EQUALS", name))
    return name, control


async def test_control_users_replies_and_new_app_versions_are_recorded_as_events(
    platform: Platform, account: SmsAccount, twilio: TwilioApi, js: JetStreamContext
) -> None:
    name, control = await _held_back(account)
    announced = [
        e
        for e in await _announced(platform, js)
        if e.name == CONTROL_GROUP and e.user_id.startswith(account.tag)
    ]
    assert len(announced) == control
    for event in announced:
        delivery_id = event.properties.fields["delivery_id"].string_value
        assert event.client_event_id == f"herald:control-group:{delivery_id}"
        assert dict(event.properties) == {"campaign": name, "delivery_id": delivery_id}
        assert event.time.seconds > 0

    destination_id = account.destination.removeprefix("destinations/")
    url = f"http://127.0.0.1:{platform.settings.receipts_port}/v1/inbound/twilio/{destination_id}"
    reply = {
        "MessageSid": "SM" + "2" * 32,
        "From": "+14155550004",
        "To": "+14155550000",
        "Body": "Which store?",
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, data=reply, headers={"X-Twilio-Signature": twilio.sign(url, reply)}) as answer,
    ):
        assert answer.status == 200
    await _counts(account, NOTIFICATION_REPLIED, 1, condition("text", "EQUALS", "Which store?"))

    phone = pb.User(user_id=f"{account.tag}-00")
    phone.devices.add(device_id="d1", platform=pb.PLATFORM_IOS, app_version="5.1.0")
    await account.clients.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=[phone]))
    phone.devices[0].app_version = "5.2.0"
    await account.clients.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=[phone]))
    await account.clients.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=[phone]))  # unchanged
    await _counts(
        account,
        APP_VERSION_CHANGED,
        1,
        condition("previous_version", "EQUALS", "5.1.0"),
        condition("app_version", "EQUALS", "5.2.0"),
    )
    events = await account.clients.segmentation.DescribeEvent(
        pb.DescribeEventRequest(event_name=APP_VERSION_CHANGED)
    )
    assert set(events.property_types) == {"device_id", "previous_version", "app_version"}


async def _reports_of(platform: Platform, js: JetStreamContext, campaign: str) -> list[bytes]:
    """The outcome reports dispatch published for the campaign, as they were published."""
    subject = Subjects(platform.settings.namespace).delivery_outcomes
    published = await _published(platform, js, "dispatch", subject)
    return [data for data in published if events_pb2.DeliveryOutcomes.FromString(data).campaign == campaign]


async def test_outcome_reports_handed_over_again_record_their_events_once(
    platform: Platform, account: SmsAccount, twilio: TwilioApi, js: JetStreamContext
) -> None:
    # A report's events are recorded once by the report's id: every report of a campaign handed
    # to segmentation a second time (as after a lost acknowledgement) adds none.
    name, control = await _held_back(account)
    reports = await _reports_of(platform, js, name)
    assert reports
    subjects = Subjects(platform.settings.namespace)
    last = 0
    for n, report in enumerate(reports):
        sent = await js.publish(
            subjects.delivery_outcomes, report, headers={"Nats-Msg-Id": f"{name}-again-{n}"}
        )
        last = sent.seq

    async def handled() -> bool:
        consumer = await js.consumer_info(subjects.stream("dispatch"), "segmentation-system-outcomes")
        floor = consumer.ack_floor.stream_seq if consumer.ack_floor else 0
        return (floor or 0) >= last and not consumer.num_ack_pending

    await eventually(handled)
    # Each held-back user did Control Group exactly once.
    assert await _count(account, CONTROL_GROUP, condition("campaign", "EQUALS", name)) == control


def test_a_reports_events_are_never_parted_between_calls() -> None:
    template = events_pb2.EventsIngested().events.add()
    made = [OwnEvent(template, f"u{i}", f"c{i}", {}, {}, f"r{i // 3}") for i in range(9)]  # 3 reports
    alone = [OwnEvent(template, f"v{i}", f"own-{i}", {}, {}) for i in range(2)]  # each its own
    calls = list(_calls(made + alone, 4))
    assert [[own.client_id for own in call] for call in calls] == [
        ["c0", "c1", "c2"],
        ["c3", "c4", "c5"],
        ["c6", "c7", "c8", "own-0"],
        ["own-1"],
    ]
    big = list(_calls(made[:3], 2))  # a report larger than a call is a call of its own
    assert [len(call) for call in big] == [3]


async def test_a_live_sms_campaign_texts_each_reachable_user_as_they_act(
    account: SmsAccount, twilio: TwilioApi
) -> None:
    """The seed's own example: a text the moment a user of the segment signs up; the users the
    channel cannot reach (no phone, unsubscribed) are skipped with the reason."""
    welcome = _sms_campaign(account, body="Welcome aboard, {{ profile.first_name | default: 'friend' }}!")
    welcome.schedule.Clear()
    welcome.schedule.live.trigger.action.event.event_name = "Signed Up"
    created = await account.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=welcome)
    )
    await account.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    await eventually(lambda: live_run(account.clients, created.name))
    signups = [
        pb.Event(
            user_id=f"{account.tag}-{i:02d}", name="Signed Up", client_event_id=f"{account.tag}-signup-{i}"
        )
        for i in range(38)
    ]
    await account.clients.segmentation.IngestEvents(pb.IngestEventsRequest(events=signups))

    async def counted() -> bool:
        stats = await account.clients.campaigns.GetCampaignStats(
            campaign_pb.GetCampaignStatsRequest(name=f"{created.name}/stats")
        )
        return stats.sent + stats.skipped == 38

    await eventually(counted)
    stats = await account.clients.campaigns.GetCampaignStats(
        campaign_pb.GetCampaignStatsRequest(name=f"{created.name}/stats")
    )
    assert (stats.sent, stats.skipped) == (30, 8)
    assert {r.reason: r.count for r in stats.failure_reasons} == {"not reachable on the channel": 8}
    assert sorted(m.to for m in twilio.messages) == sorted(f"+1415555{i:04d}" for i in range(30))
    assert "Welcome aboard, Ana0!" in {m.body for m in twilio.messages}
