"""SMS delivery safety: a message a provider may have sent is never sent again, through any
provider; what was proved not sent goes on; opt-outs hold at send time; a stop stops."""

from __future__ import annotations

import socket

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from tests.fakes.twilio_api import TwilioApi
from tests.fakes.vonage_api import VonageApi
from tests.test_sms_campaign import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    SmsAccount,
    _completed,
    _group,
    _sms_campaign,
    _twilio,
    _vonage_destination,
    account,
    twilio,
    vonage,
)

__all__ = ["account", "twilio", "vonage"]  # fixtures


async def _publish(account: SmsAccount, campaign: campaign_pb.Campaign) -> str:
    created = await account.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=campaign)
    )
    await account.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    return created.name


async def test_a_group_never_sends_again_what_its_first_provider_may_have_sent(
    account: SmsAccount, twilio: TwilioApi, vonage: VonageApi
) -> None:
    # Twilio takes every message, but answers one after the answer timeout, drops the connection
    # of another, and three more get an edge proxy's 502, 503 and 504: none proves "not sent".
    twilio.faults = ["late", "drop", 502, 503, 504]
    campaign = _sms_campaign(account)
    campaign.destination = await _group(
        account, account.destination, await _vonage_destination(account, vonage)
    )
    stats = await _completed(account, await _publish(account, campaign))
    assert (stats.sent, stats.unknown, stats.failed, stats.skipped) == (25, 5, 0, 8)
    assert vonage.messages == []  # nothing failed over
    phones = [m.to for m in twilio.messages]
    assert sorted(phones) == [f"+1415555{i:04d}" for i in range(30)]  # each phone texted once
    reasons = {r.reason for r in stats.failure_reasons}
    assert any("may have been sent" in r and "502" in r for r in reasons), reasons
    assert any("SocketTimeoutError" in r for r in reasons), reasons


async def test_a_provider_that_cannot_be_reached_fails_over_and_each_phone_is_texted_once(
    account: SmsAccount, vonage: VonageApi
) -> None:
    with socket.socket() as unused:  # a port nothing listens on: every connection is refused
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    unreachable = await account.clients.dispatch.CreateDestination(
        dispatch_pb.CreateDestinationRequest(
            destination=dispatch_pb.Destination(
                display_name="Twilio, down",
                twilio=_twilio(
                    account_sid=ACCOUNT_SID,
                    auth_token=AUTH_TOKEN,
                    endpoint_url=f"http://127.0.0.1:{closed_port}",
                    sender="+14155550000",
                ),
            )
        )
    )
    campaign = _sms_campaign(account)
    campaign.destination = await _group(account, unreachable.name, await _vonage_destination(account, vonage))
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
