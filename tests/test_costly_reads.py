"""Costly calls have hourly quotas shared by every replica: audiences streamed and estimated per
account, test messages per API key. Our own services' calls are not counted."""

from __future__ import annotations

import grpc
import pytest

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_campaign.previews import TEST_MESSAGES_PER_KEY_HOUR
from herald_segmentation.domain import AUDIENCE_STREAMS_PER_HOUR
from tests.conftest import Platform
from tests.harness import Clients, create_account
from tests.helpers import condition, matching
from tests.test_sms_campaign import SmsAccount, _sms_campaign, account, twilio

__all__ = ["account", "twilio"]


async def _stream(clients: Clients) -> grpc.StatusCode:
    request = pb.StreamAudienceRequest(
        audience=pb.Audience(filter=matching(condition("plan", "EQUALS", "x")))
    )
    try:
        async for _ in clients.segmentation.StreamAudience(request):
            pass
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_an_account_streams_at_most_so_many_audiences_an_hour(platform: Platform) -> None:
    _, key = await create_account(platform.address("campaign"), platform.settings.bootstrap_token, "reader")
    reader = Clients.open(platform.addresses, key)
    try:
        codes = [await _stream(reader) for _ in range(AUDIENCE_STREAMS_PER_HOUR + 1)]
        assert codes == [grpc.StatusCode.OK] * AUDIENCE_STREAMS_PER_HOUR + [
            grpc.StatusCode.RESOURCE_EXHAUSTED
        ]
        # Another account has its own count.
        assert await _stream(platform.clients) == grpc.StatusCode.OK
    finally:
        await reader.close()


async def test_a_key_sends_at_most_so_many_test_messages_an_hour(account: SmsAccount) -> None:
    # The account's admin key, new with the account: none of its quota used yet.
    created = await account.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=_sms_campaign(account))
    )
    phones = [f"+1415666{i:04d}" for i in range(5)]
    request = campaign_pb.SendTestMessageRequest(campaign=created.name, phone_numbers=phones)
    for _ in range(TEST_MESSAGES_PER_KEY_HOUR // len(phones)):
        await account.clients.campaigns.SendTestMessage(request)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await account.clients.campaigns.SendTestMessage(request)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at most 50 test messages per key an hour" in (refused.value.details() or "")
