"""SMS campaigns end to end through the public API, against faithful fakes of the providers'
APIs (Twilio, Vonage, Exotel, MSG91, Netcore): rendering, who is reachable, throttling, failover, previews,
delivery receipts (signed ones counted once each, early ones kept, forged ones refused) and bad
input."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_sandbox.exotel_api import ExotelApi
from herald_sandbox.msg91_api import Msg91Api
from herald_sandbox.netcore_api import NetcoreApi
from herald_sandbox.twilio_api import TwilioApi
from herald_sandbox.vonage_api import VonageApi
from tests.conftest import Platform, eventually
from tests.harness import Clients, create_account
from tests.helpers import condition, create_segment, create_segment_destination, field_violations, user

ACCOUNT_SID = "AC" + "0" * 31 + "1"
AUTH_TOKEN = "f" * 32
BODY = "Hi {{ profile.first_name | default: 'there' }}, your code is {{ profile.code }}"


@pytest.fixture
async def twilio() -> AsyncIterator[TwilioApi]:
    fake = TwilioApi(ACCOUNT_SID, AUTH_TOKEN)
    await fake.start()
    yield fake
    await fake.stop()


@dataclass
class SmsAccount:
    clients: Clients
    segment: str
    destination: str
    tag: str


@pytest.fixture
async def account(platform: Platform, twilio: TwilioApi) -> AsyncIterator[SmsAccount]:
    """An account of its own: 30 users with phones, 5 without, 3 who unsubscribed from SMS."""
    _, key = await create_account(platform.address("campaign"), platform.settings.bootstrap_token, "sms")
    clients = Clients.open(platform.addresses, key)
    tag = uuid.uuid4().hex[:8]
    users = []
    for i in range(38):
        member = user(f"{tag}-{i:02d}", cohort=tag, code=f"C{i:02d}")
        if i % 2 == 0:
            member.properties.update({"first_name": f"Ana{i}"})
        if i < 33:
            member.phone = f"+1415555{i:04d}"
        member.subscriptions.sms_unsubscribed = 30 <= i < 33
        users.append(member)
    await clients.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=users))
    segment = await create_segment(clients, condition("cohort", "EQUALS", tag))
    destination = await clients.dispatch.CreateDestination(
        dispatch_pb.CreateDestinationRequest(
            destination=dispatch_pb.Destination(
                display_name="Twilio US",
                twilio=_twilio(
                    account_sid=ACCOUNT_SID,
                    auth_token=AUTH_TOKEN,
                    endpoint_url=twilio.url,
                    sender="+14155550000",
                ),
            )
        )
    )
    yield SmsAccount(clients, segment.name, destination.name, tag)
    await clients.close()


def _twilio(sender: str = "", **fields: Any) -> dispatch_pb.TwilioConfig:
    """A Twilio config; `sender` goes in `from`, a Python keyword."""
    config = dispatch_pb.TwilioConfig(**fields)
    if sender:
        setattr(config, "from", sender)
    return config


def _sms_campaign(account: SmsAccount, body: str = BODY, **fields: object) -> campaign_pb.Campaign:
    campaign = campaign_pb.Campaign(
        display_name="Weekend offer",
        audience=campaign_pb.Audience(segment=account.segment),
        destination=account.destination,
        schedule=campaign_pb.Schedule(send_now=campaign_pb.SendNow()),
        sms=campaign_pb.SmsContent(body=body),
    )
    for key, value in fields.items():
        getattr(campaign, key).CopyFrom(value)
    return campaign


async def _send(account: SmsAccount, campaign: campaign_pb.Campaign, kind: str = "twilio") -> str:
    """Creates and publishes the campaign, which must go through a `kind` destination."""
    created = await account.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=campaign)
    )
    assert created.destination_type == kind or not kind
    await account.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    return created.name


async def _publish(account: SmsAccount, campaign: campaign_pb.Campaign) -> str:
    """Creates and publishes the campaign, whatever its destination."""
    return await _send(account, campaign, kind="")


async def _twilio_destination(account: SmsAccount, endpoint_url: str, **fields: Any) -> str:
    """A Twilio destination of the account's test credentials at `endpoint_url`."""
    created = await account.clients.dispatch.CreateDestination(
        dispatch_pb.CreateDestinationRequest(
            destination=dispatch_pb.Destination(
                display_name="Twilio",
                twilio=_twilio(
                    account_sid=ACCOUNT_SID,
                    auth_token=AUTH_TOKEN,
                    endpoint_url=endpoint_url,
                    sender="+14155550000",
                    **fields,
                ),
            )
        )
    )
    return created.name


async def _completed(account: SmsAccount, name: str) -> campaign_pb.CampaignStats:
    async def done() -> bool:
        got = await account.clients.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=name))
        return got.state == campaign_pb.State.STATE_COMPLETED

    await eventually(done)
    return await account.clients.campaigns.GetCampaignStats(
        campaign_pb.GetCampaignStatsRequest(name=f"{name}/stats")
    )


async def test_an_sms_campaign_reaches_every_reachable_user_once_through_twilio(
    account: SmsAccount, twilio: TwilioApi
) -> None:
    twilio.throttle_next(5)  # ridden out: a 429 from Twilio is never processed
    name = await _send(account, _sms_campaign(account))
    stats = await _completed(account, name)
    # 30 with a phone and still subscribed; 3 unsubscribed and 5 without a phone are not reachable.
    assert (stats.sent, stats.failed, stats.skipped) == (30, 0, 8)
    assert {r.reason: r.count for r in stats.failure_reasons} == {"not reachable on the channel": 8}
    assert sorted(m.to for m in twilio.messages) == [f"+1415555{i:04d}" for i in range(30)]
    bodies = {m.to: m.body for m in twilio.messages}
    assert bodies["+14155550000"] == "Hi Ana0, your code is C00"
    assert bodies["+14155550001"] == "Hi there, your code is C01"
    assert {m.sender for m in twilio.messages} == {"+14155550000"}
    assert [status for status, _ in twilio.refused] == [429] * 5
    explained = await account.clients.campaigns.ExplainDelivery(
        campaign_pb.ExplainDeliveryRequest(campaign=name, user_id=f"{account.tag}-36")
    )
    assert [(d.decision, d.rule) for d in explained.decisions] == [
        (campaign_pb.DECISION_SKIPPED, campaign_pb.RULE_NOT_REACHABLE)
    ]


async def test_a_message_rendered_past_1600_characters_fails_before_any_provider(
    account: SmsAccount, twilio: TwilioApi
) -> None:
    # Twilio would refuse it (error 21617); it is not even sent.
    long_code = user(f"{account.tag}-00", cohort=account.tag, code="x" * 1600)
    long_code.phone = "+14155550000"
    await account.clients.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=[long_code]))
    name = await _send(account, _sms_campaign(account))
    stats = await _completed(account, name)
    assert (stats.sent, stats.failed) == (29, 1)
    [failure] = [r for r in stats.failure_reasons if "rendered message" in r.reason]
    assert failure.reason == "the rendered message is 1,623 characters; at most 1,600"
    assert list(failure.example_user_ids) == [f"{account.tag}-00"]
    assert "+14155550000" not in {m.to for m in twilio.messages}


async def test_preview_renders_the_body_for_a_user_with_its_encoding_and_segments(
    account: SmsAccount,
) -> None:
    preview = await account.clients.campaigns.PreviewMessage(
        campaign_pb.PreviewMessageRequest(body=BODY, user_id=f"{account.tag}-02")
    )
    assert (preview.text, preview.encoding, preview.characters, preview.segments) == (
        "Hi Ana2, your code is C02",
        campaign_pb.SMS_ENCODING_GSM7,
        25,
        1,
    )
    emoji = await account.clients.campaigns.PreviewMessage(
        campaign_pb.PreviewMessageRequest(
            body="{{ profile.code }} \U0001f381" * 10, user_id=f"{account.tag}-02"
        )
    )
    assert (emoji.encoding, emoji.characters, emoji.units, emoji.segments) == (
        campaign_pb.SMS_ENCODING_UCS2,
        50,
        60,
        1,
    )
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await account.clients.campaigns.PreviewMessage(
            campaign_pb.PreviewMessageRequest(body=BODY, user_id="nobody-at-all")
        )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as broken:
        await account.clients.campaigns.PreviewMessage(
            campaign_pb.PreviewMessageRequest(body="{{ profile.code ", user_id=f"{account.tag}-02")
        )
    assert broken.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "body" in field_violations(broken.value)


@pytest.mark.parametrize(
    ("content", "field"),
    [
        (campaign_pb.SmsContent(body="{% if %}"), "campaign.sms.body"),
        (campaign_pb.SmsContent(body="   "), "campaign.sms.body"),
        (campaign_pb.SmsContent(body="a" * 1601), "campaign.sms.body"),
        (campaign_pb.SmsContent(body="hello", dlt_template_id="12345"), "campaign.sms.dlt_template_id"),
    ],
)
async def test_bad_sms_content_names_the_field_and_writes_nothing(
    account: SmsAccount, content: campaign_pb.SmsContent, field: str
) -> None:
    campaign = _sms_campaign(account)
    campaign.sms.CopyFrom(content)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await account.clients.campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=campaign))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(raised.value)
    assert not (await account.clients.campaigns.ListCampaigns(campaign_pb.ListCampaignsRequest())).campaigns


async def test_sms_content_needs_an_sms_destination(account: SmsAccount, twilio: TwilioApi) -> None:
    segment_destination = await create_segment_destination(account.clients, twilio.url, "wk_x")
    campaign = _sms_campaign(account)
    campaign.destination = segment_destination.name
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await account.clients.campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=campaign))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "DESTINATION_TYPE_TWILIO" in field_violations(raised.value)["campaign.sms"]


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (
            _twilio(account_sid="AC123", auth_token=AUTH_TOKEN, sender="+14155550000"),
            "account_sid",
        ),
        (_twilio(account_sid=ACCOUNT_SID, sender="+14155550000"), "auth_token"),
        (dispatch_pb.TwilioConfig(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN), "sender"),
        (
            _twilio(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, sender="TooLongSender1"),
            "from",
        ),
        (
            _twilio(account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, sender="12345"),
            "from",
        ),
        (
            dispatch_pb.TwilioConfig(
                account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, messaging_service_sid="MGxyz"
            ),
            "messaging_service_sid",
        ),
    ],
)
async def test_bad_twilio_destinations_name_the_field(
    account: SmsAccount, config: dispatch_pb.TwilioConfig, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await account.clients.dispatch.CreateDestination(
            dispatch_pb.CreateDestinationRequest(
                destination=dispatch_pb.Destination(display_name="t", twilio=config)
            )
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"destination.twilio.{field}" in field_violations(raised.value)


async def test_a_twilio_destination_never_shows_its_token(account: SmsAccount) -> None:
    got = await account.clients.dispatch.GetDestination(
        dispatch_pb.GetDestinationRequest(name=account.destination)
    )
    assert got.type == dispatch_pb.DESTINATION_TYPE_TWILIO
    assert got.twilio.auth_token.endswith(AUTH_TOKEN[-4:]) and AUTH_TOKEN not in got.twilio.auth_token


VONAGE_KEY, VONAGE_SECRET = "a1b2c3d4", "s3cr3tS3cr3tAbCd"


@pytest.fixture
async def vonage() -> AsyncIterator[VonageApi]:
    fake = VonageApi(VONAGE_KEY, VONAGE_SECRET, max_per_second=30)
    await fake.start()
    yield fake
    await fake.stop()


async def _vonage_destination(account: SmsAccount, vonage: VonageApi, **fields: Any) -> str:
    config = dispatch_pb.VonageConfig(
        api_key=VONAGE_KEY, api_secret=VONAGE_SECRET, sender="Herald", endpoint_url=vonage.url, **fields
    )
    created = await account.clients.dispatch.CreateDestination(
        dispatch_pb.CreateDestinationRequest(
            destination=dispatch_pb.Destination(display_name="Vonage", vonage=config)
        )
    )
    return created.name


async def test_an_sms_campaign_through_vonage_slows_down_when_throttled_and_sends_each_once(
    account: SmsAccount, vonage: VonageApi
) -> None:
    vonage.throttle_next(10)  # status "1": slowed down and sent again, not failed
    campaign = _sms_campaign(account, body="{{ profile.code }}: 20% off today \U0001f381")
    campaign.destination = await _vonage_destination(account, vonage, dlt_entity_id="1101611580000043694")
    campaign.sms.dlt_template_id = "1107172768973504659"
    created = await account.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=campaign)
    )
    assert created.destination_type == "vonage"
    await account.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    stats = await _completed(account, created.name)
    assert (stats.sent, stats.failed, stats.skipped) == (30, 0, 8)
    assert sorted(m.to for m in vonage.messages) == [f"1415555{i:04d}" for i in range(30)]  # E.164 without +
    assert vonage.statuses.count("1") >= 10
    refs = [m.client_ref for m in vonage.messages]
    assert len(set(refs)) == 30 and all(len(r) == 36 for r in refs)  # each delivery id once
    first = next(m for m in vonage.messages if m.to == "14155550003")
    assert (first.text, first.type, first.sender) == ("C03: 20% off today \U0001f381", "unicode", "Herald")
    assert first.extra == {"entity-id": "1101611580000043694", "content-id": "1107172768973504659"}


async def test_vonage_refusals_fail_with_its_status(account: SmsAccount, vonage: VonageApi) -> None:
    vonage.api_secret = "ChangedSecret123"  # the destination's secret no longer works: status 4
    campaign = _sms_campaign(account)
    campaign.destination = await _vonage_destination(account, vonage)
    created = await account.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=campaign)
    )
    await account.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    stats = await _completed(account, created.name)
    assert (stats.sent, stats.failed) == (0, 30)
    assert {r.reason for r in stats.failure_reasons if r.reason.startswith("vonage")} == {
        "vonage status 4: Bad Credentials"
    }


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"api_key": "short"}, "api_key"),
        ({"api_secret": "not-sixteen"}, "api_secret"),
        ({"sender": "Way Too Long Sender"}, "sender"),
        ({"sender": ""}, "sender"),
        ({"dlt_entity_id": "110161158"}, "dlt_entity_id"),
    ],
)
async def test_bad_vonage_destinations_name_the_field(
    account: SmsAccount, fields: dict[str, str], field: str
) -> None:
    config = dispatch_pb.VonageConfig(api_key=VONAGE_KEY, api_secret=VONAGE_SECRET, sender="Herald")
    for key, value in fields.items():
        setattr(config, key, value)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await account.clients.dispatch.CreateDestination(
            dispatch_pb.CreateDestinationRequest(
                destination=dispatch_pb.Destination(display_name="v", vonage=config)
            )
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"destination.vonage.{field}" in field_violations(raised.value)


async def test_publishing_to_india_through_a_dlt_provider_needs_the_template_id(
    account: SmsAccount, vonage: VonageApi
) -> None:
    destination = await _vonage_destination(account, vonage, dlt_entity_id="1101611580000043694")
    campaign = _sms_campaign(account)
    campaign.destination = destination
    created = await account.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=campaign)
    )
    # Nobody in the audience has a +91 number yet: no DLT template needed.
    await account.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))

    indian = user(f"{account.tag}-in", cohort=account.tag, code="IN1")
    indian.phone = "+919812345678"
    await account.clients.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=[indian]))
    second = await account.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=campaign)
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await account.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=second.name))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "campaign.sms.dlt_template_id" in (raised.value.details() or "")
    got = await account.clients.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=second.name))
    assert got.state == campaign_pb.State.STATE_DRAFT

    campaign.sms.dlt_template_id = "1107172768973504659"
    third = await account.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=campaign)
    )
    published = await account.clients.campaigns.PublishCampaign(
        campaign_pb.PublishCampaignRequest(name=third.name)
    )
    assert published.state == campaign_pb.State.STATE_SCHEDULED


async def _group(account: SmsAccount, *members: str) -> str:
    created = await account.clients.dispatch.CreateDestination(
        dispatch_pb.CreateDestinationRequest(
            destination=dispatch_pb.Destination(
                display_name="US providers",
                sms_provider_group=dispatch_pb.SmsProviderGroupConfig(destinations=list(members)),
            )
        )
    )
    return created.name


async def test_a_provider_group_fails_over_when_its_first_provider_stops_taking_messages(
    account: SmsAccount, twilio: TwilioApi, vonage: VonageApi
) -> None:
    twilio.throttle_next(5)  # Twilio throttles first, then its token is revoked after 10 messages
    twilio.revoke_after = 10
    group = await _group(account, account.destination, await _vonage_destination(account, vonage))
    campaign = _sms_campaign(account)
    campaign.destination = group
    created = await account.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=campaign)
    )
    assert created.destination_type == "sms_provider_group"
    await account.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    stats = await _completed(account, created.name)
    assert (stats.sent, stats.failed, stats.skipped) == (30, 0, 8)
    through_twilio = [m.to for m in twilio.messages]
    through_vonage = ["+" + m.to for m in vonage.messages]
    assert len(through_twilio) == 10 and len(through_vonage) == 20
    # Every reachable user got exactly one message, across both providers.
    assert sorted(through_twilio + through_vonage) == [f"+1415555{i:04d}" for i in range(30)]
    assert len({m.client_ref for m in vonage.messages}) == 20
    assert (429, 20429) in twilio.refused and (401, 20003) in twilio.refused


async def test_a_message_the_first_provider_refuses_for_itself_does_not_fail_over(
    account: SmsAccount, twilio: TwilioApi, vonage: VonageApi
) -> None:
    long_code = user(f"{account.tag}-00", cohort=account.tag, code="x" * 1600)
    long_code.phone = "+14155550000"
    await account.clients.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=[long_code]))
    group = await _group(account, account.destination, await _vonage_destination(account, vonage))
    campaign = _sms_campaign(account)
    campaign.destination = group
    created = await account.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=campaign)
    )
    await account.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    stats = await _completed(account, created.name)
    assert (stats.sent, stats.failed) == (29, 1)
    assert vonage.messages == []  # Twilio's 21617 is about the message: final


async def test_bad_provider_groups_name_the_field(account: SmsAccount, twilio: TwilioApi) -> None:
    segment_destination = await create_segment_destination(account.clients, twilio.url, "wk_x")
    cases = [
        ([account.destination], "destination.sms_provider_group.destinations"),
        ([account.destination, account.destination], "destination.sms_provider_group.destinations[1]"),
        ([account.destination, "destinations/not-a-uuid"], "destination.sms_provider_group.destinations[1]"),
        (
            [account.destination, "destinations/00000000-0000-0000-0000-000000000000"],
            "destination.sms_provider_group.destinations[1]",
        ),
        ([account.destination, segment_destination.name], "destination.sms_provider_group.destinations[1]"),
    ]
    for members, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _group(account, *members)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, members
        assert field in field_violations(raised.value), (members, field_violations(raised.value))


EXOTEL_ENTITY = "1101611580000043694"


@pytest.fixture
async def exotel() -> AsyncIterator[ExotelApi]:
    fake = ExotelApi("exo_key", "exo_token", "heraldtest1", senders={"HRLDIN"}, max_per_minute=6000)
    await fake.start()
    yield fake
    await fake.stop()


def _exotel_config(exotel: ExotelApi, **fields: object) -> dispatch_pb.ExotelConfig:
    config = dispatch_pb.ExotelConfig(
        api_key="exo_key",
        api_token="exo_token",
        account_sid="heraldtest1",
        subdomain="api.in.exotel.com",
        sender="HRLDIN",
        dlt_entity_id=EXOTEL_ENTITY,
        endpoint_url=exotel.url,
        requests_per_minute=6000,
    )
    for key, value in fields.items():
        setattr(config, key, value)
    return config


async def test_an_sms_campaign_through_exotel_carries_dlt_ids_and_waits_out_429(
    account: SmsAccount, exotel: ExotelApi
) -> None:
    exotel.throttle_next(4)  # 429 with Retry-After: 1, waited out
    destination = await account.clients.dispatch.CreateDestination(
        dispatch_pb.CreateDestinationRequest(
            destination=dispatch_pb.Destination(display_name="Exotel India", exotel=_exotel_config(exotel))
        )
    )
    campaign = _sms_campaign(account, body="नमस्ते {{ profile.code }}")
    campaign.destination = destination.name
    campaign.sms.dlt_template_id = "1107172768973504659"
    created = await account.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=campaign)
    )
    assert created.destination_type == "exotel"
    await account.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    stats = await _completed(account, created.name)
    assert (stats.sent, stats.failed, stats.skipped) == (30, 0, 8)
    assert sorted(m.to for m in exotel.messages) == [f"+1415555{i:04d}" for i in range(30)]
    assert exotel.refused == [429] * 4
    first = next(m for m in exotel.messages if m.to == "+14155550004")
    assert first.body == "नमस्ते C04"
    assert (first.form["EncodingType"], first.form["DltEntityId"], first.form["DltTemplateId"]) == (
        "unicode",
        EXOTEL_ENTITY,
        "1107172768973504659",
    )
    assert len({m.form["CustomField"] for m in exotel.messages}) == 30  # each delivery id once


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"api_token": ""}, "api_token"),
        ({"subdomain": "api.exotel.in"}, "subdomain"),
        ({"sender": "HERALD1"}, "sender"),
        ({"dlt_entity_id": ""}, "dlt_entity_id"),  # required on the Mumbai cluster
        ({"dlt_entity_id": "123"}, "dlt_entity_id"),
    ],
)
async def test_bad_exotel_destinations_name_the_field(
    account: SmsAccount, exotel: ExotelApi, fields: dict[str, str], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await account.clients.dispatch.CreateDestination(
            dispatch_pb.CreateDestinationRequest(
                destination=dispatch_pb.Destination(display_name="e", exotel=_exotel_config(exotel, **fields))
            )
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"destination.exotel.{field}" in field_violations(raised.value)


# --- delivery receipts ------------------------------------------------------------------------


def _receipts_url(platform: Platform, account: SmsAccount) -> str:
    destination_id = account.destination.removeprefix("destinations/")
    return f"http://127.0.0.1:{platform.settings.receipts_port}/v1/receipts/twilio/{destination_id}"


async def _receipts(account: SmsAccount, name: str, settled: int) -> campaign_pb.CampaignStats:
    async def counted() -> campaign_pb.CampaignStats | None:
        stats = await account.clients.campaigns.GetCampaignStats(
            campaign_pb.GetCampaignStatsRequest(name=f"{name}/stats")
        )
        receipts = stats.receipts
        return stats if receipts.delivered + receipts.undelivered + receipts.failed >= settled else None

    await eventually(counted)
    stats = await counted()
    assert stats is not None
    return stats


async def test_twilio_receipts_become_delivered_and_undelivered_counts_once_each(
    platform: Platform, account: SmsAccount, twilio: TwilioApi
) -> None:
    twilio.undelivered = {"+14155550007", "+14155550008", "+14155550009"}
    twilio.callback_copies = 2  # every final callback comes twice
    name = await _send(account, _sms_campaign(account))
    assert (await _completed(account, name)).sent == 30
    stats = await _receipts(account, name, 30)
    assert (stats.receipts.delivered, stats.receipts.undelivered, stats.receipts.failed) == (27, 3, 0)
    reasons = {r.reason: r for r in stats.failure_reasons}
    assert reasons["undelivered (twilio 30003)"].count == 3
    assert sorted(reasons["undelivered (twilio 30003)"].example_user_ids) == [
        f"{account.tag}-{i:02d}" for i in (7, 8, 9)
    ]
    await eventually(lambda: _answered(twilio, 90))
    assert set(twilio.callback_answers) == {200}
    await asyncio.sleep(0.5)  # the copies changed nothing
    again = await _receipts(account, name, 30)
    assert (again.receipts.delivered, again.receipts.undelivered) == (27, 3)


async def _answered(twilio: TwilioApi, count: int) -> bool:
    return len(twilio.callback_answers) >= count


async def test_a_forged_receipt_is_refused_and_changes_nothing(
    platform: Platform, account: SmsAccount, twilio: TwilioApi
) -> None:
    name = await _send(account, _sms_campaign(account))
    await _receipts(account, name, 30)
    message = twilio.messages[0]
    url = _receipts_url(platform, account)
    forged = {"MessageSid": message.sid, "MessageStatus": "undelivered", "ErrorCode": "30007"}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            url, data=forged, headers={"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"}
        ) as answer:
            assert answer.status == 403
        async with http.post(url, data=forged) as unsigned:
            assert unsigned.status == 403
        # Signed with another account's token: refused too.
        other = TwilioApi(twilio.account_sid, "0" * 32)
        async with http.post(
            url, data=forged, headers={"X-Twilio-Signature": other.sign(url, forged)}
        ) as answer:
            assert answer.status == 403
        # Correctly signed, but the message already has its final receipt: nothing changes.
        async with http.post(
            url, data=forged, headers={"X-Twilio-Signature": twilio.sign(url, forged)}
        ) as answer:
            assert answer.status == 200
        unknown = f"{url[: url.rindex('/')]}/00000000-0000-0000-0000-000000000000"
        async with http.post(unknown, data=forged) as answer:
            assert answer.status == 404
    await asyncio.sleep(0.5)
    stats = await _receipts(account, name, 30)
    assert (stats.receipts.delivered, stats.receipts.undelivered) == (30, 0)


async def test_vonage_receipts_are_checked_by_signature_and_counted(
    platform: Platform, account: SmsAccount, vonage: VonageApi
) -> None:
    vonage.signature_secret = "vonage-signature-secret"
    vonage.failing = {"14155550001", "14155550002"}
    campaign = _sms_campaign(account)
    campaign.destination = await _vonage_destination(
        account, vonage, signature_secret=vonage.signature_secret
    )
    created = await account.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=campaign)
    )
    await account.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    stats = await _receipts(account, created.name, 30)
    assert (stats.receipts.delivered, stats.receipts.failed) == (28, 2)
    assert {r.reason: r.count for r in stats.failure_reasons}["failed after sending (vonage 6)"] == 2
    destination_id = campaign.destination.removeprefix("destinations/")
    url = f"http://127.0.0.1:{platform.settings.receipts_port}/v1/receipts/vonage/{destination_id}"
    forged = {"messageId": "0C000000217B7F02", "status": "delivered", "timestamp": "1", "nonce": "x"}
    async with aiohttp.ClientSession() as http, http.post(url, data={**forged, "sig": "0" * 32}) as answer:
        assert answer.status == 403


async def test_exotel_receipts_come_to_a_secret_path(
    platform: Platform, account: SmsAccount, exotel: ExotelApi
) -> None:
    exotel.failing = {"+14155550005"}
    destination = await account.clients.dispatch.CreateDestination(
        dispatch_pb.CreateDestinationRequest(
            destination=dispatch_pb.Destination(display_name="Exotel", exotel=_exotel_config(exotel))
        )
    )
    campaign = _sms_campaign(account)
    campaign.destination = destination.name
    campaign.sms.dlt_template_id = "1107172768973504659"
    created = await account.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=campaign)
    )
    await account.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    stats = await _receipts(account, created.name, 30)
    assert (stats.receipts.delivered, stats.receipts.failed) == (29, 1)
    callback = exotel.messages[0].form["StatusCallback"]
    assert callback.startswith(f"http://127.0.0.1:{platform.settings.receipts_port}/v1/receipts/exotel/")
    forged = callback[: callback.rindex("/")] + "/" + "0" * 32
    refused = {"SmsSid": exotel.messages[0].sid, "Status": "failed"}
    async with aiohttp.ClientSession() as http, http.post(forged, data=refused) as answer:
        assert answer.status == 403
    assert set(exotel.callback_answers) == {200}


async def test_a_stop_reply_unsubscribes_the_user_from_sms(
    platform: Platform, account: SmsAccount, twilio: TwilioApi
) -> None:
    destination_id = account.destination.removeprefix("destinations/")
    url = f"http://127.0.0.1:{platform.settings.receipts_port}/v1/inbound/twilio/{destination_id}"
    reply = {"MessageSid": "SM" + "1" * 32, "From": "+14155550004", "To": "+14155550000", "Body": " Stop "}
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=reply, headers={"X-Twilio-Signature": "Zm9yZ2Vk"}) as forged:
            assert forged.status == 403
        async with http.post(
            url,
            data={**reply, "Body": "thanks!"},
            headers={"X-Twilio-Signature": twilio.sign(url, {**reply, "Body": "thanks!"})},
        ) as chat:
            assert chat.status == 200
        async with http.post(
            url, data=reply, headers={"X-Twilio-Signature": twilio.sign(url, reply)}
        ) as answer:
            assert answer.status == 200 and "<Response>" in await answer.text()

    async def unsubscribed() -> bool:
        got = await account.clients.segmentation.GetUser(pb.GetUserRequest(name=f"users/{account.tag}-04"))
        return got.subscriptions.sms_unsubscribed

    await eventually(unsubscribed)
    reach = await account.clients.segmentation.EstimateReach(
        pb.EstimateReachRequest(audience=pb.Audience(segment=account.segment), channel=pb.CHANNEL_SMS)
    )
    assert reach.reachable_count == 29  # 30 subscribed, one of whom replied STOP; "thanks!" is not


async def test_testing_a_destination_checks_its_credentials_and_sends_nothing(
    account: SmsAccount, twilio: TwilioApi, vonage: VonageApi, exotel: ExotelApi
) -> None:
    async def test(name: str) -> tuple[bool, str]:
        answer = await account.clients.dispatch.TestDestination(dispatch_pb.TestDestinationRequest(name=name))
        return answer.ok, answer.detail

    assert await test(account.destination) == (True, "Twilio account Herald test is active")
    vonage_destination = await _vonage_destination(account, vonage)
    assert await test(vonage_destination) == (True, "Vonage balance 15.54")
    exotel_destination = await account.clients.dispatch.CreateDestination(
        dispatch_pb.CreateDestinationRequest(
            destination=dispatch_pb.Destination(display_name="Exotel", exotel=_exotel_config(exotel))
        )
    )
    assert await test(exotel_destination.name) == (True, "Exotel account heraldtest1 is active")
    group = await _group(account, account.destination, vonage_destination)
    assert (await test(group))[0]

    twilio.auth_token = "rotated" + "0" * 25  # the saved token no longer works
    assert await test(account.destination) == (False, "Twilio refused the credentials (HTTP 401)")
    ok, detail = await test(group)
    assert not ok and "Twilio refused" in detail and "Vonage balance" in detail
    assert twilio.messages == [] and vonage.messages == [] and exotel.messages == []

    segment_destination = await create_segment_destination(account.clients, twilio.url, "wk_x")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await test(segment_destination.name)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_test_message_goes_out_now_and_never_counts(account: SmsAccount, twilio: TwilioApi) -> None:
    created = await account.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=_sms_campaign(account))
    )  # a draft: test messages do not need it published
    sent = await account.clients.campaigns.SendTestMessage(
        campaign_pb.SendTestMessageRequest(
            campaign=created.name,
            phone_numbers=["+14155559999"],
            user_ids=[f"{account.tag}-02", f"{account.tag}-35"],  # the second has no phone
        )
    )
    first, by_user, no_phone = sent.results
    assert (first.phone, first.text, first.sent) == ("+14155559999", "Hi there, your code is ", True)
    assert first.detail == twilio.messages[0].sid
    assert (by_user.phone, by_user.text, by_user.sent) == ("+14155550002", "Hi Ana2, your code is C02", True)
    assert (no_phone.sent, no_phone.detail) == (False, "the user has no phone number")
    assert len(twilio.messages) == 2
    stats = await account.clients.campaigns.GetCampaignStats(
        campaign_pb.GetCampaignStatsRequest(name=f"{created.name}/stats")
    )
    assert (stats.sent, stats.failed, stats.skipped) == (0, 0, 0)

    twilio.auth_token = "rotated" + "0" * 25
    refused = await account.clients.campaigns.SendTestMessage(
        campaign_pb.SendTestMessageRequest(campaign=created.name, phone_numbers=["+14155559999"])
    )
    assert (refused.results[0].sent, refused.results[0].detail) == (
        False,
        "twilio 401 error 20003: Authenticate",
    )
    for bad, field in (
        (campaign_pb.SendTestMessageRequest(campaign=created.name), "phone_numbers"),
        (
            campaign_pb.SendTestMessageRequest(campaign=created.name, phone_numbers=["0415"]),
            "phone_numbers[0]",
        ),
        (
            campaign_pb.SendTestMessageRequest(campaign=created.name, phone_numbers=["+14155559999"] * 6),
            "phone_numbers",
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await account.clients.campaigns.SendTestMessage(bad)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in field_violations(raised.value)


async def test_a_thousand_users_through_a_group_whose_first_provider_throttles_then_fails(
    platform: Platform, twilio: TwilioApi, vonage: VonageApi
) -> None:
    """The issue's proof: every reachable user gets exactly one message across both providers
    (by delivery id), the unreachable are skipped with a reason, receipts become delivered counts
    and a forged receipt is refused."""
    _, key = await create_account(platform.address("campaign"), platform.settings.bootstrap_token, "sms 1k")
    clients = Clients.open(platform.addresses, key)
    try:
        tag = uuid.uuid4().hex[:8]
        users = []
        for i in range(1000):
            member = user(f"{tag}-{i:04d}", cohort=tag, code=f"K{i:04d}")
            if i % 10:  # one in ten has no phone
                member.phone = f"+1650555{i:04d}"
            users.append(member)
        await clients.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=users))
        segment = await create_segment(clients, condition("cohort", "EQUALS", tag))
        account = SmsAccount(clients, segment.name, "", tag)
        twilio_destination = await clients.dispatch.CreateDestination(
            dispatch_pb.CreateDestinationRequest(
                destination=dispatch_pb.Destination(
                    display_name="Twilio",
                    twilio=_twilio(
                        account_sid=ACCOUNT_SID,
                        auth_token=AUTH_TOKEN,
                        endpoint_url=twilio.url,
                        requests_per_second=5000,
                        sender="+16505550000",
                    ),
                )
            )
        )
        vonage.max_per_second = None
        group = await _group(
            account,
            twilio_destination.name,
            await _vonage_destination(account, vonage, requests_per_second=5000),
        )
        twilio.throttle_next(20)  # Twilio throttles first...
        twilio.revoke_after = 300  # ...then refuses everything
        campaign = _sms_campaign(account, body="Your code is {{ profile.code }}")
        campaign.destination = group
        created = await clients.campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=campaign))
        await clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
        stats = await _completed(account, created.name)
        assert (stats.sent, stats.failed, stats.skipped) == (900, 0, 100)
        assert {r.reason: r.count for r in stats.failure_reasons} == {"not reachable on the channel": 100}
        via_twilio = [m.to for m in twilio.messages]
        via_vonage = ["+" + m.to for m in vonage.messages]
        assert len(via_twilio) == 300 and len(via_vonage) == 600
        assert sorted(via_twilio + via_vonage) == sorted(u.phone for u in users if u.phone)
        assert len({m.client_ref for m in vonage.messages}) == 600  # one delivery id each
        receipts = await _receipts(account, created.name, 900)
        assert receipts.receipts.delivered == 900
        # A forged Twilio receipt for one of its messages is refused and changes nothing.
        destination_id = twilio_destination.name.removeprefix("destinations/")
        url = f"http://127.0.0.1:{platform.settings.receipts_port}/v1/receipts/twilio/{destination_id}"
        forged = {"MessageSid": twilio.messages[0].sid, "MessageStatus": "undelivered", "ErrorCode": "30007"}
        signature = {"X-Twilio-Signature": "Zm9yZ2Vk"}
        async with aiohttp.ClientSession() as http, http.post(url, data=forged, headers=signature) as answer:
            assert answer.status == 403
        await asyncio.sleep(0.5)
        again = await _receipts(account, created.name, 900)
        assert (again.receipts.delivered, again.receipts.undelivered) == (900, 0)
    finally:
        await clients.close()


async def test_a_provider_in_a_group_cannot_be_deleted(account: SmsAccount, vonage: VonageApi) -> None:
    member = await _vonage_destination(account, vonage)
    group = await _group(account, account.destination, member)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await account.clients.dispatch.DeleteDestination(dispatch_pb.DeleteDestinationRequest(name=member))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert group in (raised.value.details() or "")
    await account.clients.dispatch.DeleteDestination(dispatch_pb.DeleteDestinationRequest(name=group))
    await account.clients.dispatch.DeleteDestination(dispatch_pb.DeleteDestinationRequest(name=member))


async def test_an_sms_campaign_through_netcore(account: SmsAccount) -> None:
    netcore = NetcoreApi("feed123", "919800000000", "netcore-password")
    await netcore.start()
    try:
        config = dispatch_pb.NetcoreConfig(
            feed_id="feed123",
            username="919800000000",
            password="netcore-password",
            sender="HRLDIN",
            endpoint_url=netcore.url,
        )
        destination = await account.clients.dispatch.CreateDestination(
            dispatch_pb.CreateDestinationRequest(
                destination=dispatch_pb.Destination(display_name="Netcore", netcore=config)
            )
        )
        campaign = _sms_campaign(account)
        campaign.destination = destination.name
        created = await account.clients.campaigns.CreateCampaign(
            campaign_pb.CreateCampaignRequest(campaign=campaign)
        )
        assert created.destination_type == "netcore"
        await account.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
        stats = await _completed(account, created.name)
        assert (stats.sent, stats.failed, stats.skipped) == (30, 0, 8)
        assert sorted(m.to for m in netcore.messages) == [f"1415555{i:04d}" for i in range(30)]
        assert {m.sender for m in netcore.messages} == {"HRLDIN"}
        # The password changed at Netcore: its XML error is the reason.
        netcore.password = "changed"
        again = await account.clients.campaigns.CreateCampaign(
            campaign_pb.CreateCampaignRequest(campaign=campaign)
        )
        await account.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=again.name))
        refused = await _completed(account, again.name)
        assert (refused.sent, refused.failed) == (0, 30)
        assert {r.reason for r in refused.failure_reasons if r.reason.startswith("netcore")} == {
            "netcore error 102: Invalid feedid, username or password"
        }
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await account.clients.dispatch.CreateDestination(
                dispatch_pb.CreateDestinationRequest(
                    destination=dispatch_pb.Destination(
                        display_name="n",
                        netcore=dispatch_pb.NetcoreConfig(feed_id="f", username="u", sender="HRL"),
                    )
                )
            )
        violations = field_violations(raised.value)
        assert {"destination.netcore.password", "destination.netcore.sender"} <= set(violations)
    finally:
        await netcore.stop()


async def test_an_sms_campaign_through_msg91_carries_the_body_as_the_flow_variable(
    account: SmsAccount,
) -> None:
    flow = "5e1e93cad6fc054d8e759a5b"
    msg91 = Msg91Api("msg91-authkey", templates={flow: {"VAR1"}})
    await msg91.start()
    try:
        config = dispatch_pb.Msg91Config(
            authkey="msg91-authkey",
            sender="HRLDIN",
            route="4",
            flow_template_id=flow,
            dlt_entity_id="1101611580000043694",
            endpoint_url=msg91.url,
        )
        destination = await account.clients.dispatch.CreateDestination(
            dispatch_pb.CreateDestinationRequest(
                destination=dispatch_pb.Destination(display_name="MSG91", msg91=config)
            )
        )
        campaign = _sms_campaign(account, body="{{ profile.code }}: आज 20% छूट")
        campaign.destination = destination.name
        campaign.sms.dlt_template_id = "1107172768973504659"
        created = await account.clients.campaigns.CreateCampaign(
            campaign_pb.CreateCampaignRequest(campaign=campaign)
        )
        assert created.destination_type == "msg91"
        await account.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
        stats = await _completed(account, created.name)
        assert (stats.sent, stats.failed, stats.skipped) == (30, 0, 8)
        assert sorted(m.mobiles for m in msg91.messages) == [f"1415555{i:04d}" for i in range(30)]
        first = next(m for m in msg91.messages if m.mobiles == "14155550006")
        assert (first.variables["VAR1"], first.sender, first.unicode) == ("C06: आज 20% छूट", "HRLDIN", True)
        # The caller's IP is no longer whitelisted at MSG91: 418, the reason recorded.
        msg91.ip_whitelisted = False
        again = await account.clients.campaigns.CreateCampaign(
            campaign_pb.CreateCampaignRequest(campaign=campaign)
        )
        await account.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=again.name))
        refused = await _completed(account, again.name)
        assert (refused.sent, refused.failed) == (0, 30)
        assert "msg91 418: IP not whitelisted" in {r.reason for r in refused.failure_reasons}
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await account.clients.dispatch.CreateDestination(
                dispatch_pb.CreateDestinationRequest(
                    destination=dispatch_pb.Destination(
                        display_name="m",
                        msg91=dispatch_pb.Msg91Config(authkey="k", sender="HRLDIN", flow_template_id="x"),
                    )
                )
            )
        assert "destination.msg91.flow_template_id" in field_violations(raised.value)
    finally:
        await msg91.stop()


@pytest.mark.parametrize("version", [2, 3])
async def test_msg91_delivery_reports_come_to_the_webhook_its_destination_shows(
    platform: Platform, account: SmsAccount, version: int
) -> None:
    flow = "5e1e93cad6fc054d8e759a5b"
    msg91 = Msg91Api("msg91-authkey", templates={flow: {"VAR1"}}, failing={"14155550003"})
    await msg91.start()
    try:
        config = dispatch_pb.Msg91Config(
            authkey="msg91-authkey", sender="HRLDIN", flow_template_id=flow, endpoint_url=msg91.url
        )
        destination = await account.clients.dispatch.CreateDestination(
            dispatch_pb.CreateDestinationRequest(
                destination=dispatch_pb.Destination(display_name="MSG91", msg91=config)
            )
        )
        # The URL to paste into MSG91's panel as the delivery-report webhook.
        base = f"http://127.0.0.1:{platform.settings.receipts_port}/v1/receipts/msg91/"
        assert destination.receipt_url.startswith(base) and "msg91-authkey" not in destination.receipt_url
        shown = await account.clients.dispatch.GetDestination(
            dispatch_pb.GetDestinationRequest(name=destination.name)
        )
        assert shown.receipt_url == destination.receipt_url and shown.msg91.authkey != "msg91-authkey"
        msg91.webhook_url, msg91.webhook_version = destination.receipt_url, version

        campaign = _sms_campaign(account)
        campaign.destination = destination.name
        name = await _send(account, campaign, "msg91")
        stats = await _receipts(account, name, 30)
        assert (stats.receipts.delivered, stats.receipts.undelivered, stats.receipts.failed) == (29, 0, 1)
        assert {r.reason: r.count for r in stats.failure_reasons}["failed after sending (msg91 16)"] == 1
        assert set(msg91.webhook_answers) == {200}

        report = [{"requestId": msg91.messages[0].request_id, "report": [{"status": "2"}]}]
        forged = destination.receipt_url[: destination.receipt_url.rindex("/")] + "/" + "0" * 32
        async with aiohttp.ClientSession() as http:
            async with http.post(forged, data={"data": json.dumps(report)}) as answer:
                assert answer.status == 403
            async with http.post(destination.receipt_url, data={"data": "not json"}) as answer:
                assert answer.status == 400
            # A repeated report of a message already counted changes nothing.
            async with http.post(destination.receipt_url, json=report) as answer:
                assert answer.status == 200
        await asyncio.sleep(0.5)
        again = await _receipts(account, name, 30)
        assert (again.receipts.delivered, again.receipts.undelivered) == (29, 0)
    finally:
        await msg91.stop()


async def test_twilio_and_vonage_destinations_show_where_replies_go(
    platform: Platform, account: SmsAccount, vonage: VonageApi
) -> None:
    twilio = await account.clients.dispatch.GetDestination(
        dispatch_pb.GetDestinationRequest(name=account.destination)
    )
    base = f"http://127.0.0.1:{platform.settings.receipts_port}/v1"
    twilio_id = account.destination.removeprefix("destinations/")
    assert twilio.reply_url == f"{base}/inbound/twilio/{twilio_id}"
    assert twilio.receipt_url == f"{base}/receipts/twilio/{twilio_id}"
    # Vonage signs callbacks only with a signature secret; without one its URLs carry a secret token.
    signed = await _vonage_destination(account, vonage, signature_secret="vonage-signature-secret")
    got = await account.clients.dispatch.GetDestination(dispatch_pb.GetDestinationRequest(name=signed))
    assert got.reply_url == f"{base}/inbound/vonage/{signed.removeprefix('destinations/')}"
    assert got.receipt_url == f"{base}/receipts/vonage/{signed.removeprefix('destinations/')}"
    unsigned = await _vonage_destination(account, vonage)
    got = await account.clients.dispatch.GetDestination(dispatch_pb.GetDestinationRequest(name=unsigned))
    prefix = f"{base}/inbound/vonage/{unsigned.removeprefix('destinations/')}/"
    assert got.reply_url.startswith(prefix) and len(got.reply_url) == len(prefix) + 32
    assert got.receipt_url.startswith(f"{base}/receipts/vonage/") and len(got.receipt_url) == len(prefix) + 33
