"""What operators see: reflection (v1 and v1alpha) lists every service and serves the protos with
their comments; health reports SERVING."""

from __future__ import annotations

import socket
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from tests.conftest import Platform

EXPECTED = {
    "campaign": {"herald.campaign.v1.CampaignService", "herald.accounts.v1.AccountService"},
    "segmentation": {"herald.segmentation.v1.SegmentationService"},
    "scheduler": {"herald.scheduler.v1.SchedulerService"},
    "dispatch": {"herald.dispatch.v1.DispatchService"},
}


REFLECTION_VERSIONS = ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection")


async def _reflect(
    channel: grpc.aio.Channel, version: str, *requests: reflection_pb2.ServerReflectionRequest
) -> list[reflection_pb2.ServerReflectionResponse]:
    """Asks a reflection version (v1's messages are v1alpha's, field for field)."""
    call = channel.stream_stream(
        f"/{version}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return [response async for response in call(iter(requests))]


def _comments(file: descriptor_pb2.FileDescriptorProto) -> list[str]:
    return [location.leading_comments.strip() for location in file.source_code_info.location]


@pytest.mark.parametrize("service", sorted(EXPECTED))
async def test_reflection_and_health(platform: Platform, service: str) -> None:
    async with grpc.aio.insecure_channel(platform.address(service)) as channel:
        for version in REFLECTION_VERSIONS:
            [listed] = await _reflect(
                channel, version, reflection_pb2.ServerReflectionRequest(list_services="")
            )
            assert {s.name for s in listed.list_services_response.service} == {
                *EXPECTED[service],
                "grpc.health.v1.Health",
                *REFLECTION_VERSIONS,
            }

        health: Any = health_pb2_grpc.HealthStub(channel)
        for name in ("", *EXPECTED[service]):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("version", REFLECTION_VERSIONS)
async def test_reflection_serves_the_protos_comments_and_their_imports(
    platform: Platform, version: str
) -> None:
    async with grpc.aio.insecure_channel(platform.address("campaign")) as channel:
        [found, missing, own] = await _reflect(
            channel,
            version,
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="herald.campaign.v1.CampaignService.PublishCampaign"
            ),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="herald.campaign.v1.NoSuchThing"),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=version),
        )
    files = {
        file.name: file
        for file in map(
            descriptor_pb2.FileDescriptorProto.FromString,
            found.file_descriptor_response.file_descriptor_proto,
        )
    }
    campaign = files["herald/campaign/v1/campaign_service.proto"]
    assert "Moves a draft campaign to SCHEDULED; its schedule then starts runs." in _comments(campaign)
    # Every import comes along, so a client can resolve each type (google.api's annotations too).
    assert set(campaign.dependency) <= set(files)
    assert "google/api/field_behavior.proto" in files
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    [reflection_file] = own.file_descriptor_response.file_descriptor_proto
    assert descriptor_pb2.FileDescriptorProto.FromString(reflection_file).package == version.rsplit(".", 1)[0]


async def test_a_busy_port_stops_a_second_instance_with_the_setting_to_change(platform: Platform) -> None:
    from herald_common.grpc_server import PortInUse
    from herald_segmentation import main as segmentation_main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        for port in (busy, platform.hosts["segmentation"].port):  # any program, or Herald itself
            with pytest.raises(PortInUse, match="HERALD_SEGMENTATION_PORT"):
                await segmentation_main.start(platform.settings, port=port)
