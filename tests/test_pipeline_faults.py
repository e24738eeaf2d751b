"""The delivery pipeline under faults: every delivery ends with one outcome, nothing is lost or
sent twice, a stop stops, and one destination's trouble holds nobody else back."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime

import asyncpg
import grpc
import nats
import pytest
import sqlalchemy as sa
from nats.js import JetStreamContext

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald_common.bus import Subjects
from herald_common.grpc_server import health_status
from herald_common.loops import WakeableLoop
from herald_common.outbox import OutboxEvent, enqueue
from herald_sandbox.segment_api import SegmentApi
from tests.conftest import Platform, eventually
from tests.harness import Clients, admin_url, create_account, database_name
from tests.helpers import (
    condition,
    create_segment,
    create_segment_destination,
    create_segment_destination_for,
    field_violations,
    segment_export_campaign,
    user,
)


async def _audience(
    platform: Platform | Clients, size: int, **properties: object
) -> tuple[str, segmentation_pb.Segment]:
    tag = uuid.uuid4().hex[:8]
    for offset in range(0, size, 1000):
        await platform.segmentation.UpsertUsers(
            segmentation_pb.UpsertUsersRequest(
                users=[
                    user(f"{tag}-{i:05d}", cohort=tag, first_name=f"U{i}", **properties)
                    for i in range(offset, min(offset + 1000, size))
                ]
            )
        )
    return tag, await create_segment(platform, condition("cohort", "EQUALS", tag))


async def _publish(platform: Platform | Clients, campaign: campaign_pb.Campaign) -> str:
    created = await platform.campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=campaign))
    await platform.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    return created.name


async def _state(platform: Platform | Clients, name: str) -> campaign_pb.State.ValueType:
    return (await platform.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=name))).state


async def _stats(platform: Platform | Clients, name: str) -> campaign_pb.CampaignStats:
    return await platform.campaigns.GetCampaignStats(
        campaign_pb.GetCampaignStatsRequest(name=f"{name}/stats")
    )


async def _completed(
    platform: Platform | Clients, name: str, within: float = 60.0
) -> campaign_pb.CampaignStats:
    async def done() -> bool:
        return await _state(platform, name) == campaign_pb.State.STATE_COMPLETED

    await eventually(done, within=within)
    return await _stats(platform, name)


def _received(segment_api: SegmentApi, tag: str) -> list[str]:
    return sorted(e["userId"] for e in segment_api.events.values() if e["userId"].startswith(tag))


async def test_an_unpublishable_outbox_event_is_set_aside_and_the_rest_go_out(
    platform: Platform, js: JetStreamContext
) -> None:
    infra = platform.hosts["campaign"].infra
    subjects = Subjects(platform.settings.namespace)
    too_large = OutboxEvent(f"{subjects.namespace}.campaign.test.poison", b"x" * (2 << 20), str(uuid.uuid4()))
    after = OutboxEvent(f"{subjects.namespace}.campaign.test.after", uuid.uuid4().bytes, str(uuid.uuid4()))
    async with infra.database.transaction() as session:
        await enqueue(session, infra.relay.table, [too_large, after])
    infra.relay.notify()

    async def published() -> bool:
        try:
            last = await js.get_last_msg(subjects.stream("campaign"), after.subject)
        except nats.js.errors.NotFoundError:
            return False
        return last.data == after.payload

    await eventually(published)
    t = infra.relay.table
    async with infra.database.transaction() as session:
        problem = await session.scalar(sa.select(t.c.problem).where(t.c.msg_id == too_large.msg_id))
    assert problem is not None and "NATS accepts at most" in problem


async def test_database_connections_dropped_mid_campaign_lose_and_double_nothing(
    platform: Platform, segment_api: SegmentApi
) -> None:
    tag, segment = await _audience(platform, 2500)
    destination = await create_segment_destination_for(platform, segment_api)
    segment_api.max_requests_per_second = 4  # spread the export out so the fault lands mid-way
    name = await _publish(platform, segment_export_campaign(segment.name, destination.name))
    database = database_name(platform.settings.database_url)
    admin = await asyncpg.connect(admin_url(platform.settings.database_url))
    try:
        for _ in range(3):  # a failover: every service's connections are cut, more than once
            await asyncio.sleep(0.4)
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()",
                database,
            )
    finally:
        await admin.close()
    stats = await _completed(platform, name, within=90)
    assert (stats.targeted, stats.sent, stats.failed) == (2500, 2500, 0)
    assert _received(segment_api, tag) == [f"{tag}-{i:05d}" for i in range(2500)]


async def test_bad_profile_data_fails_one_delivery_with_its_reason(
    platform: Platform, segment_api: SegmentApi
) -> None:
    tag, segment = await _audience(platform, 3, code="SGVsbG8=")
    await platform.segmentation.UpsertUsers(  # not valid UTF-8 once decoded
        segmentation_pb.UpsertUsersRequest(users=[user(f"{tag}-bad", cohort=tag, code="/w==")])
    )
    destination = await create_segment_destination_for(platform, segment_api)
    campaign = segment_export_campaign(segment.name, destination.name)
    campaign.segment_export.custom_properties["decoded"] = "{{ profile.code | base64_decode }}"
    stats = await _completed(platform, await _publish(platform, campaign))
    assert (stats.targeted, stats.sent, stats.failed) == (4, 3, 1)
    [reason] = stats.failure_reasons
    assert "personalization failed" in reason.reason and "UnicodeDecodeError" in reason.reason
    assert list(reason.example_user_ids) == [f"{tag}-bad"]
    assert _received(segment_api, tag) == [f"{tag}-{i:05d}" for i in range(3)]


async def test_stop_halts_deliveries_and_every_member_ends_with_an_outcome(
    platform: Platform, segment_api: SegmentApi
) -> None:
    audience = 20_000
    tag, segment = await _audience(platform, audience)
    destination = await create_segment_destination_for(platform, segment_api)
    segment_api.max_requests_per_second = 1  # one batch of 500 a second
    name = await _publish(platform, segment_export_campaign(segment.name, destination.name))

    async def some_sent() -> bool:
        return len(_received(segment_api, tag)) > 0

    await eventually(some_sent)
    await platform.campaigns.StopCampaign(campaign_pb.StopCampaignRequest(name=name))
    acknowledged, seen = time.time(), len(segment_api.requests)
    await asyncio.sleep(4)
    # Once the stop is acknowledged no new request starts: a request that arrives later was sent
    # (its sentAt is stamped as it goes out) before that.
    late = [datetime.fromisoformat(r.body["sentAt"]).timestamp() for r in segment_api.requests[seen:]]
    assert all(sent_at <= acknowledged for sent_at in late), (late, acknowledged)
    assert len(_received(segment_api, tag)) < audience

    # The whole audience is accounted for, planned or not when the stop came: what was not sent
    # is skipped, "campaign stopped".
    async def all_accounted() -> bool:
        stats = await _stats(platform, name)
        return stats.sent + stats.skipped + stats.failed + stats.unknown == stats.targeted == audience

    await eventually(all_accounted, within=60)
    stats = await _stats(platform, name)
    assert stats.sent == len(_received(segment_api, tag))
    assert {r.reason: r.count for r in stats.failure_reasons} == {"campaign stopped": audience - stats.sent}
    assert await _state(platform, name) == campaign_pb.State.STATE_STOPPED


async def test_a_destination_outage_is_ridden_out_and_shown_while_it_lasts(
    platform: Platform, segment_api: SegmentApi
) -> None:
    tag, segment = await _audience(platform, 600)
    destination = await create_segment_destination_for(platform, segment_api)
    segment_api.fail_next(10, status=500, retry_after=None)  # five failures a batch: ~8 s of backoff
    name = await _publish(platform, segment_export_campaign(segment.name, destination.name))

    async def waiting_shown() -> bool:
        return "Segment answered 500" in (await _stats(platform, name)).waiting_reason

    await eventually(waiting_shown)

    async def state_says_so() -> bool:  # the campaign itself says what it waits on, while it does
        got = await platform.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=name))
        return "Segment answered 500" in got.state_reason or got.state == campaign_pb.State.STATE_COMPLETED

    await eventually(state_says_so)
    stats = await _completed(platform, name)
    assert (stats.targeted, stats.sent, stats.failed) == (600, 600, 0)
    assert stats.waiting_reason == ""
    assert _received(segment_api, tag) == [f"{tag}-{i:05d}" for i in range(600)]


async def test_a_stop_during_an_outage_leaves_nothing_shown_as_waiting(
    platform: Platform, segment_api: SegmentApi
) -> None:
    """The retries that a stop ends no longer wait on the destination: the campaign says so."""
    _, segment = await _audience(platform, 100)
    destination = await create_segment_destination_for(platform, segment_api)
    segment_api.fail_for(120, status=500)
    name = await _publish(platform, segment_export_campaign(segment.name, destination.name))

    async def waiting_shown() -> bool:
        return "Segment answered 500" in (await _stats(platform, name)).waiting_reason

    await eventually(waiting_shown)
    await platform.campaigns.StopCampaign(campaign_pb.StopCampaignRequest(name=name))

    async def nothing_waits() -> bool:
        stats = await _stats(platform, name)
        return stats.skipped == 100 and stats.waiting_reason == ""

    await eventually(nothing_waits, within=60)
    segment_api.fail_for(0)


async def test_one_destinations_outage_does_not_hold_another_back(platform: Platform) -> None:
    down, up = SegmentApi(write_keys={"wk_down"}), SegmentApi(write_keys={"wk_up"})
    await down.start()
    await up.start()
    try:
        down.fail_next(1000, status=503, retry_after=None)
        _, segment = await _audience(platform, 1000)
        stuck = await create_segment_destination(platform, down.url, "wk_down")
        flowing = await create_segment_destination(platform, up.url, "wk_up")
        stuck_name = await _publish(platform, segment_export_campaign(segment.name, stuck.name))
        await asyncio.sleep(0.5)  # the first campaign's batches are in their lane, failing
        stats = await _completed(
            platform, await _publish(platform, segment_export_campaign(segment.name, flowing.name))
        )
        assert stats.sent == 1000
        assert await _state(platform, stuck_name) == campaign_pb.State.STATE_RUNNING
        await platform.campaigns.StopCampaign(campaign_pb.StopCampaignRequest(name=stuck_name))
    finally:
        await down.stop()
        await up.stop()


async def test_a_segment_or_destination_in_use_cannot_be_deleted(
    platform: Platform, segment_api: SegmentApi
) -> None:
    _, segment = await _audience(platform, 1)
    destination = await create_segment_destination_for(platform, segment_api)
    campaign = segment_export_campaign(segment.name, destination.name)
    campaign.schedule.send_later.send_time.FromSeconds(1_950_000_000)
    name = await _publish(platform, campaign)

    # Refused the moment the publication is answered, naming the campaign that uses them.
    with pytest.raises(grpc.aio.AioRpcError) as segment_refused:
        await platform.segmentation.DeleteSegment(segmentation_pb.DeleteSegmentRequest(name=segment.name))
    assert segment_refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert name in (segment_refused.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as destination_refused:
        await platform.dispatch.DeleteDestination(dispatch_pb.DeleteDestinationRequest(name=destination.name))
    assert destination_refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert name in (destination_refused.value.details() or "")

    # Once the campaign is stopped, they are free to go.
    await platform.campaigns.StopCampaign(campaign_pb.StopCampaignRequest(name=name))
    await platform.segmentation.DeleteSegment(segmentation_pb.DeleteSegmentRequest(name=segment.name))
    await platform.dispatch.DeleteDestination(dispatch_pb.DeleteDestinationRequest(name=destination.name))


async def test_campaigns_can_be_found_by_segment_destination_and_state(
    platform: Platform, segment_api: SegmentApi
) -> None:
    _, segment = await _audience(platform, 1)
    _, other_segment = await _audience(platform, 1)
    destination = await create_segment_destination_for(platform, segment_api)
    later = segment_export_campaign(segment.name, destination.name)
    later.schedule.send_later.send_time.FromSeconds(1_950_000_000)
    scheduled = await _publish(platform, later)
    draft = await platform.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=segment_export_campaign(segment.name, destination.name))
    )
    await platform.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(
            campaign=segment_export_campaign(other_segment.name, destination.name)
        )
    )

    async def found(**query: object) -> list[str]:
        listed = await platform.campaigns.ListCampaigns(campaign_pb.ListCampaignsRequest(**query))  # type: ignore[arg-type]
        return [c.name for c in listed.campaigns]

    assert await found(segment=segment.name) == [draft.name, scheduled]
    assert await found(segment=segment.name, states=[campaign_pb.State.STATE_SCHEDULED]) == [scheduled]
    assert len(await found(destination=destination.name)) == 3
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await found(states=[99])
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "STATE_SCHEDULED" in field_violations(bad.value)["states[0]"]


async def test_streams_are_bounded_and_jobs_leave_once_delivered(
    js: JetStreamContext, platform: Platform
) -> None:
    subjects = Subjects(platform.settings.namespace)
    for name in subjects.streams():
        info = await js.stream_info(name)
        assert info.config.max_bytes and info.config.max_bytes > 0, name
    jobs = await js.stream_info(subjects.stream("jobs"))
    assert jobs.config.retention == nats.js.api.RetentionPolicy.WORK_QUEUE


async def _export_seconds(clients: Clients, segment: str, destination: str) -> float:
    """Seconds from publishing an export to its COMPLETED state."""
    started = asyncio.get_running_loop().time()
    name = await _publish(clients, segment_export_campaign(segment, destination))
    await _completed(clients, name, within=120)
    return asyncio.get_running_loop().time() - started


async def test_a_hanging_destination_delays_no_other_accounts_deliveries(platform: Platform) -> None:
    """Destination A (one account) hangs for 120 s with far more batches than a dispatch worker
    holds at once; destination B (another account) exports 10,000 users as fast as it does alone."""
    hanging, healthy = SegmentApi(write_keys={"wk_a"}), SegmentApi(write_keys={"wk_b"})
    await hanging.start()
    await healthy.start()
    clients = []
    try:
        for owner in ("hanging", "healthy"):
            _, key = await create_account(
                platform.address("campaign"), platform.settings.bootstrap_token, owner
            )
            clients.append(Clients.open(platform.addresses, key))
        a, b = clients
        _, a_segment = await _audience(a, 36_000)  # 72 batches: more than the worker's 64 in flight
        _, b_segment = await _audience(b, 10_000)
        a_destination = await create_segment_destination(a, hanging.url, "wk_a")
        b_destination = await create_segment_destination(b, healthy.url, "wk_b")
        alone = await _export_seconds(b, b_segment.name, b_destination.name)

        hanging.hang_for(120)
        a_campaign = await _publish(a, segment_export_campaign(a_segment.name, a_destination.name))

        async def a_stuck() -> bool:
            return hanging.in_flight >= 8  # its lane is full of hanging requests

        await eventually(a_stuck, within=60)
        beside = await _export_seconds(b, b_segment.name, b_destination.name)
        assert beside <= max(2 * alone, alone + 5), (alone, beside)
        assert len(healthy.events) == 20_000
        await a.campaigns.StopCampaign(campaign_pb.StopCampaignRequest(name=a_campaign))
    finally:
        for opened in clients:
            await opened.close()
        await hanging.stop()
        await healthy.stop()


async def test_a_poison_pending_row_is_quarantined_and_releases_go_on(
    platform: Platform, segment_api: SegmentApi
) -> None:
    _, segment = await _audience(platform, 20)
    destination = await create_segment_destination_for(platform, segment_api)
    known = await _publish(platform, segment_export_campaign(segment.name, destination.name))
    await _completed(platform, known)
    # Two rows no release can ever take, due before everything else: one whose recipients are not
    # a PendingRecipients, one of a campaign the scheduler never heard of.
    connection = await asyncpg.connect(platform.settings.database_url)
    try:
        poison = [(known, b"\xff\xff\xff\xff"), (f"campaigns/{uuid.uuid4()}", b"")]
        for campaign, recipients in poison:
            await connection.execute(
                """
                INSERT INTO scheduler.pending_deliveries
                    (run_id, group_id, account_id, campaign, due_at, zone, size, recipients)
                VALUES ($1, $2, $3, $4, now() - interval '1 day', 'UTC', 1, $5)
                """,
                uuid.uuid4(),
                f"poison-{uuid.uuid4()}",
                uuid.UUID(platform.account.removeprefix("accounts/")),
                campaign,
                recipients,
            )
        name = await _publish(platform, segment_export_campaign(segment.name, destination.name))
        assert (await _completed(platform, name)).sent == 20

        async def quarantined() -> list[str]:
            rows = await connection.fetch(
                "SELECT problem FROM scheduler.pending_deliveries WHERE group_id LIKE 'poison-%'"
            )
            return [r["problem"] for r in rows if r["problem"]]

        await eventually(lambda: _has(quarantined, 2))
        problems = await quarantined()
        assert any("DecodeError" in p for p in problems) and any("does not know" in p for p in problems)
        assert await health_status(platform.address("scheduler")) == "SERVING"
    finally:
        await connection.execute("DELETE FROM scheduler.pending_deliveries WHERE group_id LIKE 'poison-%'")
        await connection.close()


async def _has(found: Callable[[], Awaitable[list[str]]], count: int) -> bool:
    return len(await found()) >= count


async def test_a_background_loop_that_keeps_failing_makes_its_service_not_serving(platform: Platform) -> None:
    infra = platform.hosts["dispatch"].infra
    broken = True

    async def step() -> bool:
        if broken:
            raise RuntimeError("the step keeps failing")
        return False

    loop = WakeableLoop("test-loop", step, poll_seconds=0.1)
    infra.watch(loop)
    loop.start()
    address = platform.address("dispatch")
    try:

        async def status_is(wanted: str, service: str = "") -> bool:
            return await health_status(address, service) == wanted

        await eventually(lambda: status_is("NOT_SERVING"), within=20)
        assert await status_is("NOT_SERVING", "loop.test-loop")
        assert await status_is("SERVING", "liveness")  # a restart would not help: not dead
        broken = False
        await eventually(lambda: status_is("SERVING"), within=20)
        assert await status_is("SERVING", "loop.test-loop")
    finally:
        infra.loops.remove(loop)
        await loop.stop()
