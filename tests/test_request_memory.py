"""What the largest requests cost in memory: many of them at once, with the largest bodies each
RPC takes, keep the services within a bound and serving. The services run in this process, so
its resident memory is what they hold."""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_common.limits import MAX_CONCURRENT_RPCS
from tests.conftest import Platform
from tests.harness import Clients, create_account
from tests.helpers import user

# What the largest requests in flight may add to the memory of this process, which holds all four
# services and, here, the client's copies of the requests too (README, "Security model").
BOUND_MIB = 320


def _largest_events(tag: str, batch: int) -> pb.IngestEventsRequest:
    """Close to 1 MB: 1,000 events with about 900 bytes of properties each."""
    events = []
    for i in range(1000):
        event = pb.Event(user_id=f"{tag}-{i % 50}", name="Viewed", client_event_id=f"{tag}-{batch}-{i}")
        event.properties.update({"page": "p" * 410, "referrer": "r" * 410, "n": i})
        events.append(event)
    request = pb.IngestEventsRequest(events=events)
    assert 880_000 < request.ByteSize() <= 1 << 20
    return request


def _largest_users(tag: str, batch: int) -> pb.UpsertUsersRequest:
    """Close to 4 MB: 1,000 users with about 4 KB of properties each."""
    users = [user(f"{tag}-{batch}-{i}", bio="b" * 2000, notes="n" * 2000) for i in range(1000)]
    request = pb.UpsertUsersRequest(users=users)
    assert 3_900_000 < request.ByteSize() <= 4 << 20
    return request


async def test_the_largest_requests_at_once_stay_within_the_memory_bound(platform: Platform) -> None:
    _, key = await create_account(platform.address("campaign"), platform.settings.bootstrap_token, "heavy")
    clients = Clients.open(platform.addresses, key)
    tag = uuid.uuid4().hex[:8]
    process = psutil.Process(os.getpid())
    requests = [_largest_events(tag, b) for b in range(24)] + [_largest_users(tag, b) for b in range(8)]
    assert len(requests) <= MAX_CONCURRENT_RPCS
    baseline = peak = process.memory_info().rss
    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, process.memory_info().rss)
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    try:
        calls = [
            clients.segmentation.IngestEvents(r)
            if isinstance(r, pb.IngestEventsRequest)
            else clients.segmentation.UpsertUsers(r)
            for r in requests
        ]
        answers = await asyncio.gather(*calls)
    finally:
        sampling = False
        await sampler
    assert sum(a.accepted_count for a in answers if isinstance(a, pb.IngestEventsResponse)) == 24_000
    grown_mib = (peak - baseline) / 2**20
    print(f"32 of the largest requests at once: resident memory grew {grown_mib:.0f} MiB (bound {BOUND_MIB})")
    assert grown_mib < BOUND_MIB
    async with grpc.aio.insecure_channel(platform.address("segmentation")) as channel:
        health: Any = health_pb2_grpc.HealthStub(channel)  # the generated stub knows only sync calls
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    await clients.close()
