"""`make bench`: a Segment export to N users through all four services, with stage timings.

Runs against DATABASE_URL / NATS_URL when set, else embedded servers. Prints numbers; asserts
only that every user was delivered once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from pathlib import Path
from tempfile import mkdtemp

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald_common.embedded import EmbeddedInfrastructure
from herald_common.logging import configure_logging
from tests.conftest import eventually
from tests.fakes.segment_api import SegmentApi
from tests.harness import Platform, fresh_settings, running_platform
from tests.helpers import condition, create_segment, create_segment_destination, segment_export_campaign, user


async def bench(users: int) -> None:
    configure_logging("warning")
    database_url, nats_url = os.environ.get("DATABASE_URL"), os.environ.get("NATS_URL")
    embedded = None
    if not (database_url and nats_url):
        embedded = EmbeddedInfrastructure(Path(mkdtemp(prefix="herald-bench-")))
        await asyncio.to_thread(embedded.start)
        database_url, nats_url = embedded.database_url, embedded.nats_url
    segment_api = SegmentApi(write_keys={"wk_bench"})
    await segment_api.start()
    try:
        async with fresh_settings(database_url, nats_url) as settings, running_platform(settings) as platform:
            await _export(platform, segment_api, users)
    finally:
        await segment_api.stop()
        if embedded is not None:
            embedded.stop()


async def _export(platform: Platform, segment_api: SegmentApi, users: int) -> None:
    tag = uuid.uuid4().hex[:8]
    started = time.perf_counter()
    batch = 1000
    for offset in range(0, users, batch):
        await platform.segmentation.UpsertUsers(
            segmentation_pb.UpsertUsersRequest(
                users=[
                    user(f"{tag}-{i:08d}", cohort=tag, first_name=f"U{i}", plan="gold")
                    for i in range(offset, min(offset + batch, users))
                ]
            )
        )
    upserted = time.perf_counter()
    segment = await create_segment(platform, condition("cohort", "EQUALS", tag))
    reach_start = time.perf_counter()
    reach = await platform.segmentation.EstimateReach(
        segmentation_pb.EstimateReachRequest(segment=segment.name)
    )
    reach_done = time.perf_counter()
    assert reach.user_count == users
    destination = await create_segment_destination(platform, segment_api.url, "wk_bench")
    created = await platform.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=segment_export_campaign(segment.name, destination.name))
    )
    publish = time.perf_counter()
    await platform.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))

    async def completed() -> bool:
        got = await platform.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=created.name))
        return bool(got.state == campaign_pb.State.STATE_COMPLETED)

    first_event: float | None = None
    while not await completed():
        if first_event is None and segment_api.events:
            first_event = time.perf_counter()
        await asyncio.sleep(0.05)
    done = time.perf_counter()
    await eventually(completed)
    stats = await platform.campaigns.GetCampaignStats(
        campaign_pb.GetCampaignStatsRequest(name=f"{created.name}/stats")
    )
    assert stats.sent == users and len(segment_api.events) == users and segment_api.duplicates == 0
    requests = len([r for r in segment_api.requests if r.path == "/v1/batch"])
    print(f"users                         {users}")
    print(f"upsert                        {users / (upserted - started):10.0f} users/s")
    print(f"estimate reach                {(reach_done - reach_start) * 1000:10.1f} ms")
    print(f"publish -> first event        {((first_event or done) - publish) * 1000:10.1f} ms")
    print(f"publish -> campaign completed {(done - publish):10.2f} s")
    print(f"end-to-end delivery           {users / (done - publish):10.0f} deliveries/s")
    print(f"Segment /v1/batch requests    {requests:10d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=20_000)
    asyncio.run(bench(parser.parse_args().users))


if __name__ == "__main__":
    main()
