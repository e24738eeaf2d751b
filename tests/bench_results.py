"""The results benchmark: a campaign with a goal and a control group reaches every user (a
Segment export), then goal events arrive, two per user; the four services as separate processes.

Prints, next to the targets: how fast conversions are counted (goal events ingested to the last
conversion counted), GetCampaignStats latency (p50, p99) at that size, how fast a Best Time run
over the same users is planned, and each process's CPU per goal event and per planned user.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

import grpc
from google.protobuf.duration_pb2 import Duration

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.campaign.v1 import campaign_service_pb2_grpc as campaign_grpc
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald.dispatch.v1 import dispatch_service_pb2_grpc as dispatch_grpc
from herald.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from herald.scheduler.v1 import scheduler_service_pb2_grpc as scheduler_grpc
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald.segmentation.v1 import segmentation_service_pb2_grpc as segmentation_grpc
from herald_common import api
from herald_common.logging import configure_logging
from tests.bench import (
    HERALD_SERVICES,
    WRITE_KEY,
    PeakMemory,
    cpu_used,
    fake_segment,
    percentile,
    service_processes,
    upsert_users,
)
from tests.harness import create_account, fresh_settings, keyed_channel
from tests.helpers import condition, matching, segment_export_campaign
from tests.processes import benchmark_servers

TARGET_CONVERSIONS_PER_SECOND = 20_000
TARGET_STATS_P99_MS = 50.0
TARGET_BEST_TIME_PER_SECOND = 20_000
EVENTS_PER_CALL = 500
IN_FLIGHT = 8
STATS_CALLS = 1_000
HERALD = ("segmentation", "campaign", "scheduler", "dispatch")


@dataclass
class Sizes:
    users: int
    events_per_user: int


QUICK = Sizes(users=20_000, events_per_user=2)
FULL = Sizes(users=1_000_000, events_per_user=2)


async def _wait_for(check: Callable[[], Awaitable[bool]], within: float) -> float:
    """Seconds until `check` answers true (polled every 0.2 s)."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > within:
            raise RuntimeError(f"not done within {within:.0f} s")
        await asyncio.sleep(0.2)
    return time.monotonic() - started


def _goal_events(tag: str, users: int, offset: int, count: int) -> bytes:
    """One IngestEvents call, encoded: EVENTS_PER_CALL goal events from `offset` on."""
    events = []
    for n in range(offset, min(offset + EVENTS_PER_CALL, count)):
        event = segmentation_pb.Event(
            user_id=f"{tag}-{n % users:08d}", name="Charged", client_event_id=f"buy-{n}"
        )
        event.properties.update({"amount": 10 + n % 90})
        events.append(event)
    return segmentation_pb.IngestEventsRequest(events=events).SerializeToString()


async def run(sizes: Sizes) -> None:
    configure_logging("warning")
    memory = PeakMemory()
    tag = uuid.uuid4().hex[:8]
    async with (
        benchmark_servers("herald-bench-results-") as (database_url, nats_url),
        fresh_settings(database_url, nats_url) as settings,
        fake_segment(memory) as segment_url,
        service_processes(settings, memory) as services,
    ):
        sampler = asyncio.create_task(memory.sample_forever())
        idle_rate = await memory.idle_rate(HERALD_SERVICES)
        _, key = await create_account(services.address("campaign"), settings.bootstrap_token, "results bench")
        async with (
            keyed_channel(services.address("segmentation"), key) as segmentation_channel,
            keyed_channel(services.address("campaign"), key) as campaigns_channel,
            keyed_channel(services.address("dispatch"), key) as dispatch_channel,
            keyed_channel(services.address("scheduler"), key) as scheduler_channel,
        ):
            segmentation = segmentation_grpc.SegmentationServiceStub(segmentation_channel)
            campaigns = campaign_grpc.CampaignServiceStub(campaigns_channel)
            await upsert_users(segmentation_channel, tag, sizes.users)
            segment = await segmentation.CreateSegment(
                segmentation_pb.CreateSegmentRequest(
                    segment=segmentation_pb.Segment(
                        display_name="everyone", filter=matching(condition("cohort", "EQUALS", tag))
                    )
                )
            )
            destination = await dispatch_grpc.DispatchServiceStub(dispatch_channel).CreateDestination(
                dispatch_pb.CreateDestinationRequest(
                    destination=dispatch_pb.Destination(
                        display_name="bench",
                        segment=dispatch_pb.SegmentConfig(write_key=WRITE_KEY, endpoint_url=segment_url),
                    )
                )
            )
            window = Duration()
            window.FromTimedelta(timedelta(days=7))
            goal = campaign_pb.Goal(
                event=campaign_pb.LiveEvent(
                    event_name="Charged", where=[condition("amount", "GREATER_THAN_OR_EQUAL", 10)]
                ),
                conversion_window=window,
                revenue_property="amount",
            )
            campaign = segment_export_campaign(
                segment.name,
                destination.name,
                targeting=campaign_pb.Targeting(control_group_percent=20),
                goal=goal,
            )
            created = await campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=campaign))
            await campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
            stats_name = f"{created.name}/stats"

            async def stats() -> campaign_pb.CampaignStats:
                return await campaigns.GetCampaignStats(campaign_pb.GetCampaignStatsRequest(name=stats_name))

            async def exposed() -> bool:
                found = (await stats()).goal
                return found.sent + found.control >= sizes.users

            export_s = await _wait_for(exposed, 3600)

            count = sizes.users * sizes.events_per_user
            slots = asyncio.Semaphore(IN_FLIGHT)
            # The calls are encoded before the clock starts: the load generator shares the two
            # cores, and what it spends building events would be taken from Herald's share.
            ingest: grpc.aio.UnaryUnaryMultiCallable[bytes, segmentation_pb.IngestEventsResponse]
            ingest = segmentation_channel.unary_unary(
                "/herald.segmentation.v1.SegmentationService/IngestEvents",
                request_serializer=None,  # the requests are already bytes
                response_deserializer=segmentation_pb.IngestEventsResponse.FromString,
            )
            calls = [
                _goal_events(tag, sizes.users, offset, count) for offset in range(0, count, EVENTS_PER_CALL)
            ]

            async def send(call: bytes) -> None:
                try:
                    await ingest(call)
                finally:
                    slots.release()

            # What the export set going (system events, exposures) is done before the goal events.
            cpu_before = await memory.quiet(HERALD_SERVICES, idle_rate)
            started = time.monotonic()
            generator_cpu = time.process_time()
            tasks = []
            for call in calls:
                await slots.acquire()
                tasks.append(asyncio.create_task(send(call)))
            await asyncio.gather(*tasks)
            del calls
            ingest_s = time.monotonic() - started

            async def all_converted() -> bool:
                found = (await stats()).goal
                return found.converted + found.control_converted >= sizes.users

            await _wait_for(all_converted, 3600)
            converted_s = time.monotonic() - started
            generator_cpu = time.process_time() - generator_cpu
            cpu = cpu_used(cpu_before, await memory.quiet(HERALD_SERVICES, idle_rate))
            final = (await stats()).goal

            latencies = []
            for _ in range(STATS_CALLS):
                t0 = time.perf_counter()
                await stats()
                latencies.append((time.perf_counter() - t0) * 1000)

            # Best Time: the same users, today or tomorrow at each one's hour (from the goal
            # events' activity, else the fallback); how fast the run plans them.
            best_time = segment_export_campaign(
                segment.name,
                destination.name,
                schedule=campaign_pb.Schedule(
                    send_later=campaign_pb.SendLater(send_time=api.timestamp(api.utcnow()))
                ),
                delivery=campaign_pb.DeliveryPreferences(best_time=campaign_pb.BestTime(days=2)),
            )
            created = await campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=best_time))
            planning_cpu_before = memory.cpu_seconds()
            planning_started = time.monotonic()
            await campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
            scheduler = scheduler_grpc.SchedulerServiceStub(scheduler_channel)

            async def planned() -> bool:
                listed = await scheduler.ListRuns(scheduler_pb.ListRunsRequest(parent=created.name))
                return any(run.targeted >= sizes.users for run in listed.runs)

            await _wait_for(planned, 3600)
            planning_s = time.monotonic() - planning_started
            planning_cpu = {
                n: used - planning_cpu_before.get(n, 0.0) for n, used in memory.cpu_seconds().items()
            }
        sampler.cancel()

    rate = count / converted_s
    print(f"users (recipients)                     {sizes.users:>12,}  exposed in {export_s:,.1f} s")
    print(f"goal events                            {count:>12,}  ingested in {ingest_s:,.1f} s")
    counted = final.converted + final.control_converted
    print(
        f"conversions counted                    {counted:>12,}  (sent {final.converted:,} of "
        f"{final.sent:,}, control {final.control_converted:,} of {final.control:,})"
    )
    print(
        f"conversion processing                  {rate:>12,.0f} events/s"
        f"   (target >= {TARGET_CONVERSIONS_PER_SECOND:,})"
    )
    print(
        f"GetCampaignStats                       p50 {percentile(latencies, 0.5):,.1f} ms, "
        f"p99 {percentile(latencies, 0.99):,.1f} ms   (target p99 <= {TARGET_STATS_P99_MS:.0f})"
    )
    herald_us = sum(used for n, used in cpu.items() if n.startswith(HERALD)) / count * 1e6
    print(f"Herald CPU per goal event              {herald_us:>12,.0f} µs")
    print("  CPU µs/event: " + ", ".join(f"{n} {used / count * 1e6:,.0f}" for n, used in sorted(cpu.items())))
    print(f"  the load generator (this process): {generator_cpu / count * 1e6:,.0f} µs/event")
    print(
        f"Best Time planning                     {sizes.users / planning_s:>12,.0f} users/s"
        f"   (target >= {TARGET_BEST_TIME_PER_SECOND:,})"
    )
    print(
        "  CPU µs/user: "
        + ", ".join(f"{n} {used / sizes.users * 1e6:,.0f}" for n, used in sorted(planning_cpu.items()))
    )
    print("peak RSS by process:")
    for name, peak in sorted(memory.peaks.items()):
        print(f"  {name:<36} {peak / 2**20:>8,.0f} MiB")
