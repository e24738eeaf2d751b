"""Destinations: validated, credentials never returned."""

from __future__ import annotations

import uuid

import grpc
import pytest

from herald.dispatch.v1 import dispatch_service_pb2 as pb
from tests.conftest import Platform
from tests.helpers import field_violations


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
