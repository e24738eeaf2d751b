"""Nothing lost, nothing sent twice: redelivered jobs, malformed jobs, retries, permanent failures."""

from __future__ import annotations

import uuid

from nats.js import JetStreamContext

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.events.v1 import events_pb2 as events
from herald.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald_common.bus import REASON_HEADER, Subjects
from herald_sandbox.segment_api import SegmentApi
from tests.conftest import Platform, eventually
from tests.helpers import (
    completed_stats,
    condition,
    create_segment,
    create_segment_destination_for,
    last_message,
    segment_export_campaign,
    user,
)


async def _announce_campaign(js: JetStreamContext, subjects: Subjects, account: str, destination: str) -> str:
    """Publishes a running campaign as the campaign service would, so dispatch delivers for it."""
    campaign = segment_export_campaign("segments/" + str(uuid.uuid4()), destination)
    campaign.name = f"campaigns/{uuid.uuid4()}"
    campaign.state = campaign_pb.State.STATE_RUNNING
    campaign.segment_export.event_name = "Guarantee Check"
    change = events.CampaignChanged(event_id=str(uuid.uuid4()), campaign=campaign, version=1, account=account)
    await js.publish(subjects.campaign_changed, change.SerializeToString())
    return campaign.name


def _batch(account: str, campaign: str, destination: str, *user_ids: str) -> events.DeliveryBatch:
    run_id = uuid.uuid4()
    return events.DeliveryBatch(
        account=account,
        batch_id=str(uuid.uuid4()),
        campaign=campaign,
        campaign_version=1,
        run=f"{campaign}/runs/{run_id}",
        destination=destination,
        recipients=[
            events.Recipient(delivery_id=str(uuid.uuid5(run_id, u)), user_id=u, attributes_json=b"{}")
            for u in user_ids
        ],
    )


def _subject(subjects: Subjects, destination: str) -> str:
    return subjects.delivery_batch("segment", destination.removeprefix("destinations/"))


async def _dead_letter(js: JetStreamContext, subjects: Subjects, marker: bytes) -> dict[str, str] | None:
    last = await last_message(js, subjects.stream("deadletter"), subjects.dead_letter("dispatch-segment"))
    return dict(last.headers or {}) if last is not None and last.data == marker else None


async def test_redelivered_job_is_sent_once(
    platform: Platform, segment_api: SegmentApi, js: JetStreamContext
) -> None:
    destination = await create_segment_destination_for(platform, segment_api)
    subjects = Subjects(platform.settings.namespace)
    campaign = await _announce_campaign(js, subjects, platform.account, destination.name)
    batch = _batch(platform.account, campaign, destination.name, "redelivered-user")
    delivery_id = batch.recipients[0].delivery_id
    # Two copies that JetStream does not de-duplicate (different message ids): as after a crash
    # between sending and acknowledging.
    for copy in ("a", "b"):
        await js.publish(
            _subject(subjects, destination.name),
            batch.SerializeToString(),
            headers={"Nats-Msg-Id": f"{batch.batch_id}-{copy}"},
        )

    async def delivered() -> bool:
        return delivery_id in segment_api.events

    await eventually(delivered)
    # Give the second copy time to be consumed, then check it did not reach Segment.
    fence = _batch(platform.account, campaign, destination.name, "fence-user")
    await js.publish(_subject(subjects, destination.name), fence.SerializeToString())
    await eventually(lambda: _has_user(segment_api, "fence-user"))
    sent = [
        e
        for r in segment_api.requests
        for e in (r.body or {}).get("batch", [])
        if e["messageId"] == delivery_id
    ]
    assert len(sent) == 1
    assert segment_api.duplicates == 0


async def _has_user(segment_api: SegmentApi, user_id: str) -> bool:
    return any(e["userId"] == user_id for e in segment_api.events.values())


async def test_undecodable_job_is_dead_lettered_with_reason(platform: Platform, js: JetStreamContext) -> None:
    subjects = Subjects(platform.settings.namespace)
    garbage = b"\xff\xff\xff not a protobuf " + uuid.uuid4().hex.encode()
    await js.publish(_subject(subjects, "destinations/" + str(uuid.uuid4())), garbage)

    async def dead_lettered() -> bool:
        return await _dead_letter(js, subjects, garbage) is not None

    await eventually(dead_lettered)
    headers = await _dead_letter(js, subjects, garbage)
    assert headers is not None
    assert "undecodable DeliveryBatch" in headers[REASON_HEADER]


async def test_batch_without_recipients_is_dead_lettered(platform: Platform, js: JetStreamContext) -> None:
    subjects = Subjects(platform.settings.namespace)
    destination = "destinations/" + str(uuid.uuid4())
    batch = _batch(platform.account, f"campaigns/{uuid.uuid4()}", destination)
    payload = batch.SerializeToString()
    await js.publish(_subject(subjects, destination), payload)

    async def dead_lettered() -> bool:
        return await _dead_letter(js, subjects, payload) is not None

    await eventually(dead_lettered)
    headers = await _dead_letter(js, subjects, payload)
    assert headers is not None and headers[REASON_HEADER] == "DeliveryBatch without recipients"


async def test_batch_claiming_another_account_is_set_aside_unsent(
    platform: Platform, segment_api: SegmentApi, js: JetStreamContext
) -> None:
    """Dispatch trusts only the campaign service on who owns a campaign: a batch naming another
    account is dead-lettered with the reason, and its recipients get nothing."""
    destination = await create_segment_destination_for(platform, segment_api)
    subjects = Subjects(platform.settings.namespace)
    campaign = await _announce_campaign(js, subjects, platform.account, destination.name)
    intruder = f"accounts/{uuid.uuid4()}"
    batch = _batch(intruder, campaign, destination.name, "claimed-user")
    payload = batch.SerializeToString()
    await js.publish(_subject(subjects, destination.name), payload)

    async def dead_lettered() -> bool:
        return await _dead_letter(js, subjects, payload) is not None

    await eventually(dead_lettered)
    headers = await _dead_letter(js, subjects, payload)
    assert headers is not None and headers[REASON_HEADER] == f"{intruder} does not own {campaign}"
    # The owner's own batch right after it is delivered; the claimed one never is.
    await js.publish(
        _subject(subjects, destination.name),
        _batch(platform.account, campaign, destination.name, "owner-user").SerializeToString(),
    )
    await eventually(lambda: _has_user(segment_api, "owner-user"))
    assert not await _has_user(segment_api, "claimed-user")


async def test_server_errors_are_retried_with_the_same_message_id(
    platform: Platform, segment_api: SegmentApi, js: JetStreamContext
) -> None:
    destination = await create_segment_destination_for(platform, segment_api)
    subjects = Subjects(platform.settings.namespace)
    campaign = await _announce_campaign(js, subjects, platform.account, destination.name)
    segment_api.fail_next(2, status=503, retry_after=None)
    batch = _batch(platform.account, campaign, destination.name, "flaky-user")
    await js.publish(_subject(subjects, destination.name), batch.SerializeToString())
    delivery_id = batch.recipients[0].delivery_id

    async def delivered() -> bool:
        return delivery_id in segment_api.events

    await eventually(delivered)
    attempts = [r for r in segment_api.requests if r.path == "/v1/batch"]
    assert [r.status for r in attempts] == [503, 503, 200]
    assert [r.headers.get("X-Retry-Count") for r in attempts] == [None, "1", "2"]
    assert {e["messageId"] for r in attempts for e in r.body["batch"]} == {delivery_id}


async def test_oversized_events_fail_and_the_campaign_still_completes(
    platform: Platform, segment_api: SegmentApi
) -> None:
    tag = uuid.uuid4().hex[:8]
    await platform.segmentation.UpsertUsers(
        segmentation_pb.UpsertUsersRequest(
            users=[
                user(f"{tag}-{i}", cohort=tag, bio="x" * 14_000, bio2="y" * 14_000, bio3="z" * 14_000)
                for i in range(5)
            ]
        )
    )
    segment = await create_segment(platform, condition("cohort", "EQUALS", tag))
    destination = await create_segment_destination_for(platform, segment_api)
    campaign = segment_export_campaign(segment.name, destination.name)
    campaign.segment_export.profile_attributes.extend(["bio", "bio2", "bio3"])  # 42 KB of traits per event
    created = await platform.campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=campaign))
    await platform.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    stats = await completed_stats(platform, created.name)
    assert (stats.targeted, stats.sent, stats.failed) == (5, 0, 5)
    assert not any(e["userId"].startswith(tag) for e in segment_api.events.values())


async def test_late_run_reports_do_not_roll_progress_back(
    platform: Platform, segment_api: SegmentApi, js: JetStreamContext
) -> None:
    segment = await create_segment(platform, condition("cohort", "EQUALS", uuid.uuid4().hex))
    destination = await create_segment_destination_for(platform, segment_api)
    created = await platform.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=segment_export_campaign(segment.name, destination.name))
    )
    subjects = Subjects(platform.settings.namespace)
    run = scheduler_pb.Run(name=f"{created.name}/runs/{uuid.uuid4()}", campaign=created.name)
    # Versions come from the scheduler's database; the clocks of the replicas play no part.
    newer = events.RunChanged(event_id=str(uuid.uuid4()), run=run, version=5, account=platform.account)
    newer.run.state, newer.run.targeted, newer.run.final = scheduler_pb.RunState.RUN_STATE_DISPATCHED, 7, True
    newer.occur_time.FromSeconds(1_999_999_999)
    older = events.RunChanged(event_id=str(uuid.uuid4()), run=run, version=4, account=platform.account)
    older.run.state, older.run.targeted = scheduler_pb.RunState.RUN_STATE_RUNNING, 3
    older.occur_time.FromSeconds(2_000_000_000)
    for event in (newer, older):
        await js.publish(
            subjects.run_changed, event.SerializeToString(), headers={"Nats-Msg-Id": event.event_id}
        )
    fence = events.RunChanged(
        event_id=str(uuid.uuid4()),
        run=scheduler_pb.Run(name=f"{run.name}-fence", campaign=created.name),
        version=1,
        account=platform.account,
    )
    fence.run.state, fence.run.targeted = scheduler_pb.RunState.RUN_STATE_RUNNING, 100
    fence.occur_time.FromSeconds(1)
    await js.publish(subjects.run_changed, fence.SerializeToString())

    async def stats_settled() -> bool:
        stats = await platform.campaigns.GetCampaignStats(
            campaign_pb.GetCampaignStatsRequest(name=f"{created.name}/stats")
        )
        return stats.targeted >= 100

    await eventually(stats_settled)
    # The fence, published last, is counted: so both reports before it were consumed, and the
    # older one, arriving late, did not replace the newer (7 + 100, not 3 + 100).
    stats = await platform.campaigns.GetCampaignStats(
        campaign_pb.GetCampaignStatsRequest(name=f"{created.name}/stats")
    )
    assert stats.targeted == 107
