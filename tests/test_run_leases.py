"""A run keeps its lease while it works: scheduler replicas whose audience's first page takes
longer than a lease do not pass the run between them, each starting it over. A replica that stops
(a redeploy) hands its runs over at once."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald.segmentation.v1 import segmentation_service_pb2_grpc as segmentation_grpc
from herald_common.embedded import free_port
from herald_sandbox.segment_api import SegmentApi
from herald_scheduler import main as scheduler_main
from tests.conftest import Platform, eventually
from tests.helpers import (
    completed_stats,
    condition,
    create_segment,
    create_segment_destination_for,
    segment_export_campaign,
    user,
)

FIRST_PAGE_DELAY_SECONDS = 2.5  # far longer than the replicas' 1 s lease


async def _slow_segmentation(real_address: str, calls: list[str]) -> tuple[grpc.aio.Server, str]:
    """Segmentation as the replicas see it: StreamAudience answers only after a long pause (a huge
    audience, a slow segment), then forwards the real service's pages; `calls` counts them."""
    channel = grpc.aio.insecure_channel(real_address)
    real = segmentation_grpc.SegmentationServiceStub(channel)

    async def stream_audience(
        request: segmentation_pb.StreamAudienceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[segmentation_pb.StreamAudienceResponse]:
        calls.append(request.start_after_user_id)
        await asyncio.sleep(FIRST_PAGE_DELAY_SECONDS)
        metadata = tuple((key, value) for key, value in context.invocation_metadata() or ())
        async for page in real.StreamAudience(request, metadata=metadata):
            yield page

    handler = grpc.method_handlers_generic_handler(
        "herald.segmentation.v1.SegmentationService",
        {
            "StreamAudience": grpc.unary_stream_rpc_method_handler(
                stream_audience,
                request_deserializer=segmentation_pb.StreamAudienceRequest.FromString,
                response_serializer=segmentation_pb.StreamAudienceResponse.SerializeToString,
            )
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _export_to_twenty_users(
    platform: Platform, segment_api: SegmentApi
) -> tuple[str, campaign_pb.Campaign]:
    """Twenty users of a new cohort, and a Segment export campaign to them; the cohort's tag."""
    tag = uuid.uuid4().hex[:8]
    await platform.segmentation.UpsertUsers(
        segmentation_pb.UpsertUsersRequest(users=[user(f"{tag}-{i}", cohort=tag) for i in range(20)])
    )
    segment = await create_segment(platform, condition("cohort", "EQUALS", tag))
    destination = await create_segment_destination_for(platform, segment_api)
    return tag, segment_export_campaign(segment.name, destination.name)


async def _published(platform: Platform, campaign: campaign_pb.Campaign) -> str:
    created = await platform.campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=campaign))
    await platform.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    return created.name


def _received(segment_api: SegmentApi, tag: str) -> list[str]:
    """The users of the cohort Segment received events for, in order."""
    return sorted(e["userId"] for e in segment_api.events.values() if e["userId"].startswith(tag))


@contextlib.asynccontextmanager
async def _replicas_on_slow_segmentation(
    platform: Platform, count: int, **settings: Any
) -> AsyncIterator[list[str]]:
    """The platform's scheduler swapped for `count` replicas (with `settings`) that read a slow
    segmentation, until the block ends; yields the StreamAudience calls they make."""
    calls: list[str] = []
    proxy, proxy_address = await _slow_segmentation(platform.address("segmentation"), calls)
    await platform.hosts["scheduler"].stop()
    addresses = {**platform.settings.addresses, "segmentation": proxy_address}
    replica_settings = replace(platform.settings, addresses=addresses, **settings)
    replicas = [await scheduler_main.start(replica_settings, port=0) for _ in range(count)]
    try:
        yield calls
    finally:
        for replica in replicas:
            await replica.stop()
        platform.hosts["scheduler"] = await scheduler_main.start(platform.settings)
        await proxy.stop(None)


async def test_replicas_with_a_slow_first_page_plan_a_run_once(
    platform: Platform, segment_api: SegmentApi
) -> None:
    tag, campaign = await _export_to_twenty_users(platform, segment_api)
    # Only two replicas with a 1 s lease run runs meanwhile, both reading the slow segmentation.
    async with _replicas_on_slow_segmentation(platform, 2, run_lease_seconds=1.0) as calls:
        name = await _published(platform, campaign)
        await completed_stats(platform, name)
        assert _received(segment_api, tag) == sorted(f"{tag}-{i}" for i in range(20))
        # The replica that took the run kept it through the slow first page: planned once, not
        # taken over and started again as each lease ran out.
        assert calls == [""], calls


async def test_a_stopped_replica_hands_its_run_over_at_once(
    platform: Platform, segment_api: SegmentApi
) -> None:
    tag, campaign = await _export_to_twenty_users(platform, segment_api)
    # The replica that takes the run reads the slow segmentation and is stopped while it waits.
    async with _replicas_on_slow_segmentation(platform, 1) as calls:
        name = await _published(platform, campaign)
        await eventually(lambda: asyncio.sleep(0, bool(calls)))
    # The replica that comes up resumes the run well inside the 60 s lease the first one held.
    await completed_stats(platform, name, within=20)
    assert _received(segment_api, tag) == sorted(f"{tag}-{i}" for i in range(20))
