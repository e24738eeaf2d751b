"""Dead letters can be replayed once their cause is fixed: an operator republishes them to where
they came from, each once, and only with the bootstrap token."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import grpc
import pytest
from nats.js import JetStreamContext

from herald.accounts.v1 import account_service_pb2 as accounts_pb
from herald.accounts.v1 import account_service_pb2_grpc as accounts_grpc
from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald.events.v1 import events_pb2 as events
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald_common import api
from herald_common.bus import REASON_HEADER, SOURCE_SUBJECT_HEADER, Subjects
from herald_sandbox.segment_api import SegmentApi
from tests.conftest import Platform, eventually
from tests.helpers import (
    condition,
    create_segment,
    create_segment_destination_for,
    segment_export_campaign,
    user,
)


async def test_a_dead_lettered_batch_is_delivered_once_replayed(
    platform: Platform, segment_api: SegmentApi, js: JetStreamContext
) -> None:
    tag = uuid.uuid4().hex[:8]
    await platform.segmentation.UpsertUsers(
        segmentation_pb.UpsertUsersRequest(users=[user(f"{tag}-{i}", cohort=tag) for i in range(3)])
    )
    segment = await create_segment(platform, condition("cohort", "EQUALS", tag))
    destination = await create_segment_destination_for(platform, segment_api)
    later = api.utcnow() + timedelta(days=1)
    campaign = segment_export_campaign(
        segment.name,
        destination.name,
        schedule=campaign_pb.Schedule(send_later=campaign_pb.SendLater(send_time=api.timestamp(later))),
    )
    created = await platform.campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=campaign))
    await platform.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    # A batch of it that dispatch set aside after failing every attempt (during an outage of a
    # dependency, say), now waiting among the dead letters.
    batch = events.DeliveryBatch(
        batch_id=str(uuid.uuid4()),
        campaign=created.name,
        campaign_version=2,  # as published (1 is the draft it was created as)
        run=f"{created.name}/runs/{uuid.uuid4()}",
        destination=destination.name,
        plan_time=api.timestamp(api.utcnow()),
        recipients=[
            events.Recipient(
                delivery_id=f"{tag}-dl-{i}", user_id=f"{tag}-{i}", attributes_json=json.dumps({}).encode()
            )
            for i in range(3)
        ],
        account=platform.account,
    )
    subjects = Subjects(platform.settings.namespace)
    source = subjects.delivery_batch("segment", destination.name.removeprefix("destinations/"))
    await js.publish(
        subjects.dead_letter("dispatch-segment"),
        batch.SerializeToString(),
        headers={REASON_HEADER: "failed 10 times: OSError()", SOURCE_SUBJECT_HEADER: source},
    )
    request = accounts_pb.ReplayDeadLettersRequest(consumer="dispatch-segment")
    with pytest.raises(grpc.aio.AioRpcError) as refused:  # an account's admin key may not
        await platform.accounts.ReplayDeadLetters(request)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

    operator_channel = grpc.aio.insecure_channel(platform.address("campaign"))
    operator = accounts_grpc.AccountServiceStub(operator_channel)
    bootstrap = (("authorization", f"Bootstrap {platform.settings.bootstrap_token}"),)
    replayed = await operator.ReplayDeadLetters(request, metadata=bootstrap)
    assert (replayed.replayed, replayed.remaining) == (1, 0)

    async def delivered() -> bool:
        return {f"{tag}-dl-{i}" for i in range(3)} <= set(segment_api.events)

    try:
        await eventually(delivered)
    except AssertionError:
        found = await platform.dispatch.ListDeliveries(
            dispatch_pb.ListDeliveriesRequest(campaign=created.name, user_id=f"{tag}-0")
        )
        raise AssertionError(f"not delivered; dispatch recorded {list(found.deliveries)}") from None
    again = await operator.ReplayDeadLetters(request, metadata=bootstrap)
    assert (again.replayed, again.remaining) == (0, 0)  # replayed once, then gone
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await operator.ReplayDeadLetters(
            accounts_pb.ReplayDeadLettersRequest(consumer="no such/consumer", limit=-1), metadata=bootstrap
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await operator_channel.close()
    await platform.campaigns.StopCampaign(campaign_pb.StopCampaignRequest(name=created.name))


async def test_a_campaign_says_when_its_deliveries_wait_among_the_dead_letters(
    platform: Platform, js: JetStreamContext
) -> None:
    """A batch dispatch cannot handle however often it tries (a recipient whose attributes are
    not JSON) is dead-lettered, and its campaign says so until an operator replays it."""
    from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb

    tag = uuid.uuid4().hex[:8]
    await platform.segmentation.UpsertUsers(
        segmentation_pb.UpsertUsersRequest(users=[user(f"{tag}-0", cohort=tag)])
    )
    segment = await create_segment(platform, condition("cohort", "EQUALS", tag))
    twilio = dispatch_pb.TwilioConfig(
        account_sid="AC" + "0" * 31 + "2", auth_token="t" * 32, endpoint_url="http://127.0.0.1:9"
    )
    setattr(twilio, "from", "+14155550000")
    destination = await platform.dispatch.CreateDestination(
        dispatch_pb.CreateDestinationRequest(
            destination=dispatch_pb.Destination(display_name="t", twilio=twilio)
        )
    )
    later = api.utcnow() + timedelta(days=1)
    created = await platform.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(
            campaign=campaign_pb.Campaign(
                display_name="dead letters",
                audience=campaign_pb.Audience(segment=segment.name),
                destination=destination.name,
                schedule=campaign_pb.Schedule(
                    send_later=campaign_pb.SendLater(send_time=api.timestamp(later))
                ),
                sms=campaign_pb.SmsContent(body="Hi"),
            )
        )
    )
    await platform.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    poison = events.DeliveryBatch(
        batch_id=str(uuid.uuid4()),
        campaign=created.name,
        campaign_version=2,
        run=f"{created.name}/runs/{uuid.uuid4()}",
        destination=destination.name,
        plan_time=api.timestamp(api.utcnow()),
        recipients=[
            events.Recipient(delivery_id=f"{tag}-p", user_id=f"{tag}-0", attributes_json=b"{not json")
        ],
        account=platform.account,
    )
    subjects = Subjects(platform.settings.namespace)
    await js.publish(
        subjects.delivery_batch("twilio", destination.name.removeprefix("destinations/")),
        poison.SerializeToString(),
        headers={"Nats-Msg-Id": poison.batch_id},
    )

    async def says_so() -> bool:
        got = await platform.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=created.name))
        return "dead-lettered" in got.state_reason and "ReplayDeadLetters" in got.state_reason

    await eventually(says_so, within=30)
    await platform.campaigns.StopCampaign(campaign_pb.StopCampaignRequest(name=created.name))
