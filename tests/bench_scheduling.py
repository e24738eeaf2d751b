"""The scheduling benchmark: a campaign delivered in each user's own time zone to N users across 30
zones, with do-not-disturb hours that delay every delivery and a 10% control group.

The services run in this process, reading a clock the benchmark drives: it stands still while the
run plans (planning throughput is users planned per real second), then runs `speed` times faster
than real time while the pending deliveries fall due zone after zone, and the releaser's largest
lateness (hand-over time minus due time) is reported in real seconds. Dispatch's workers are
stopped, so releases compete with nothing but themselves.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_common import api, clock
from herald_common.logging import configure_logging
from herald_sandbox.segment_api import SegmentApi
from tests.harness import fresh_settings, running_platform
from tests.helpers import condition, create_segment, create_segment_destination, segment_export_campaign, user
from tests.processes import benchmark_servers

TARGET_PLANNING_RATE = 20_000  # users/s
TARGET_LATENESS_SECONDS = 1.0
# Simulated seconds per real second while deliveries fall due: each zone's deliveries come due
# together, a simulated hour (6 s or 1 s real) after the previous zone's.
FULL_SPEED = 600.0
QUICK_SPEED = 3600.0
ZONES = [
    "Pacific/Kiritimati",
    "Pacific/Auckland",
    "Australia/Sydney",
    "Asia/Tokyo",
    "Asia/Seoul",
    "Asia/Shanghai",
    "Asia/Singapore",
    "Asia/Bangkok",
    "Asia/Kolkata",
    "Asia/Karachi",
    "Asia/Dubai",
    "Europe/Moscow",
    "Africa/Nairobi",
    "Europe/Athens",
    "Africa/Cairo",
    "Europe/Berlin",
    "Europe/Paris",
    "Africa/Lagos",
    "Europe/London",
    "Atlantic/Azores",
    "America/Noronha",
    "America/Sao_Paulo",
    "America/Halifax",
    "America/New_York",
    "America/Chicago",
    "America/Denver",
    "America/Los_Angeles",
    "America/Anchorage",
    "Pacific/Honolulu",
    "Pacific/Pago_Pago",
]
START = datetime(2026, 11, 23, 12, tzinfo=UTC)


async def _load_users(database_url: str, account: str, users: int) -> None:
    """Users spread evenly over the zones, written with COPY (the API's path is benchmarked elsewhere)."""
    account_id = uuid.UUID(account.removeprefix("accounts/"))
    properties = json.dumps({"plan": "gold"})
    connection = await asyncpg.connect(database_url)
    try:
        await connection.copy_records_to_table(
            "users",
            schema_name="segmentation",
            columns=["account_id", "user_id", "properties", "timezone"],
            records=((account_id, f"u{i:08d}", properties, ZONES[i % len(ZONES)]) for i in range(users)),
        )
    finally:
        await connection.close()


async def run(users: int, speed: float) -> None:
    configure_logging("warning")
    manual = clock.ManualClock(START)
    previous = clock.use(manual)
    segment_api = SegmentApi(write_keys={"wk_bench"}, record_bodies=False)
    await segment_api.start()
    try:
        async with (
            benchmark_servers("herald-bench-scheduling-") as (database_url, nats_url),
            fresh_settings(database_url, nats_url) as settings,
            running_platform(settings) as platform,
        ):
            # Registers the property's type the way the API does; the rest come by COPY.
            await platform.segmentation.UpsertUsers(
                pb.UpsertUsersRequest(users=[user("registrar", plan="silver")])
            )
            await _load_users(settings.database_url, platform.account, users)
            segment = await create_segment(platform, condition("plan", "EQUALS", "gold"))
            destination = await create_segment_destination(platform, segment_api.url, "wk_bench")
            quiet = campaign_pb.QuietHours(
                start="22:00", end="09:00", action=campaign_pb.QUIET_HOURS_ACTION_DELAY
            )
            campaign = segment_export_campaign(
                segment.name,
                destination.name,
                # 08:00 on Tuesday in each user's zone, inside 22:00-09:00: every delivery waits
                # for 09:00 local.
                schedule=campaign_pb.Schedule(
                    send_later=campaign_pb.SendLater(
                        send_time=api.timestamp(datetime(2026, 11, 24, 8, tzinfo=UTC))
                    )
                ),
                targeting=campaign_pb.Targeting(control_group_percent=10),
                delivery=campaign_pb.DeliveryPreferences(user_timezone=True, quiet_hours=quiet),
            )
            created = await platform.campaigns.CreateCampaign(
                campaign_pb.CreateCampaignRequest(campaign=campaign)
            )
            await platform.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
            await platform.hosts["dispatch"].infra.stop_consumers()

            async def run_when(ready: Callable[[scheduler_pb.Run], bool]) -> scheduler_pb.Run:
                while True:
                    listed = await platform.scheduler.ListRuns(
                        scheduler_pb.ListRunsRequest(parent=created.name)
                    )
                    if listed.runs and ready(listed.runs[0]):
                        return listed.runs[0]
                    await asyncio.sleep(0.05)

            planned = await run_when(lambda _: True)
            # Planning: the clock stands at the run's start (08:00 in UTC+14); nothing is due yet.
            manual.advance(api.from_timestamp(planned.scheduled_time) - manual.now())
            started = time.perf_counter()
            planned = await run_when(lambda r: r.state == scheduler_pb.RUN_STATE_RELEASING)
            planning_s = time.perf_counter() - started
            # Releasing: zone after zone reaches 09:00, speed times faster than real time.
            clock.use(clock.ScaledClock(manual.now(), speed))
            released = time.perf_counter()
            found = await run_when(lambda r: r.state == scheduler_pb.RUN_STATE_DISPATCHED)
            releasing_s = time.perf_counter() - released
            lateness_s = found.max_release_lateness_seconds / speed
            rate = users / planning_s
            print(
                f"scheduling: {users:,} users in {len(ZONES)} zones, do-not-disturb delay, 10% control group"
            )
            print(
                f"  planning      {rate:>10,.0f} users/s  ({planning_s:,.1f} s; {planned.waiting:,} waiting, "
                f"{planned.released:,} held back)   target >= {TARGET_PLANNING_RATE:,}  "
                f"{'met' if rate >= TARGET_PLANNING_RATE else 'NOT met'}"
            )
            print(
                f"  max lateness  {lateness_s:>10.3f} s        "
                f"({found.released - planned.released:,} released over "
                f"{releasing_s:,.0f} s at {speed:,.0f}x)   target <= {TARGET_LATENESS_SECONDS} s  "
                f"{'met' if lateness_s <= TARGET_LATENESS_SECONDS else 'NOT met'}"
            )
    finally:
        clock.use(previous)
        await segment_api.stop()
