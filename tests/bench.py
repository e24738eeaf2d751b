"""`make bench`: a Segment export to N users, the four services running as separate processes as
they are deployed (dispatch with two replicas), the fake Segment API in a process of its own,
and beside it the ceiling: a minimal hand-written pipeline doing the same essential work
(tests/ceiling.py).

Prints throughput, the ratio to the ceiling and every process's peak RSS next to the targets.
Runs against DATABASE_URL / NATS_URL when set, else embedded servers. `--full` runs the 1M-user
size the targets are stated for; the default is a quick 20k.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from tempfile import mkdtemp

import aiohttp
import asyncpg
import grpc
import psutil

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.campaign.v1 import campaign_service_pb2_grpc as campaign_grpc
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald.dispatch.v1 import dispatch_service_pb2_grpc as dispatch_grpc
from herald.events.v1 import events_pb2
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald.segmentation.v1 import segmentation_service_pb2_grpc as segmentation_grpc
from herald_common import auth
from herald_common.logging import configure_logging
from herald_common.settings import Settings
from tests import bench_scheduling
from tests.ceiling import run_ceiling
from tests.harness import create_account, fresh_settings, keyed_channel
from tests.helpers import audience, condition, matching, segment_export_campaign, user
from tests.processes import ServiceProcesses, benchmark_servers, environment

TARGET_RATE = 17_000  # deliveries/s: 1M in 60 s
TARGET_RATIO = 0.8
TARGET_FIRST_EVENT_MS = 1000
WRITE_KEY = "wk_bench"
HERALD_SERVICES = ("campaign", "dispatch", "scheduler", "segmentation")


@dataclass(frozen=True)
class Budget:
    """At most `limit_us` CPU microseconds per unit of work, summed over the processes whose
    names start with one of `processes`."""

    label: str
    processes: tuple[str, ...]
    limit_us: float


EXPORT_BUDGETS = (
    Budget("Herald's four services", HERALD_SERVICES, 50),
    Budget("PostgreSQL, its cleanup included", ("postgresql",), 15),
)


def cpu_used(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """CPU seconds each watched process group used between two readings."""
    return {name: used - before.get(name, 0.0) for name, used in after.items()}


def print_cpu_per_unit(
    cpu: Mapping[str, float], units: int, unit: str, budgets: Sequence[Budget] = (), indent: str = "  "
) -> None:
    """Each process's CPU microseconds per unit of work, then each budget beside its figure: on a
    shared 2-core machine these move far less than wall-clock rates."""
    per_unit = {name: used / units * 1e6 for name, used in cpu.items() if used > 0}
    listed = ", ".join(f"{name} {us:,.1f}" for name, us in sorted(per_unit.items()))
    print(f"{indent}CPU µs per {unit}, by process: {listed}")
    for budget in budgets:
        used = sum(us for name, us in per_unit.items() if name.startswith(budget.processes))
        verdict = "met" if used <= budget.limit_us else "NOT met"
        label = f"CPU per {unit}, {budget.label}"
        print(f"{indent}{label:<52} {used:>8,.1f} µs   (budget <= {budget.limit_us:g}: {verdict})")


async def vacuum_analyze(database_url: str) -> None:
    """VACUUM ANALYZE of the whole database: what autovacuum does after a load, so that what
    runs next starts from fresh statistics and a clean visibility map."""
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute("VACUUM ANALYZE")
    finally:
        await connection.close()


class PeakMemory:
    """Samples the resident memory of the processes it watches; keeps each one's peak."""

    def __init__(self) -> None:
        self.watched: dict[str, list[psutil.Process]] = {}
        self.peaks: dict[str, int] = {}

    def watch(self, name: str, *pids: int) -> None:
        self.watched[name] = [psutil.Process(p) for p in pids]

    def watch_servers(self) -> None:
        """PostgreSQL and NATS, found again on every sample: PostgreSQL starts a process per session."""
        for name, binary in (("postgresql", "postgres"), ("nats-server", "nats-server")):
            self.watched[name] = [p for p in psutil.process_iter(["name"]) if p.info["name"] == binary]

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time used so far by each watched process group."""
        used = {}
        for name, processes in self.watched.items():
            total = 0.0
            for process in processes:
                try:
                    times = process.cpu_times()
                except psutil.Error:
                    continue
                # A process's reaped children count too: PostgreSQL's autovacuum workers and
                # ended sessions live on in the postmaster's children times.
                total += times.user + times.system + times.children_user + times.children_system
            used[name] = total
        return used

    def resident(self) -> dict[str, int]:
        """Each watched process group's resident memory now."""
        now = {}
        for name, processes in self.watched.items():
            total = 0
            for process in processes:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    continue
            now[name] = total
        return now

    def _busy(self, names: Sequence[str]) -> float:
        return sum(used for name, used in self.cpu_seconds().items() if name.startswith(tuple(names)))

    async def idle_rate(self, names: Sequence[str], over: float = 2.0) -> float:
        """CPU seconds per second the processes named with these prefixes use with nothing to do
        (their background loops), together."""
        before = self._busy(names)
        await asyncio.sleep(over)
        return (self._busy(names) - before) / over

    async def quiet(self, names: Sequence[str], idle_rate: float, over: float = 0.5) -> dict[str, float]:
        """Waits until the processes named with these prefixes are back to about their idle rate
        (the work a run set going is done), then reads cpu_seconds."""
        before = self._busy(names)
        while True:
            await asyncio.sleep(over)
            now = self._busy(names)
            if now - before < (idle_rate + 0.05) * over:
                return self.cpu_seconds()
            before = now

    async def sample_forever(self) -> None:
        while True:
            self.watch_servers()
            for name, total in self.resident().items():
                self.peaks[name] = max(self.peaks.get(name, 0), total)
            await asyncio.sleep(0.25)


def percentile(values: list[float], p: float) -> float:
    """The value below which a fraction `p` of the values fall (nan for none)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


@asynccontextmanager
async def service_processes(
    settings: Settings, memory: PeakMemory, **extra_env: str
) -> AsyncIterator[ServiceProcesses]:
    """The four services as child processes, as deployed."""
    env = environment(settings, **extra_env)
    # One process per service: on this 2-core machine a second dispatch replica only contends for
    # the same cores (measured: fewer messages/s, more CPU per message).
    services = ServiceProcesses(env, Path(mkdtemp(prefix="herald-bench-logs-")))
    try:
        await services.start()
        for process in services.processes:
            assert process.process is not None
            memory.watch(process.name, process.process.pid)
        yield services
    finally:
        await services.stop()


@asynccontextmanager
async def fake_process(memory: PeakMemory, name: str, *argv: str) -> AsyncIterator[str]:
    """A fake API (`python -m <argv>`) in a process of its own, watched as `name`; its URL is the
    first line it prints."""
    process = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, "-m", *argv], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    url = (await asyncio.to_thread(process.stdout.readline)).strip()
    memory.watch(name, process.pid)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(10)


def fake_segment(memory: PeakMemory) -> AbstractAsyncContextManager[str]:
    return fake_process(memory, "fake Segment API", "herald_sandbox.segment_api", "--write-key", WRITE_KEY)


async def _accepted(http: aiohttp.ClientSession, url: str) -> dict[str, int]:
    async with http.get(url + "/_fake/stats") as response:
        stats: dict[str, int] = json.loads(await response.text())
        return stats


async def upsert_users(channel: grpc.aio.Channel, tag: str, users: int, *, phones: bool = False) -> float:
    """Loads users through the API (with E.164 phones when asked); returns users per second."""
    stub = segmentation_grpc.SegmentationServiceStub(channel)
    started = time.perf_counter()
    batch = 1000

    def member(i: int) -> segmentation_pb.User:
        loaded = user(f"{tag}-{i:08d}", cohort=tag, first_name=f"U{i}", plan="gold", code=f"C{i % 997}")
        if phones:
            loaded.phone = f"+1415{i:07d}"
        return loaded

    async def load(offset: int) -> None:
        await stub.UpsertUsers(
            segmentation_pb.UpsertUsersRequest(
                users=[member(i) for i in range(offset, min(offset + batch, users))]
            )
        )

    offsets = list(range(0, users, batch))
    for start in range(0, len(offsets), 4):
        await asyncio.gather(*(load(o) for o in offsets[start : start + 4]))
    return users / (time.perf_counter() - started)


_MILESTONES = """
    SELECT extract(epoch FROM created_at) AS run_made, extract(epoch FROM started_at) AS run_started,
           extract(epoch FROM first_release_at) AS first_released
    FROM scheduler.runs WHERE campaign = $1
"""


async def _run_milestones(database_url: str, campaign: str, published_at: float) -> dict[str, float]:
    """When the campaign's run was made, started planning and first released a batch, in ms after
    the publish call (this machine's clock, which the services and PostgreSQL share)."""
    connection = await asyncpg.connect(database_url)
    try:
        row = await connection.fetchrow(_MILESTONES, campaign)
    finally:
        await connection.close()
    assert row is not None
    return {f"{name}_ms": (float(at) - published_at) * 1000 for name, at in dict(row).items() if at}


async def _herald_export(
    services: ServiceProcesses,
    segment_url: str,
    tag: str,
    users: int,
    http: aiohttp.ClientSession,
    memory: PeakMemory,
    settings: Settings,
) -> dict[str, float]:
    _, key = await create_account(services.address("campaign"), settings.bootstrap_token, "bench")
    async with (
        keyed_channel(services.address("segmentation"), key) as segmentation,
        keyed_channel(services.address("campaign"), key) as campaigns_channel,
        keyed_channel(services.address("dispatch"), key) as dispatch_channel,
    ):
        upsert_rate = await upsert_users(segmentation, tag, users)
        segments = segmentation_grpc.SegmentationServiceStub(segmentation)
        segment = await segments.CreateSegment(
            segmentation_pb.CreateSegmentRequest(
                segment=segmentation_pb.Segment(
                    display_name="bench",
                    filter=matching(condition("cohort", "EQUALS", tag)),
                )
            )
        )
        reach_started = time.perf_counter()
        reach = await segments.EstimateReach(
            segmentation_pb.EstimateReachRequest(audience=audience(segment.name))
        )
        reach_ms = (time.perf_counter() - reach_started) * 1000
        assert reach.user_count == users
        destination = await dispatch_grpc.DispatchServiceStub(dispatch_channel).CreateDestination(
            dispatch_pb.CreateDestinationRequest(
                destination=dispatch_pb.Destination(
                    display_name="bench",
                    segment=dispatch_pb.SegmentConfig(write_key=WRITE_KEY, endpoint_url=segment_url),
                )
            )
        )
        campaigns = campaign_grpc.CampaignServiceStub(campaigns_channel)
        created = await campaigns.CreateCampaign(
            campaign_pb.CreateCampaignRequest(
                campaign=segment_export_campaign(segment.name, destination.name)
            )
        )
        before = (await _accepted(http, segment_url))["events"]
        await vacuum_analyze(settings.database_url)  # the ceiling starts from the same state
        idle_rate = await memory.idle_rate(HERALD_SERVICES)
        cpu_before = memory.cpu_seconds()
        published, published_at = time.perf_counter(), time.time()
        await campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
        first_event = acked = 0.0
        while True:
            accepted = (await _accepted(http, segment_url))["events"] - before
            if accepted and not first_event:
                first_event = time.perf_counter()
            if accepted >= users:
                acked = time.perf_counter()
                break
            await asyncio.sleep(0.1)
        while True:
            got = await campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=created.name))
            if got.state == campaign_pb.State.STATE_COMPLETED:
                completed = time.perf_counter()
                break
            await asyncio.sleep(0.1)
        stats = await campaigns.GetCampaignStats(
            campaign_pb.GetCampaignStatsRequest(name=f"{created.name}/stats")
        )
        assert stats.sent == users, f"sent {stats.sent} of {users}"
        # What deliveries set going after the last one (stats, system events) counts too.
        cpu_after = await memory.quiet(HERALD_SERVICES, idle_rate)
        # The cleanup the run leaves PostgreSQL is part of what a delivery costs it.
        cleanup_before = memory.cpu_seconds()
        await vacuum_analyze(settings.database_url)
        cleanup = cpu_used(cleanup_before, memory.cpu_seconds())
        cpu = cpu_used(cpu_before, cpu_after)
        cpu["postgresql"] += cleanup.get("postgresql", 0.0)
        milestones = await _run_milestones(settings.database_url, created.name, published_at)
        return {
            **milestones,
            "postgresql_cleanup_s": cleanup.get("postgresql", 0.0),
            "upsert": upsert_rate,
            "reach_ms": reach_ms,
            "first_event_ms": (first_event - published) * 1000,
            "acked_s": acked - published,
            "completed_s": completed - published,
            "duplicates": (await _accepted(http, segment_url))["duplicates"],
            **{f"cpu:{name}": used for name, used in cpu.items()},
        }


async def bench(users: int) -> None:
    configure_logging("warning")
    memory = PeakMemory()
    tag = uuid.uuid4().hex[:8]
    sampler: asyncio.Task[None] | None = None
    try:
        async with (
            benchmark_servers("herald-bench-") as (database_url, nats_url),
            fresh_settings(database_url, nats_url) as settings,
            fake_segment(memory) as segment_url,
            aiohttp.ClientSession() as http,
        ):
            memory.watch_servers()
            sampler = asyncio.create_task(memory.sample_forever())
            async with service_processes(settings, memory) as services:
                herald = await _herald_export(services, segment_url, tag, users, http, memory, settings)
            await vacuum_analyze(settings.database_url)
            memory.watch("ceiling (bench process)", os.getpid())
            ceiling_s = await run_ceiling(
                settings.database_url,
                settings.nats_url,
                settings.namespace,
                segment_url,
                WRITE_KEY,
                tag,
                users,
            )
    finally:
        if sampler is not None:
            sampler.cancel()
    rate = users / herald["acked_s"]
    ceiling_rate = users / ceiling_s
    print(f"users                                  {users:>12,}")
    print(f"upsert                                 {herald['upsert']:>12,.0f} users/s")
    print(f"estimate reach                         {herald['reach_ms']:>12,.1f} ms")
    first_met = "met" if herald["first_event_ms"] <= TARGET_FIRST_EVENT_MS else "NOT met"
    print(
        f"publish -> first event at Segment      {herald['first_event_ms']:>12,.1f} ms   "
        f"(target <= {TARGET_FIRST_EVENT_MS:,}: {first_met})"
    )
    print(
        "  of which: run made {run_made_ms:,.0f} ms, planning begun {run_started_ms:,.0f} ms, "
        "first batch released {first_released_ms:,.0f} ms".format(**herald)
    )
    print(f"publish -> last batch acknowledged     {herald['acked_s']:>12,.2f} s")
    print(f"publish -> campaign COMPLETED          {herald['completed_s']:>12,.2f} s")
    rate_met = "met" if rate >= TARGET_RATE else "NOT met"
    print(
        f"Herald delivery rate                   {rate:>12,.0f} deliveries/s   "
        f"(target >= {TARGET_RATE:,}: {rate_met})"
    )
    print(f"ceiling pipeline rate                  {ceiling_rate:>12,.0f} deliveries/s")
    if ceiling_rate < rate:
        # A ceiling slower than Herald measured something else (a cold cache, a busy machine).
        print("Herald / ceiling                       not shown: the ceiling ran slower than Herald")
    else:
        ratio = rate / ceiling_rate
        ratio_met = "met" if ratio >= TARGET_RATIO else "NOT met"
        print(
            f"Herald / ceiling                       {ratio:>12.0%}   "
            f"(target >= {TARGET_RATIO:.0%}: {ratio_met})"
        )
    print(f"duplicates at Segment                  {herald['duplicates']:>12,}")
    cpu = {name.removeprefix("cpu:"): used for name, used in herald.items() if name.startswith("cpu:")}
    print_cpu_per_unit(cpu, users, "delivery", EXPORT_BUDGETS, indent="")
    cleanup_us = herald["postgresql_cleanup_s"] / users * 1e6
    print(f"  of PostgreSQL's, the VACUUM ANALYZE after the run        {cleanup_us:>8,.1f} µs")
    key_check = await key_check_microseconds()
    print(f"API key check per call                 {key_check:>12.1f} µs   (target <= 50 µs)")
    print(
        "by process: peak RSS, and CPU seconds from publish until the services are idle again "
        "(PostgreSQL's with the VACUUM ANALYZE after)"
    )
    for name, peak in sorted(memory.peaks.items()):
        seconds = cpu.get(name)
        cpu_text = f"{seconds:8.1f} s CPU" if seconds is not None else ""
        print(f"  {name:<36} {peak / 2**20:>8,.0f} MiB {cpu_text}")


async def key_check_microseconds(calls: int = 100_000) -> float:
    """What checking an API key costs a service per call: the in-memory registry lookup, the
    secret's hash and the role check, as the server interceptor does it."""
    registry = auth.KeyRegistry("bench-id-secret")
    key = registry.new_key()
    # An account allowed more calls than the loop makes, so every call takes the whole path.
    registry.learn(
        events_pb2.ApiKeyState(
            key_id=key.key_id,
            account="accounts/bench",
            role="ROLE_EDITOR",
            secret_sha256=key.secret_sha256,
            requests_per_second=10.0 * calls,
        )
    )
    authenticator = auth.Authenticator(registry, "service-token", "")
    metadata = {"authorization": f"Bearer {key.key}"}
    started = time.perf_counter()
    for _ in range(calls):
        await authenticator.authenticate(metadata, auth.Permission.WRITE)
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=None, help="audience size (default 20,000)")
    parser.add_argument("--full", action="store_true", help="the issues' full sizes (1M users; 20M events)")
    parser.add_argument(
        "--only",
        choices=("pipeline", "segmentation", "scheduling", "sms", "mparticle", "live", "web", "results"),
        help="run one benchmark",
    )
    args = parser.parse_args()
    if args.only in (None, "pipeline"):
        asyncio.run(bench(args.users or (1_000_000 if args.full else 20_000)))
    if args.only in (None, "segmentation"):
        from tests import bench_segmentation  # it builds on this module's helpers

        asyncio.run(bench_segmentation.run(*((1_000_000, 20_000_000) if args.full else (100_000, 2_000_000))))
    if args.only in (None, "scheduling"):
        sizes = (
            (1_000_000, bench_scheduling.FULL_SPEED) if args.full else (100_000, bench_scheduling.QUICK_SPEED)
        )
        asyncio.run(bench_scheduling.run(*sizes))
    if args.only in (None, "sms"):
        from tests import bench_sms  # it builds on this module's helpers

        asyncio.run(bench_sms.run(100_000 if args.full else 20_000))
    if args.only in (None, "mparticle"):
        from tests import bench_mparticle  # it builds on this module's helpers

        asyncio.run(bench_mparticle.run(100_000 if args.full else 20_000))
    if args.only in (None, "live"):
        from tests import bench_live  # it builds on this module's helpers

        asyncio.run(bench_live.run(bench_live.FULL if args.full else bench_live.QUICK))
    if args.only in (None, "web"):
        from tests import bench_web  # it builds on this module's helpers

        asyncio.run(bench_web.run(bench_web.FULL if args.full else bench_web.QUICK))
    if args.only in (None, "results"):
        from tests import bench_results  # it builds on this module's helpers

        asyncio.run(bench_results.run(bench_results.FULL if args.full else bench_results.QUICK))


if __name__ == "__main__":
    main()
