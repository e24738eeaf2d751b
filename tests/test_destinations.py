"""Destinations: validated, credentials never returned, rotated in place."""

from __future__ import annotations

import uuid

import grpc
import pytest
from google.protobuf import field_mask_pb2

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald_sandbox.segment_api import SegmentApi
from tests.conftest import Platform
from tests.helpers import (
    completed_stats,
    condition,
    create_segment,
    field_violations,
    segment_export_campaign,
    user,
)


async def test_destination_round_trip_masks_the_write_key(platform: Platform) -> None:
    key = f"wk_{uuid.uuid4().hex}"
    created = await platform.dispatch.CreateDestination(
        pb.CreateDestinationRequest(
            destination=pb.Destination(
                display_name="EU source",
                segment=pb.SegmentConfig(write_key=key, endpoint_url="https://events.eu1.segmentapis.com"),
            )
        )
    )
    assert created.type == pb.DestinationType.DESTINATION_TYPE_SEGMENT
    fetched = await platform.dispatch.GetDestination(pb.GetDestinationRequest(name=created.name))
    listed = await platform.dispatch.ListDestinations(pb.ListDestinationsRequest(page_size=1000))
    for shown in (created, fetched, next(d for d in listed.destinations if d.name == created.name)):
        assert shown.segment.write_key.endswith(key[-4:])
        assert key not in shown.segment.write_key
        assert shown.segment.endpoint_url == "https://events.eu1.segmentapis.com"

    await platform.dispatch.DeleteDestination(pb.DeleteDestinationRequest(name=created.name))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await platform.dispatch.GetDestination(pb.GetDestinationRequest(name=created.name))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("destination", "fields"),
    [
        (pb.Destination(display_name="x"), {"destination.config"}),
        (
            pb.Destination(segment=pb.SegmentConfig(write_key="", endpoint_url="ftp://example")),
            {"destination.display_name", "destination.segment.write_key", "destination.segment.endpoint_url"},
        ),
    ],
)
async def test_bad_destinations_name_the_field(
    platform: Platform, destination: pb.Destination, fields: set[str]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await platform.dispatch.CreateDestination(pb.CreateDestinationRequest(destination=destination))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(raised.value)) == fields


async def test_malformed_destination_name_is_invalid(platform: Platform) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await platform.dispatch.GetDestination(pb.GetDestinationRequest(name="segments/abc"))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "name" in field_violations(raised.value)


async def test_a_rotated_write_key_is_what_the_next_deliveries_carry(
    platform: Platform, segment_api: SegmentApi
) -> None:
    old_key, new_key = f"wk_old_{uuid.uuid4().hex}", f"wk_new_{uuid.uuid4().hex}"
    segment_api.write_keys |= {old_key, new_key}
    created = await platform.dispatch.CreateDestination(
        pb.CreateDestinationRequest(
            destination=pb.Destination(
                display_name="Source",
                segment=pb.SegmentConfig(write_key=old_key, endpoint_url=segment_api.url),
            )
        )
    )
    updated = await platform.dispatch.UpdateDestination(
        pb.UpdateDestinationRequest(
            destination=pb.Destination(name=created.name, segment=pb.SegmentConfig(write_key=new_key)),
            update_mask=field_mask_pb2.FieldMask(paths=["segment.write_key"]),
        )
    )
    # Only the write key changed; it is shown masked, like any credential.
    assert updated.segment.endpoint_url == segment_api.url and updated.display_name == "Source"
    assert updated.segment.write_key.endswith(new_key[-4:]) and new_key not in updated.segment.write_key
    tag = uuid.uuid4().hex[:8]
    await platform.segmentation.UpsertUsers(
        segmentation_pb.UpsertUsersRequest(users=[user(f"{tag}-1", cohort=tag)])
    )
    segment = await create_segment(platform, condition("cohort", "EQUALS", tag))
    campaign = await platform.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=segment_export_campaign(segment.name, created.name))
    )
    await platform.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=campaign.name))
    assert (await completed_stats(platform, campaign.name)).sent == 1
    [request] = [r for r in segment_api.requests if r.path == "/v1/batch"]
    assert request.body["writeKey"] == new_key


async def test_an_update_that_cannot_apply_is_refused_and_changes_nothing(platform: Platform) -> None:
    key = f"wk_{uuid.uuid4().hex}"
    created = await platform.dispatch.CreateDestination(
        pb.CreateDestinationRequest(
            destination=pb.Destination(
                display_name="Source",
                segment=pb.SegmentConfig(write_key=key, endpoint_url="https://api.segment.io"),
            )
        )
    )
    masked = created.segment.write_key
    cases = {
        # The kind of a destination stays.
        "destination.twilio": (
            pb.Destination(name=created.name, twilio=pb.TwilioConfig(account_sid="AC" + "0" * 32)),
            ["twilio"],
        ),
        # The masked form GetDestination shows is not a key.
        "destination.segment.write_key": (
            pb.Destination(
                name=created.name, segment=pb.SegmentConfig(write_key=masked, endpoint_url="https://x.io")
            ),
            ["segment"],
        ),
        "destination.segment.endpoint_url": (
            pb.Destination(name=created.name, segment=pb.SegmentConfig(endpoint_url="ftp://example")),
            ["segment.endpoint_url"],
        ),
        "destination.display_name": (pb.Destination(name=created.name), ["display_name"]),
        "update_mask": (pb.Destination(name=created.name, display_name="New"), []),
    }
    for field, (destination, paths) in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await platform.dispatch.UpdateDestination(
                pb.UpdateDestinationRequest(
                    destination=destination, update_mask=field_mask_pb2.FieldMask(paths=paths)
                )
            )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in field_violations(raised.value), (field, field_violations(raised.value))
    unchanged = await platform.dispatch.GetDestination(pb.GetDestinationRequest(name=created.name))
    assert (unchanged.display_name, unchanged.segment.write_key) == ("Source", masked)
    assert unchanged.segment.endpoint_url == "https://api.segment.io"
    # Another account's destination is not found, as if it did not exist.
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await platform.dispatch.UpdateDestination(
            pb.UpdateDestinationRequest(
                destination=pb.Destination(name=f"destinations/{uuid.uuid4()}", display_name="x"),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            )
        )
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
