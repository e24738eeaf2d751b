"""The SMS benchmark: an SMS campaign to N users through the fake Twilio API at an unlimited rate,
the four services as separate processes and the fake in a process of its own. Prints messages
per second from publish to the last message Twilio accepted, next to the target, and where the
time went: the CPU Herald's processes used against the run's length, and the CPU the provider
used."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import AbstractAsyncContextManager

import aiohttp

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.campaign.v1 import campaign_service_pb2_grpc as campaign_grpc
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald.dispatch.v1 import dispatch_service_pb2_grpc as dispatch_grpc
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald.segmentation.v1 import segmentation_service_pb2_grpc as segmentation_grpc
from herald_common.logging import configure_logging
from tests.bench import (
    Budget,
    PeakMemory,
    cpu_used,
    fake_process,
    print_cpu_per_unit,
    service_processes,
    upsert_users,
    vacuum_analyze,
)
from tests.harness import create_account, fresh_settings, keyed_channel
from tests.helpers import condition, matching
from tests.processes import benchmark_servers

TARGET_RATE = 5_000  # messages/s
ACCOUNT_SID = "AC" + "b" * 32
AUTH_TOKEN = "e" * 32
HERALD = ("segmentation", "campaign", "scheduler", "dispatch")
BUDGETS = (Budget("dispatch", ("dispatch",), 100),)


def fake_twilio(memory: PeakMemory) -> AbstractAsyncContextManager[str]:
    argv = ("herald_sandbox.twilio_api", "--account-sid", ACCOUNT_SID, "--auth-token", AUTH_TOKEN)
    return fake_process(memory, "fake Twilio API", *argv)


async def _accepted(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url + "/_fake/stats") as response:
        return int(json.loads(await response.text())["messages"])


async def _all_accepted(http: aiohttp.ClientSession, url: str, users: int) -> None:
    while True:
        if await _accepted(http, url) >= users:
            return
        await asyncio.sleep(0.1)


async def run(users: int) -> None:
    configure_logging("warning")
    memory = PeakMemory()
    tag = uuid.uuid4().hex[:8]
    async with (
        benchmark_servers("herald-bench-sms-") as (database_url, nats_url),
        fresh_settings(database_url, nats_url) as settings,
        fake_twilio(memory) as twilio_url,
        aiohttp.ClientSession() as http,
        service_processes(settings, memory) as services,
    ):
        _, key = await create_account(services.address("campaign"), settings.bootstrap_token, "sms bench")
        async with (
            keyed_channel(services.address("segmentation"), key) as segmentation,
            keyed_channel(services.address("campaign"), key) as campaigns_channel,
            keyed_channel(services.address("dispatch"), key) as dispatch_channel,
        ):
            await upsert_users(segmentation, tag, users, phones=True)
            segment = await segmentation_grpc.SegmentationServiceStub(segmentation).CreateSegment(
                segmentation_pb.CreateSegmentRequest(
                    segment=segmentation_pb.Segment(
                        display_name="sms", filter=matching(condition("cohort", "EQUALS", tag))
                    )
                )
            )
            # No rate limit on our side either: the run measures Herald, not a provider's quota.
            twilio = dispatch_pb.TwilioConfig(
                account_sid=ACCOUNT_SID,
                auth_token=AUTH_TOKEN,
                endpoint_url=twilio_url,
                requests_per_second=100_000,
            )
            setattr(twilio, "from", "Herald")  # `from` is a Python keyword
            destination = await dispatch_grpc.DispatchServiceStub(dispatch_channel).CreateDestination(
                dispatch_pb.CreateDestinationRequest(
                    destination=dispatch_pb.Destination(display_name="Twilio", twilio=twilio)
                )
            )
            campaigns = campaign_grpc.CampaignServiceStub(campaigns_channel)
            created = await campaigns.CreateCampaign(
                campaign_pb.CreateCampaignRequest(
                    campaign=campaign_pb.Campaign(
                        display_name="SMS bench",
                        audience=campaign_pb.Audience(segment=segment.name),
                        destination=destination.name,
                        schedule=campaign_pb.Schedule(send_now=campaign_pb.SendNow()),
                        sms=campaign_pb.SmsContent(
                            body="Hi {{ profile.first_name }}, your code is {{ profile.code }}"
                        ),
                    )
                )
            )
            await vacuum_analyze(settings.database_url)
            memory.watch_servers()
            idle_rate = await memory.idle_rate(HERALD)
            cpu_before = memory.cpu_seconds()
            started = time.perf_counter()
            await campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
            await _all_accepted(http, twilio_url, users)
            elapsed = time.perf_counter() - started
            # What the messages set going after the last one (stats, system events) counts too.
            cpu = cpu_used(cpu_before, await memory.quiet(HERALD, idle_rate))
    rate = users / elapsed
    herald_cpu = sum(used for name, used in cpu.items() if name.startswith(HERALD))
    provider_cpu = cpu.get("fake Twilio API", 0.0)
    servers_cpu = cpu.get("postgresql", 0.0) + cpu.get("nats-server", 0.0)
    print(f"sms: {users:,} users through the fake Twilio API, no rate limit")
    print(
        f"  messages/s       {rate:>10,.0f}  ({elapsed:,.1f} s)   target >= {TARGET_RATE:,}  "
        f"{'met' if rate >= TARGET_RATE else 'NOT met'}"
    )
    print(
        f"  where the time went: Herald's processes {herald_cpu:,.1f} CPU-s, PostgreSQL and NATS "
        f"{servers_cpu:,.1f} CPU-s, the provider {provider_cpu:,.1f} CPU-s, over {elapsed:,.1f} s on 2 cores"
    )
    print_cpu_per_unit(cpu, users, "message", BUDGETS)
    share = herald_cpu / (herald_cpu + provider_cpu) if herald_cpu + provider_cpu else 0.0
    print(f"  our code vs the provider: {share:.0%} of their CPU was ours, {1 - share:.0%} the provider's")
