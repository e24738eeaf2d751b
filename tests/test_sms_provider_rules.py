"""Provider rules at their edges: Vonage's 40-character client-ref, India's DLT ids through Vonage
and Netcore (checked when publishing and again when sending), Netcore's Unicode flag."""

from __future__ import annotations

import grpc
import pytest

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_sandbox.netcore_api import NetcoreApi
from herald_sandbox.vonage_api import VonageApi
from tests.helpers import user
from tests.test_sms_campaign import (
    SmsAccount,
    _completed,
    _sms_campaign,
    _vonage_destination,
    account,
    twilio,
    vonage,
)

__all__ = ["account", "twilio", "vonage"]  # fixtures
ENTITY, TEMPLATE = "1101611580000043694", "1107172768973504659"


async def test_vonage_test_messages_fit_its_client_ref(account: SmsAccount, vonage: VonageApi) -> None:
    campaign = _sms_campaign(account)
    campaign.destination = await _vonage_destination(account, vonage)
    created = await account.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=campaign)
    )
    sent = await account.clients.campaigns.SendTestMessage(
        campaign_pb.SendTestMessageRequest(campaign=created.name, phone_numbers=["+14155559999"])
    )
    assert [(r.sent, r.detail == "") for r in sent.results] == [(True, False)], sent.results
    assert [len(m.client_ref) <= 40 for m in vonage.messages] == [True]


async def test_india_through_vonage_needs_its_entity_id(account: SmsAccount, vonage: VonageApi) -> None:
    indian = user(f"{account.tag}-in", cohort=account.tag, code="IN1")
    indian.phone = "+919812345678"
    await account.clients.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=[indian]))
    campaign = _sms_campaign(account)
    campaign.destination = await _vonage_destination(account, vonage)  # no dlt_entity_id
    campaign.sms.dlt_template_id = TEMPLATE
    created = await account.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=campaign)
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await account.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "dlt_entity_id" in (raised.value.details() or "")
    # Test messages are held to it too, at send time: nothing reaches Vonage.
    sent = await account.clients.campaigns.SendTestMessage(
        campaign_pb.SendTestMessageRequest(campaign=created.name, phone_numbers=["+919812345678"])
    )
    [answer] = sent.results
    assert not answer.sent and "dlt_entity_id" in answer.detail
    assert vonage.messages == []


async def test_netcore_carries_dlt_ids_and_flags_unicode(account: SmsAccount) -> None:
    netcore = NetcoreApi("feed123", "919800000000", "netcore-password")
    await netcore.start()
    try:
        indian = user(f"{account.tag}-in", cohort=account.tag, code="₹50")  # not GSM-7: UCS-2
        indian.phone = "+919812345678"
        await account.clients.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=[indian]))
        config = dispatch_pb.NetcoreConfig(
            feed_id="feed123",
            username="919800000000",
            password="netcore-password",
            sender="HRLDIN",
            endpoint_url=netcore.url,
            dlt_entity_id=ENTITY,
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
        with pytest.raises(grpc.aio.AioRpcError) as raised:  # +91 numbers need the template id
            await account.clients.campaigns.PublishCampaign(
                campaign_pb.PublishCampaignRequest(name=created.name)
            )
        assert "campaign.sms.dlt_template_id" in (raised.value.details() or "")
        campaign.sms.dlt_template_id = TEMPLATE
        created = await account.clients.campaigns.CreateCampaign(
            campaign_pb.CreateCampaignRequest(campaign=campaign)
        )
        await account.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
        stats = await _completed(account, created.name)
        assert stats.sent == 31
        by_number = {m.to: m for m in netcore.messages}
        assert by_number["919812345678"].extra == {
            "entityid": ENTITY,
            "templateid": TEMPLATE,
            "unicode": "1",
            "async": "0",
        }
        assert "unicode" not in by_number["14155550001"].extra  # GSM-7 text
    finally:
        await netcore.stop()
