"""The mParticle export benchmark: N users exported to the fake mParticle Events API, then the
same audience exported to the fake Segment API, the four services as separate processes and each
fake in a process of its own, no rate limit on either. Prints each export's deliveries per second
from publish to the last batch the destination accepted, side by side."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import aiohttp
import grpc

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.campaign.v1 import campaign_service_pb2_grpc as campaign_grpc
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald.dispatch.v1 import dispatch_service_pb2_grpc as dispatch_grpc
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald.segmentation.v1 import segmentation_service_pb2_grpc as segmentation_grpc
from herald_common.logging import configure_logging
from tests.bench import (
    EXPORT_BUDGETS,
    HERALD_SERVICES,
    WRITE_KEY,
    PeakMemory,
    _accepted,
    cpu_used,
    fake_process,
    fake_segment,
    print_cpu_per_unit,
    service_processes,
    upsert_users,
)
from tests.harness import create_account, fresh_settings, keyed_channel
from tests.helpers import condition, matching, segment_export_campaign
from tests.processes import benchmark_servers

API_KEY, API_SECRET = "bench-key", "bench-secret"


async def _export(
    campaigns: campaign_grpc.CampaignServiceAsyncStub,
    campaign: campaign_pb.Campaign,
    accepted: Callable[[], Awaitable[int]],
    users: int,
    memory: PeakMemory,
) -> tuple[float, dict[str, float]]:
    """Seconds from publish until the destination accepted every user, and the CPU seconds each
    process used meanwhile."""
    created = await campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=campaign))
    before = await accepted()
    memory.watch_servers()
    idle_rate = await memory.idle_rate(HERALD_SERVICES)
    cpu_before = memory.cpu_seconds()
    started = time.perf_counter()
    await campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    while await accepted() - before < users:  # noqa: ASYNC110 - polling another process
        await asyncio.sleep(0.1)
    elapsed = time.perf_counter() - started
    return elapsed, cpu_used(cpu_before, await memory.quiet(HERALD_SERVICES, idle_rate))


async def _campaigns(
    channels: tuple[grpc.aio.Channel, grpc.aio.Channel, grpc.aio.Channel],
    tag: str,
    users: int,
    urls: tuple[str, str],
    http: aiohttp.ClientSession,
    memory: PeakMemory,
) -> tuple[tuple[float, dict[str, float]], tuple[float, dict[str, float]]]:
    segmentation, campaigns_channel, dispatch_channel = channels
    mparticle_url, segment_url = urls
    await upsert_users(segmentation, tag, users, phones=True)
    segment = await segmentation_grpc.SegmentationServiceStub(segmentation).CreateSegment(
        segmentation_pb.CreateSegmentRequest(
            segment=segmentation_pb.Segment(
                display_name="mp", filter=matching(condition("cohort", "EQUALS", tag))
            )
        )
    )
    dispatch = dispatch_grpc.DispatchServiceStub(dispatch_channel)
    mparticle = await dispatch.CreateDestination(
        dispatch_pb.CreateDestinationRequest(
            destination=dispatch_pb.Destination(
                display_name="mParticle",
                mparticle=dispatch_pb.MparticleConfig(
                    endpoint_url=mparticle_url,
                    api_key=API_KEY,
                    api_secret=API_SECRET,
                    environment="production",
                    batches_per_second=100_000,  # the run measures Herald, not a workspace's quota
                ),
            )
        )
    )
    segment_destination = await dispatch.CreateDestination(
        dispatch_pb.CreateDestinationRequest(
            destination=dispatch_pb.Destination(
                display_name="Segment",
                segment=dispatch_pb.SegmentConfig(write_key=WRITE_KEY, endpoint_url=segment_url),
            )
        )
    )
    campaigns = campaign_grpc.CampaignServiceStub(campaigns_channel)
    mparticle_campaign = campaign_pb.Campaign(
        display_name="mParticle bench",
        audience=campaign_pb.Audience(segment=segment.name),
        destination=mparticle.name,
        schedule=campaign_pb.Schedule(send_now=campaign_pb.SendNow()),
        mparticle_export=campaign_pb.MparticleExportContent(
            event_name="Herald Bench",
            profile_attributes=["first_name", "plan", "phone"],
            custom_attributes={
                "coupon": "VIP20",
                "greeting": "Hi {{ profile.first_name }}, code {{ profile.code }}",
            },
        ),
    )

    async def mparticle_batches() -> int:
        return (await _accepted(http, mparticle_url))["batches"]

    async def segment_events() -> int:
        return (await _accepted(http, segment_url))["events"]

    mparticle_run = await _export(campaigns, mparticle_campaign, mparticle_batches, users, memory)
    segment_campaign = segment_export_campaign(segment.name, segment_destination.name)
    return mparticle_run, await _export(campaigns, segment_campaign, segment_events, users, memory)


async def run(users: int) -> None:
    configure_logging("warning")
    memory = PeakMemory()
    tag = uuid.uuid4().hex[:8]
    async with (
        benchmark_servers("herald-bench-mparticle-") as (database_url, nats_url),
        fresh_settings(database_url, nats_url) as settings,
        fake_process(
            memory,
            "fake mParticle API",
            "herald_sandbox.mparticle_api",
            "--api-key",
            API_KEY,
            "--api-secret",
            API_SECRET,
        ) as mparticle_url,
        fake_segment(memory) as segment_url,
        aiohttp.ClientSession() as http,
        service_processes(settings, memory) as services,
    ):
        _, key = await create_account(services.address("campaign"), settings.bootstrap_token, "mp bench")
        async with (
            keyed_channel(services.address("segmentation"), key) as segmentation,
            keyed_channel(services.address("campaign"), key) as campaigns_channel,
            keyed_channel(services.address("dispatch"), key) as dispatch_channel,
        ):
            (mparticle_s, mparticle_cpu), (segment_s, segment_cpu) = await _campaigns(
                (segmentation, campaigns_channel, dispatch_channel),
                tag,
                users,
                (mparticle_url, segment_url),
                http,
                memory,
            )
    print(f"mparticle: {users:,} users exported to the fake mParticle API, then to the fake Segment API")
    print(f"  mParticle export   {users / mparticle_s:>10,.0f} deliveries/s  ({mparticle_s:,.1f} s)")
    print_cpu_per_unit(mparticle_cpu, users, "delivery", indent="    ")
    print(f"  Segment export     {users / segment_s:>10,.0f} deliveries/s  ({segment_s:,.1f} s)")
    print_cpu_per_unit(segment_cpu, users, "delivery", EXPORT_BUDGETS, indent="    ")
