"""mParticle export campaigns end to end: the public API, the four services, and a local mParticle
Events API that behaves like the real one (auth, 256 KB / 100-batch limits, 202 for partial
success, 429 with Retry-After, de-duplication on source_request_id)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_sandbox.mparticle_api import MAX_BATCHES, MAX_REQUEST_BYTES, MparticleApi, customer_id
from herald_sandbox.segment_api import SegmentApi
from tests.conftest import Platform
from tests.harness import Clients, create_account
from tests.helpers import (
    completed_stats,
    condition,
    create_segment,
    create_segment_destination,
    field_violations,
    segment_export_campaign,
    user,
)

API_KEY, API_SECRET = "us1-0123456789abcdef", "mp-secret-0123456789"
USERS = 2000
BIG = 7  # this user's note makes their batch larger than 128 KB
NOTES = 40  # custom attributes that each carry the user's note


@pytest.fixture
async def mparticle() -> AsyncIterator[MparticleApi]:
    fake = MparticleApi(API_KEY, API_SECRET)
    await fake.start()
    yield fake
    await fake.stop()


@dataclass
class ExportAccount:
    clients: Clients
    segment: str
    tag: str


def _seen(minutes_ago: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC) - timedelta(minutes=minutes_ago))
    return stamp


def _member(tag: str, i: int) -> pb.User:
    member = user(f"{tag}-{i:04d}", cohort=tag, first_name=f"Ana{i}", plan="gold" if i % 3 else "free")
    member.properties.update({"note": "n" * (4000 if i == BIG else 8)})
    member.email = f"user{i}@example.com"
    if i % 2 == 0:
        member.phone = f"+1415555{i:04d}"
    member.gender = pb.Gender.GENDER_FEMALE if i % 2 else pb.Gender.GENDER_MALE
    member.date_of_birth = "1990-06-15"
    member.location.CopyFrom(pb.Location(country="US", region="California", city="San Francisco"))
    if i % 4 == 0:
        member.location.latitude, member.location.longitude = 37.7749, -122.4194
    # Every user has an Android phone; every fourth also an iPad seen more recently.
    member.devices.append(
        pb.Device(
            device_id=f"android-{i}",
            platform=pb.Platform.PLATFORM_ANDROID,
            make="Samsung",
            model="SM-G991B",
            os_version="14",
            push_token=f"gcm-token-{i}",
            push_token_type=pb.PushTokenType.PUSH_TOKEN_TYPE_GCM,
            last_seen_time=_seen(60),
        )
    )
    if i % 4 == 0:
        member.devices.append(
            pb.Device(
                device_id=f"ipad-{i}",
                platform=pb.Platform.PLATFORM_IOS,
                make="Apple",
                model="iPad13,1",
                os_version="17.1",
                push_token=f"apns-token-{i}",
                push_token_type=pb.PushTokenType.PUSH_TOKEN_TYPE_APNS,
                last_seen_time=_seen(5),
            )
        )
    return member


@pytest.fixture
async def account(platform: Platform) -> AsyncIterator[ExportAccount]:
    """An account of its own with USERS users: identities, demographics, geography, devices."""
    _, key = await create_account(platform.address("campaign"), platform.settings.bootstrap_token, "mp")
    clients = Clients.open(platform.addresses, key)
    tag = uuid.uuid4().hex[:8]
    for start in range(0, USERS, 1000):
        users = [_member(tag, i) for i in range(start, min(start + 1000, USERS))]
        await clients.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=users))
    segment = await create_segment(clients, condition("cohort", "EQUALS", tag))
    yield ExportAccount(clients, segment.name, tag)
    await clients.close()


def _config(fake: MparticleApi, **fields: Any) -> dispatch_pb.MparticleConfig:
    values: dict[str, Any] = {
        "endpoint_url": fake.url,
        "api_key": API_KEY,
        "api_secret": API_SECRET,
        "environment": "production",
        "batches_per_second": 100_000,
    }
    values.update(fields)
    return dispatch_pb.MparticleConfig(**values)


async def _destination(clients: Clients, fake: MparticleApi, **fields: Any) -> dispatch_pb.Destination:
    return await clients.dispatch.CreateDestination(
        dispatch_pb.CreateDestinationRequest(
            destination=dispatch_pb.Destination(
                display_name="mParticle prod", mparticle=_config(fake, **fields)
            )
        )
    )


def _content(**fields: Any) -> campaign_pb.MparticleExportContent:
    custom = {
        "offer": "20% off",
        "greeting": "Hi {{ profile.first_name }} ({{ profile.plan }})",
        **{f"note_{n}": "{{ profile.note }}" for n in range(NOTES)},
    }
    values: dict[str, Any] = {
        "event_name": "Herald Offer Sent",
        "custom_event_type": "transaction",
        "profile_attributes": ["first_name", "plan", "email", "phone", "gender", "date_of_birth", "city"],
        "custom_attributes": custom,
        "push_tokens": campaign_pb.PushTokenSelection(gcm=True, apns=True),
    }
    values.update(fields)
    return campaign_pb.MparticleExportContent(**values)


def _campaign(account: ExportAccount, destination: str, **fields: Any) -> campaign_pb.Campaign:
    campaign = campaign_pb.Campaign(
        display_name="Offer to mParticle",
        audience=campaign_pb.Audience(segment=account.segment),
        destination=destination,
        schedule=campaign_pb.Schedule(send_now=campaign_pb.SendNow()),
        mparticle_export=_content(),
    )
    for key, value in fields.items():
        getattr(campaign, key).CopyFrom(value)
    return campaign


async def _completed(clients: Clients, name: str) -> campaign_pb.CampaignStats:
    return await completed_stats(clients, name, within=90.0)


async def test_an_mparticle_export_reaches_mparticle_once_per_user_within_every_limit(
    account: ExportAccount, mparticle: MparticleApi
) -> None:
    destination = await _destination(account.clients, mparticle)
    assert destination.type == dispatch_pb.DestinationType.DESTINATION_TYPE_MPARTICLE
    assert destination.mparticle.api_secret != API_SECRET  # masked
    checked = await account.clients.dispatch.TestDestination(
        dispatch_pb.TestDestinationRequest(name=destination.name)
    )
    assert checked.ok, checked.detail
    assert mparticle.batches == {}  # the check recorded nothing

    mparticle.throttle_next(6)  # a storm of 429s with Retry-After: 1
    mparticle.fail_next(2)  # and two 503s
    created = await account.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=_campaign(account, destination.name))
    )
    assert created.destination_type == "mparticle"
    await account.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    stats = await _completed(account.clients, created.name)

    assert (stats.sent, stats.failed) == (USERS - 1, 1)
    [reason] = stats.failure_reasons
    assert "mParticle takes at most 128 KB per batch" in reason.reason
    assert list(reason.example_user_ids) == [f"{account.tag}-{BIG:04d}"]
    # Exactly once per user (by delivery id), through the storm.
    assert len(mparticle.batches) == USERS - 1 and mparticle.repeated == 0
    assert len(mparticle.source_message_ids) == len(set(mparticle.source_message_ids)) == USERS - 1
    assert sorted(customer_id(b) for b in mparticle.batches.values()) == sorted(
        f"{account.tag}-{i:04d}" for i in range(USERS) if i != BIG
    )
    assert not mparticle.dropped
    statuses = [status for _, _, status in mparticle.requests]
    assert statuses.count(429) == 6 and statuses.count(503) == 2
    for size, count, _ in mparticle.requests:
        assert size < MAX_REQUEST_BYTES and count <= MAX_BATCHES

    by_user = {customer_id(b): b for b in mparticle.batches.values()}
    batch = by_user[f"{account.tag}-0004"]
    assert batch["environment"] == "production" and batch["schema_version"] == 2
    [event] = batch["events"]
    assert event["event_type"] == "custom_event"
    data = event["data"]
    assert (data["event_name"], data["custom_event_type"]) == ("Herald Offer Sent", "transaction")
    assert data["custom_attributes"]["greeting"] == "Hi Ana4 (gold)"
    assert data["custom_attributes"]["offer"] == "20% off"
    assert data["source_message_id"] == batch["source_request_id"]
    assert batch["user_identities"] == {
        "customer_id": f"{account.tag}-0004",
        "email": "user4@example.com",
        "mobile_number": "+14155550004",
    }
    today = date.today()
    age = today.year - 1990 - ((today.month, today.day) < (6, 15))
    assert batch["user_attributes"] == {
        "$firstname": "Ana4",
        "plan": "gold",
        "email": "user4@example.com",
        "$mobile": "+14155550004",
        "$gender": "M",
        "date_of_birth": "1990-06-15",
        "$age": str(age),
        "$city": "San Francisco",
    }
    # The most recently seen device with a chosen token: user 4's iPad.
    assert batch["device_info"]["push_token"] == "apns-token-4"
    assert batch["device_info"]["platform"] == "iOS"
    odd = by_user[f"{account.tag}-0005"]
    assert odd["device_info"]["push_token"] == "gcm-token-5"
    assert "mobile_number" not in odd["user_identities"] and "$mobile" not in odd["user_attributes"]


async def test_only_the_chosen_kind_of_push_token_is_sent(
    account: ExportAccount, mparticle: MparticleApi
) -> None:
    destination = await _destination(account.clients, mparticle)
    content = _content(push_tokens=campaign_pb.PushTokenSelection(gcm=True), custom_attributes={"a": "b"})
    created = await account.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(
            campaign=_campaign(account, destination.name, mparticle_export=content)
        )
    )
    await account.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    stats = await _completed(account.clients, created.name)
    assert stats.sent == USERS
    tokens = {customer_id(b): b["device_info"]["push_token"] for b in mparticle.batches.values()}
    assert tokens[f"{account.tag}-0004"] == "gcm-token-4"  # the iPad's APNs token was not chosen
    assert all(token.startswith("gcm-token-") for token in tokens.values())


async def test_mparticle_refuses_wrong_credentials_and_test_destination_says_so(
    account: ExportAccount, mparticle: MparticleApi
) -> None:
    wrong = await _destination(account.clients, mparticle, api_secret="not-the-secret")
    checked = await account.clients.dispatch.TestDestination(
        dispatch_pb.TestDestinationRequest(name=wrong.name)
    )
    assert not checked.ok and "refused" in checked.detail and "403" in checked.detail
    created = await account.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(
            campaign=_campaign(account, wrong.name, mparticle_export=_content(custom_attributes={"a": "b"}))
        )
    )
    await account.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    stats = await _completed(account.clients, created.name)
    assert (stats.sent, stats.failed) == (0, USERS)
    assert {r.reason for r in stats.failure_reasons} == {"mParticle answered 403 (FORBIDDEN)"}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"pod": "US3", "endpoint_url": ""}, "pod"),
        ({"endpoint_url": ""}, "pod"),
        ({"api_key": ""}, "api_key"),
        ({"api_secret": ""}, "api_secret"),
        ({"environment": "staging"}, "environment"),
        ({"environment": ""}, "environment"),
        ({"batches_per_second": -1}, "batches_per_second"),
    ],
)
async def test_bad_mparticle_destinations_name_the_field(
    account: ExportAccount, mparticle: MparticleApi, fields: dict[str, Any], field: str
) -> None:
    before = await account.clients.dispatch.ListDestinations(dispatch_pb.ListDestinationsRequest())
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _destination(account.clients, mparticle, **fields)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"destination.mparticle.{field}" in field_violations(raised.value)
    after = await account.clients.dispatch.ListDestinations(dispatch_pb.ListDestinationsRequest())
    assert len(after.destinations) == len(before.destinations)


async def test_a_pod_names_mparticles_endpoint(account: ExportAccount, mparticle: MparticleApi) -> None:
    created = await _destination(account.clients, mparticle, pod="eu1", endpoint_url="")
    assert created.mparticle.pod == "eu1" and created.mparticle.api_key == API_KEY


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ({"event_name": " "}, "event_name"),
        ({"event_name": "e" * 257}, "event_name"),
        ({"custom_event_type": "purchase"}, "custom_event_type"),
        ({"custom_attributes": {f"k{n}": "v" for n in range(101)}}, "custom_attributes"),
        ({"custom_attributes": {"k" * 257: "v"}}, "custom_attributes[" + "k" * 257 + "]"),
        ({"custom_attributes": {"long": "v" * 4097}}, "custom_attributes[long]"),
        ({"custom_attributes": {"broken": "{{ profile.name"}}, "custom_attributes[broken]"),
        ({"profile_attributes": [f"p{n}" for n in range(101)]}, "profile_attributes"),
        ({"profile_attributes": ["ok", ""]}, "profile_attributes[1]"),
    ],
)
async def test_bad_mparticle_content_names_the_field_and_writes_nothing(
    account: ExportAccount, mparticle: MparticleApi, content: dict[str, Any], field: str
) -> None:
    destination = await _destination(account.clients, mparticle)
    before = await account.clients.campaigns.ListCampaigns(campaign_pb.ListCampaignsRequest())
    bad = _campaign(account, destination.name, mparticle_export=_content(**content))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await account.clients.campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=bad))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"campaign.mparticle_export.{field}" in field_violations(raised.value)
    after = await account.clients.campaigns.ListCampaigns(campaign_pb.ListCampaignsRequest())
    assert len(after.campaigns) == len(before.campaigns)


async def test_a_live_mparticle_campaign_with_a_delay_is_refused(
    account: ExportAccount, mparticle: MparticleApi
) -> None:
    destination = await _destination(account.clients, mparticle)
    trigger = campaign_pb.LiveTrigger(
        action=campaign_pb.ActionTrigger(event=campaign_pb.LiveEvent(event_name="Added to Cart"))
    )
    delayed = campaign_pb.Schedule(live=campaign_pb.Live(delay=Duration(seconds=600), trigger=trigger))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await account.clients.campaigns.CreateCampaign(
            campaign_pb.CreateCampaignRequest(campaign=_campaign(account, destination.name, schedule=delayed))
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "campaign.schedule.live.delay" in field_violations(raised.value)
    # Without a delay it is a valid draft; the same delay on a Segment export is allowed.
    at_once = campaign_pb.Schedule(live=campaign_pb.Live(trigger=trigger))
    draft = await account.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=_campaign(account, destination.name, schedule=at_once))
    )
    assert draft.state == campaign_pb.State.STATE_DRAFT
    segment_destination = await create_segment_destination(account.clients, mparticle.url, "wk")
    segment = segment_export_campaign(account.segment, segment_destination.name, schedule=delayed)
    created = await account.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=segment)
    )
    assert created.schedule.live.delay.seconds == 600
    # An update that adds a delay to the mParticle draft is refused the same way.
    with pytest.raises(grpc.aio.AioRpcError) as again:
        draft.schedule.CopyFrom(delayed)
        await account.clients.campaigns.UpdateCampaign(campaign_pb.UpdateCampaignRequest(campaign=draft))
    assert "campaign.schedule.live.delay" in field_violations(again.value)


async def test_a_segment_export_carries_push_tokens_and_system_fields(
    platform: Platform, account: ExportAccount
) -> None:
    segment_api = SegmentApi(write_keys={"wk-tokens"})
    await segment_api.start()
    try:
        destination = await create_segment_destination(account.clients, segment_api.url, "wk-tokens")
        campaign = segment_export_campaign(account.segment, destination.name)
        campaign.segment_export.profile_attributes[:] = ["email", "gender", "city", "latitude", "timezone"]
        campaign.segment_export.push_tokens.apns = True
        created = await account.clients.campaigns.CreateCampaign(
            campaign_pb.CreateCampaignRequest(campaign=campaign)
        )
        await account.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
        stats = await _completed(account.clients, created.name)
        assert stats.sent == USERS
        by_user = {e["userId"]: e for e in segment_api.events.values()}
        ipad_owner = by_user[f"{account.tag}-0004"]["context"]
        assert ipad_owner["device"] == {
            "id": "ipad-4",
            "type": "ios",
            "token": "apns-token-4",
            "manufacturer": "Apple",
            "model": "iPad13,1",
        }
        assert ipad_owner["traits"] == {
            "email": "user4@example.com",
            "gender": "male",
            "city": "San Francisco",
            "latitude": 37.7749,
        }
        odd = by_user[f"{account.tag}-0005"]["context"]
        assert "device" not in odd and "latitude" not in odd["traits"]  # no iPad, no position
    finally:
        await segment_api.stop()


async def test_the_batches_per_second_limit_holds_so_mparticle_never_throttles(
    account: ExportAccount, mparticle: MparticleApi
) -> None:
    # mParticle counts batches, not requests: 400 a second is four full requests. The fake counts
    # by its own clock second, so a second's batches may arrive in the next one: twice the rate.
    mparticle.max_batches_per_second = 800
    destination = await _destination(account.clients, mparticle, batches_per_second=400)
    created = await account.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(
            campaign=_campaign(
                account, destination.name, mparticle_export=_content(custom_attributes={"a": "b"})
            )
        )
    )
    await account.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    stats = await _completed(account.clients, created.name)
    assert stats.sent == USERS and len(mparticle.batches) == USERS
    assert [status for _, _, status in mparticle.requests if status != 202] == []
