"""What operators see: reflection lists every service, health reports SERVING."""

from __future__ import annotations

import socket
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import Platform

EXPECTED = {
    "campaign": {"herald.campaign.v1.CampaignService", "herald.accounts.v1.AccountService"},
    "segmentation": {"herald.segmentation.v1.SegmentationService"},
    "scheduler": {"herald.scheduler.v1.SchedulerService"},
    "dispatch": {"herald.dispatch.v1.DispatchService"},
}


@pytest.mark.parametrize("service", sorted(EXPECTED))
async def test_reflection_and_health(platform: Platform, service: str) -> None:
    async with grpc.aio.insecure_channel(platform.address(service)) as channel:
        stub: Any = reflection_pb2_grpc.ServerReflectionStub(channel)  # type: ignore[arg-type]
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        listed = set()
        async for response in responses:
            listed = {s.name for s in response.list_services_response.service}
        assert listed == {
            *EXPECTED[service],
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }

        health: Any = health_pb2_grpc.HealthStub(channel)
        for name in ("", *EXPECTED[service]):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


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
