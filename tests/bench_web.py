"""The web pop-up benchmark: how fast the web SDK's API answers "which pop-ups may this visitor see
now" with many live pop-up campaigns over many users, the four services as separate processes.

Some visitors are first qualified through the pipeline (their page views reach the live engine,
which delivers pop-ups to their inboxes); then page views ask for pop-ups at a steady rate, for
qualified and unqualified visitors alike, as identified users (signed). Prints eligibility p50 and
p99 next to the target, and each process's CPU per request.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp

from herald.accounts.v1 import account_service_pb2 as accounts_pb
from herald.accounts.v1 import account_service_pb2_grpc as accounts_grpc
from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.campaign.v1 import campaign_service_pb2_grpc as campaign_grpc
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald.dispatch.v1 import dispatch_service_pb2_grpc as dispatch_grpc
from herald_common.embedded import free_port
from herald_common.logging import configure_logging
from tests.bench import PeakMemory, percentile, service_processes, upsert_users
from tests.harness import create_account, fresh_settings, keyed_channel
from tests.processes import benchmark_servers
from tests.web_site import signature

TARGET_P99_MS = 20.0
TARGET_RATE = 1_000
ORIGIN = "https://bench.example.com"
IN_FLIGHT = 64
HERALD = ("segmentation", "campaign", "scheduler", "dispatch")


@dataclass
class Sizes:
    users: int
    campaigns: int
    qualified: int  # visitors with a pop-up waiting
    rate: int  # pop-up requests a second
    seconds: int


QUICK = Sizes(users=20_000, campaigns=10, qualified=2_000, rate=500, seconds=10)
FULL = Sizes(users=1_000_000, campaigns=50, qualified=50_000, rate=TARGET_RATE, seconds=60)


async def _post(http: aiohttp.ClientSession, url: str, body: object) -> dict[str, object]:
    async with http.post(url, data=json.dumps(body), headers={"Origin": ORIGIN}) as response:
        answer: dict[str, object] = await response.json()
        if response.status != 200:
            raise RuntimeError(f"{url}: {response.status} {answer}")
        return answer


async def run(sizes: Sizes) -> None:
    configure_logging("warning")
    memory = PeakMemory()
    tag = uuid.uuid4().hex[:8]
    web_port = free_port()
    async with (
        benchmark_servers("herald-bench-web-") as (database_url, nats_url),
        fresh_settings(database_url, nats_url) as settings,
        service_processes(settings, memory, HERALD_WEB_PORT=str(web_port)) as services,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=IN_FLIGHT)) as http,
    ):
        sampler = asyncio.create_task(memory.sample_forever())
        _, key = await create_account(services.address("campaign"), settings.bootstrap_token, "web bench")
        async with (
            keyed_channel(services.address("segmentation"), key) as segmentation,
            keyed_channel(services.address("campaign"), key) as campaigns_channel,
            keyed_channel(services.address("dispatch"), key) as dispatch_channel,
        ):
            accounts = accounts_grpc.AccountServiceStub(campaigns_channel)
            publishable = await accounts.CreateApiKey(
                accounts_pb.CreateApiKeyRequest(
                    api_key=accounts_pb.ApiKey(
                        display_name="site", role=accounts_pb.Role.ROLE_PUBLISHABLE, allowed_origins=[ORIGIN]
                    )
                )
            )
            secret = (
                await accounts.GetIdentitySecret(accounts_pb.GetIdentitySecretRequest())
            ).identity_secret
            destination = await dispatch_grpc.DispatchServiceStub(dispatch_channel).CreateDestination(
                dispatch_pb.CreateDestinationRequest(
                    destination=dispatch_pb.Destination(
                        display_name="site", web_popup=dispatch_pb.WebPopupConfig()
                    )
                )
            )
            campaigns = campaign_grpc.CampaignServiceStub(campaigns_channel)
            names = []
            for n in range(sizes.campaigns):
                test = campaign_pb.UrlTest(match=campaign_pb.URL_MATCH_PATTERN, value=f"{ORIGIN}/c{n}/*")
                campaign = campaign_pb.Campaign(
                    display_name=f"pop-up {n}",
                    destination=destination.name,
                    schedule=campaign_pb.Schedule(
                        live=campaign_pb.Live(
                            trigger=campaign_pb.LiveTrigger(page=campaign_pb.PageTrigger(visit=test))
                        )
                    ),
                    web_popup=campaign_pb.WebPopupContent(
                        message=campaign_pb.PopupMessage(
                            title="Hi {{ profile.first_name }}", body=f"Offer {n}"
                        )
                    ),
                )
                created = await campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=campaign))
                await campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
                names.append(created.name)
            await upsert_users(segmentation, tag, sizes.users)
            await asyncio.sleep(2)  # every trigger is live

            base = f"http://127.0.0.1:{web_port}/v1/web/{publishable.key}"
            users = [f"{tag}-{i:08d}" for i in range(sizes.users)]
            qualified = random.sample(users, sizes.qualified)
            started = time.time()
            for offset in range(0, len(qualified), 50):
                chunk = qualified[offset : offset + 50]
                events = [
                    {
                        "user_id": u,
                        "name": "Page Viewed",
                        "client_event_id": uuid.uuid4().hex,
                        "time": datetime.now(UTC).isoformat(),
                        "properties": {
                            "url": f"{ORIGIN}/c{i % sizes.campaigns}/page",
                            "session_page_count": 1,
                        },
                    }
                    for i, u in enumerate(chunk)
                ]
                await _post(http, f"{base}/events", {"events": events})

            async def delivered() -> int:
                total = 0
                for name in names:
                    stats = await campaigns.GetCampaignStats(
                        campaign_pb.GetCampaignStatsRequest(name=f"{name}/stats")
                    )
                    total += stats.sent
                return total

            for _ in range(600):  # until every qualified visitor has their pop-up, or 10 minutes
                if await delivered() >= sizes.qualified:
                    break
                await asyncio.sleep(1)
            qualify_s = time.time() - started

            signed = {u: signature(secret, u) for u in random.sample(users, min(len(users), 20_000))}
            signed.update({u: signature(secret, u) for u in qualified[:10_000]})
            askers = list(signed)
            latencies: list[float] = []
            shown = 0
            slots = asyncio.Semaphore(IN_FLIGHT)

            async def ask(user_id: str) -> None:
                nonlocal shown
                body = {"user_id": user_id, "session_id": "s", "user_signature": signed[user_id]}
                t0 = time.perf_counter()
                try:
                    answer = await _post(http, f"{base}/popups", body)
                finally:
                    slots.release()
                latencies.append((time.perf_counter() - t0) * 1000)
                shown += bool(answer["popups"])

            count = sizes.rate * sizes.seconds
            cpu_before = memory.cpu_seconds()
            step_started = time.monotonic()
            tasks = []
            for n in range(count):
                delay = step_started + n / sizes.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await slots.acquire()
                tasks.append(asyncio.create_task(ask(random.choice(askers))))
            await asyncio.gather(*tasks)
            elapsed = time.monotonic() - step_started
            cpu = {n: used - cpu_before.get(n, 0.0) for n, used in memory.cpu_seconds().items()}
        sampler.cancel()

    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    print(f"users                                  {sizes.users:>12,}")
    print(f"live pop-up campaigns                  {sizes.campaigns:>12,}")
    print(f"visitors qualified through the pipeline {sizes.qualified:>11,} in {qualify_s:,.1f} s")
    achieved = f"at {count / elapsed:,.0f}/s (asked {sizes.rate:,}/s)"
    print(f"pop-up requests                        {count:>12,} {achieved}")
    print(f"  answered with a pop-up               {shown:>12,}")
    print(f"eligibility p50                        {p50:>12,.1f} ms")
    target = f"(target <= {TARGET_P99_MS:.0f} at {TARGET_RATE:,}/s)"
    print(f"eligibility p99                        {p99:>12,.1f} ms   {target}")
    herald_us = sum(used for n, used in cpu.items() if n.startswith(HERALD)) / count * 1e6
    print(f"Herald CPU per request                 {herald_us:>12,.0f} µs")
    print(
        "  CPU µs/request: " + ", ".join(f"{n} {used / count * 1e6:,.0f}" for n, used in sorted(cpu.items()))
    )
    print("peak RSS by process:")
    for name, peak in sorted(memory.peaks.items()):
        print(f"  {name:<36} {peak / 2**20:>8,.0f} MiB")
