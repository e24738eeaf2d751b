"""Campaign goals through the public API, on the manual clock: who converted within the window
after their message (or, in the control group, after the moment they would have had it), and
the uplift over the control group with its confidence interval."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.struct_pb2 import Struct

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_common import clock
from herald_common.timing import in_control_group
from herald_sandbox.segment_api import SegmentApi
from tests.conftest import Platform, eventually
from tests.harness import Clients, create_account
from tests.helpers import (
    completed_stats,
    condition,
    create_segment,
    create_segment_destination_for,
    field_violations,
    segment_export_campaign,
    segmentation_has,
    until_goal_matched,
    until_live,
    user,
    writes_held,
)

USERS = 60


def _window(hours: float) -> Duration:
    window = Duration()
    window.FromTimedelta(timedelta(hours=hours))
    return window


def charged_goal(window_hours: float = 2, revenue_property: str = "amount") -> campaign_pb.Goal:
    """Charged with an amount of at least 500, its amount the revenue."""
    return campaign_pb.Goal(
        event=campaign_pb.LiveEvent(
            event_name="Charged", where=[condition("amount", "GREATER_THAN_OR_EQUAL", 500)]
        ),
        conversion_window=_window(window_hours),
        revenue_property=revenue_property,
    )


@dataclass
class Shop:
    clients: Clients
    segment: str
    destination: str
    tag: str
    clock: clock.ManualClock
    segment_api: SegmentApi
    database_url: str

    async def charge(self, user_id: str, amount: float, event_id: str = "") -> None:
        event = pb.Event(user_id=user_id, name="Charged", client_event_id=event_id or uuid.uuid4().hex)
        event.time.FromDatetime(self.clock.now())
        event.properties.update({"amount": amount})
        await self.clients.segmentation.IngestEvents(pb.IngestEventsRequest(events=[event]))

    async def act(self, user_id: str, name: str) -> None:
        event = pb.Event(user_id=user_id, name=name, client_event_id=uuid.uuid4().hex)
        event.time.FromDatetime(self.clock.now())
        await self.clients.segmentation.IngestEvents(pb.IngestEventsRequest(events=[event]))

    async def stats(self, name: str) -> campaign_pb.CampaignStats:
        return await self.clients.campaigns.GetCampaignStats(
            campaign_pb.GetCampaignStatsRequest(name=f"{name}/stats")
        )


@pytest.fixture
async def shop(
    platform: Platform, segment_api: SegmentApi, manual_clock: clock.ManualClock
) -> AsyncIterator[Shop]:
    tag = uuid.uuid4().hex[:8]
    _, key = await create_account(
        platform.address("campaign"), platform.settings.bootstrap_token, f"goals {tag}"
    )
    clients = Clients.open(platform.addresses, key)
    await clients.segmentation.UpsertUsers(
        pb.UpsertUsersRequest(users=[user(f"{tag}-{i:02}", cohort=tag) for i in range(USERS)])
    )
    segment = await create_segment(clients, condition("cohort", "EQUALS", tag))
    destination = await create_segment_destination_for(clients, segment_api)
    # A Charged event seen before: its amount is a number, its currency a string.
    await clients.segmentation.IngestEvents(
        pb.IngestEventsRequest(
            events=[
                pb.Event(
                    user_id=f"{tag}-someone",
                    name="Charged",
                    client_event_id=uuid.uuid4().hex,
                    properties=_struct(amount=1, currency="EUR"),
                )
            ]
        )
    )
    yield Shop(
        clients,
        segment.name,
        destination.name,
        tag,
        manual_clock,
        segment_api,
        platform.settings.database_url,
    )
    await clients.close()


def _struct(**values: Any) -> Struct:
    made = Struct()
    made.update(values)
    return made


def _wilson(k: int, n: int) -> tuple[float, float]:
    z = 1.959963984540054
    p = k / n
    middle = (2 * n * p + z * z) / (2 * (n + z * z))
    spread = z * math.sqrt(z * z + 4 * n * p * (1 - p)) / (2 * (n + z * z))
    return middle - spread, middle + spread


async def test_conversions_count_within_the_window_once_each_against_the_control_group(shop: Shop) -> None:
    name = await _published(
        shop, targeting=campaign_pb.Targeting(control_group_percent=20), goal=charged_goal()
    )
    await completed_stats(shop.clients, name)
    users = [f"{shop.tag}-{i:02}" for i in range(USERS)]
    control = [u for u in users if in_control_group(name, u, 20)]
    sent = [u for u in users if u not in control]
    assert len(control) >= 4 and len(sent) >= 10

    shop.clock.advance(timedelta(minutes=30))
    for u in sent[:5]:
        await shop.charge(u, 600)
    await shop.charge(sent[0], 900, event_id=f"{shop.tag}-twice")
    await shop.charge(sent[0], 900, event_id=f"{shop.tag}-twice")  # the same event again
    await shop.charge(sent[5], 100)  # under the goal's amount
    for u in control[:2]:
        await shop.charge(u, 800)
    await shop.charge(f"{shop.tag}-stranger", 1000)  # never part of the campaign
    shop.clock.advance(timedelta(hours=2))  # 2.5 hours after the message: past the window
    await shop.charge(sent[6], 700)
    await shop.charge(control[2], 700)

    async def counted() -> bool:
        goal = (await shop.stats(name)).goal
        return (goal.converted, goal.control_converted) == (5, 2)

    await eventually(counted, within=20)
    goal = (await shop.stats(name)).goal
    n1, n2 = len(sent), len(control)
    assert (goal.sent, goal.converted, goal.control, goal.control_converted) == (n1, 5, n2, 2)
    p1, p2 = 5 / n1, 2 / n2
    assert goal.conversion_rate == pytest.approx(p1)
    assert goal.control_conversion_rate == pytest.approx(p2)
    assert goal.uplift == pytest.approx(p1 - p2)
    (l1, u1), (l2, u2) = _wilson(5, n1), _wilson(2, n2)
    assert goal.uplift_low == pytest.approx(p1 - p2 - math.hypot(p1 - l1, u2 - p2))
    assert goal.uplift_high == pytest.approx(p1 - p2 + math.hypot(u1 - p1, p2 - l2))
    # The first of sent[0]'s events converted their message; a later one adds nothing.
    assert goal.revenue == pytest.approx(5 * 600)
    assert goal.revenue_per_user == pytest.approx(3000 / n1)
    assert goal.control_revenue == pytest.approx(1600)
    assert goal.control_revenue_per_user == pytest.approx(1600 / n2)
    # The campaign's one run has the same numbers, and its skips by reason.
    (run,) = (await shop.clients.scheduler.ListRuns(scheduler_pb.ListRunsRequest(parent=name))).runs
    of_run = await shop.stats(run.name)
    assert (of_run.targeted, of_run.sent, of_run.skipped) == (USERS, n1, n2)
    assert [(r.reason, r.count) for r in of_run.failure_reasons] == [("control group", n2)]
    assert of_run.goal == goal
    # Each recipient's result, for analysis elsewhere.
    exported = [
        r
        async for r in shop.clients.campaigns.ExportRunResults(
            campaign_pb.ExportRunResultsRequest(run=run.name)
        )
    ]
    assert sorted(r.user_id for r in exported) == users
    groups = {r.user_id: (r.group, r.status) for r in exported}
    assert {groups[u] for u in sent} == {(campaign_pb.RESULT_GROUP_TARGET, "sent")}
    assert {groups[u] for u in control} == {(campaign_pb.RESULT_GROUP_CONTROL, "skipped")}
    converted = {r.user_id: r.revenue for r in exported if r.HasField("convert_time")}
    assert converted == {**{u: 600 for u in sent[:5]}, **{u: 800 for u in control[:2]}}


async def test_an_event_before_its_message_was_recorded_still_converts(shop: Shop) -> None:
    """The user acts before dispatch's outcome for their message reached the campaign service: the
    event waits for it."""
    campaign = await shop.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(
            campaign=segment_export_campaign(shop.segment, shop.destination, goal=charged_goal())
        )
    )
    shop.segment_api.hang_for(4)  # the export is under way, its outcome not yet recorded
    await shop.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=campaign.name))
    await until_goal_matched(shop.database_url, campaign.name)
    first = f"{shop.tag}-00"
    await shop.charge(first, 550)
    assert (await shop.stats(campaign.name)).goal.sent == 0
    await completed_stats(shop.clients, campaign.name)

    async def converted() -> bool:
        goal = (await shop.stats(campaign.name)).goal
        return goal.sent == USERS and goal.converted == 1

    await eventually(converted, within=20)
    assert (await shop.stats(campaign.name)).goal.revenue == pytest.approx(550)


async def test_a_conversion_before_segmentation_kept_the_goal_still_counts(shop: Shop) -> None:
    """Segmentation follows CampaignChanged on its own, and here keeps the goal only after the
    export completed and a user converted: it catches up on the events since publishing."""
    campaign = await shop.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(
            campaign=segment_export_campaign(shop.segment, shop.destination, goal=charged_goal())
        )
    )
    async with writes_held(shop.database_url, "segmentation.goals"):
        await shop.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=campaign.name))
        await completed_stats(shop.clients, campaign.name)
        await shop.charge(f"{shop.tag}-00", 700)
        await shop.charge(f"{shop.tag}-01", 20)  # below the goal's 500
        assert not await segmentation_has(shop.database_url, "goals", campaign.name)

    async def converted() -> bool:
        return (await shop.stats(campaign.name)).goal.converted == 1

    await eventually(converted, within=20)
    await asyncio.sleep(1)
    goal = (await shop.stats(campaign.name)).goal
    assert goal.converted == 1
    assert goal.revenue == pytest.approx(700)


async def test_bad_goals_are_refused_naming_the_field(shop: Shop) -> None:
    cases = {
        "campaign.goal.conversion_window": charged_goal(window_hours=0.5),
        "campaign.goal.event.event_name": campaign_pb.Goal(conversion_window=_window(24)),
    }
    too_long = charged_goal()
    too_long.conversion_window.FromTimedelta(timedelta(days=31))
    cases["campaign.goal.conversion_window "] = too_long
    wrong_operator = charged_goal()
    wrong_operator.event.where[0].CopyFrom(condition("amount", "CONTAINS", "5"))
    cases["campaign.goal.event.where[0]"] = wrong_operator
    cases["campaign.goal.revenue_property"] = charged_goal(revenue_property="currency")
    for field, goal in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await shop.clients.campaigns.CreateCampaign(
                campaign_pb.CreateCampaignRequest(
                    campaign=segment_export_campaign(shop.segment, shop.destination, goal=goal)
                )
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert any(f.startswith(field.strip()) for f in field_violations(refused.value)), (
            field,
            field_violations(refused.value),
        )


async def test_the_goal_changes_only_while_a_draft(shop: Shop) -> None:
    draft = await shop.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(
            campaign=segment_export_campaign(shop.segment, shop.destination, goal=charged_goal())
        )
    )
    changed = campaign_pb.Campaign(name=draft.name, goal=charged_goal(window_hours=24))
    mask = field_mask_pb2.FieldMask(paths=["goal"])
    updated = await shop.clients.campaigns.UpdateCampaign(
        campaign_pb.UpdateCampaignRequest(campaign=changed, update_mask=mask)
    )
    assert updated.goal.conversion_window.ToTimedelta() == timedelta(hours=24)
    await shop.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=draft.name))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await shop.clients.campaigns.UpdateCampaign(
            campaign_pb.UpdateCampaignRequest(campaign=changed, update_mask=mask)
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "goal can change only while the campaign is a draft" in (refused.value.details() or "")


async def _published(shop: Shop, **fields: Any) -> str:
    created = await shop.clients.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(
            campaign=segment_export_campaign(shop.segment, shop.destination, **fields)
        )
    )
    await shop.clients.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    await until_goal_matched(shop.database_url, created.name)
    return created.name


async def test_the_stats_stream_sees_each_change(shop: Shop) -> None:
    name = await _published(shop, goal=charged_goal())
    await completed_stats(shop.clients, name)
    seen: list[campaign_pb.CampaignStats] = []
    request = campaign_pb.WatchCampaignStatsRequest(name=f"{name}/stats")

    async def watch() -> None:
        async for stats in shop.clients.campaigns.WatchCampaignStats(request):
            seen.append(stats)

    async def converted(n: int) -> bool:
        return bool(seen) and seen[-1].goal.converted == n

    watching = asyncio.create_task(watch())
    await eventually(lambda: converted(0))
    assert seen[0].goal.sent == USERS
    shop.clock.advance(timedelta(minutes=10))
    for n in range(1, 4):
        await shop.charge(f"{shop.tag}-{n:02}", 500 + n)
        await eventually(lambda n=n: converted(n), within=10)  # type: ignore[misc]
    assert [s.goal.converted for s in seen] == [0, 1, 2, 3]
    assert seen[-1].goal.revenue == pytest.approx(501 + 502 + 503)
    assert seen[-1] == await shop.stats(name)
    # Once the window has passed since the campaign ended, nothing can change: the stream ends.
    shop.clock.advance(timedelta(hours=2))
    await asyncio.wait_for(watching, timeout=10)


async def test_a_recurring_campaign_gives_a_conversion_to_the_run_before_it(shop: Shop) -> None:
    start = shop.clock.now()
    daily = campaign_pb.Recurring(
        daily=campaign_pb.EveryNDays(every=1),
        time_of_day="13:00",
        start_date=start.date().isoformat(),
        occurrences=2,
    )
    name = await _published(shop, schedule=campaign_pb.Schedule(recurring=daily), goal=charged_goal(48))
    first_run = start.replace(hour=13, minute=0, second=1)
    shop.clock.advance(first_run - shop.clock.now())

    async def sent(count: int) -> bool:
        return (await shop.stats(name)).goal.sent == count

    await eventually(lambda: sent(USERS), within=20)
    shop.clock.advance(timedelta(days=1))
    await eventually(lambda: sent(2 * USERS), within=20)
    buyer = f"{shop.tag}-07"
    # Both runs' messages are inside the 48-hour window: the event goes to the second, the most
    # recent; a later event finds it converted, and does not fall back to the first.
    shop.clock.advance(timedelta(minutes=30))
    await shop.charge(buyer, 600)
    await shop.charge(buyer, 650)

    async def converted() -> bool:
        return (await shop.stats(name)).goal.converted == 1

    await eventually(converted, within=10)
    await asyncio.sleep(1)
    goal = (await shop.stats(name)).goal
    assert (goal.converted, goal.revenue) == (1, 600)
    # Each run's own stats: the conversion is the second's.
    listed = await shop.clients.scheduler.ListRuns(scheduler_pb.ListRunsRequest(parent=name))
    by_run = [await shop.stats(run.name) for run in listed.runs]
    assert [(s.targeted, s.sent, s.goal.sent, s.goal.converted, s.goal.revenue) for s in by_run] == [
        (USERS, USERS, USERS, 0, 0),
        (USERS, USERS, USERS, 1, 600),
    ]


async def test_a_live_campaign_counts_a_conversion_per_trigger_occurrence(shop: Shop) -> None:
    added = campaign_pb.LiveTrigger(
        action=campaign_pb.ActionTrigger(event=campaign_pb.LiveEvent(event_name="Added to Cart"))
    )
    name = await _published(
        shop,
        audience=None,
        schedule=campaign_pb.Schedule(live=campaign_pb.Live(trigger=added)),
        goal=charged_goal(),
    )
    await until_live(shop.clients, shop.database_url, name)
    buyer = f"{shop.tag}-03"

    async def goal_is(sent: int, converted: int) -> bool:
        goal = (await shop.stats(name)).goal
        return (goal.sent, goal.converted) == (sent, converted)

    for occurrence in range(1, 3):
        shop.clock.advance(timedelta(minutes=5))
        await shop.act(buyer, "Added to Cart")
        await eventually(lambda n=occurrence: goal_is(n, n - 1), within=20)  # type: ignore[misc]
        shop.clock.advance(timedelta(minutes=10))
        await shop.charge(buyer, 500)
        await eventually(lambda n=occurrence: goal_is(n, n), within=20)  # type: ignore[misc]


async def test_stats_match_the_recorded_facts_after_every_service_restarts(
    shop: Shop, platform: Platform
) -> None:
    name = await _published(
        shop, targeting=campaign_pb.Targeting(control_group_percent=20), goal=charged_goal()
    )
    await platform.restart_all()  # mid-run
    await completed_stats(shop.clients, name)
    users = [f"{shop.tag}-{i:02}" for i in range(USERS)]
    shop.clock.advance(timedelta(minutes=20))
    for i, u in enumerate(users[:30]):
        await shop.charge(u, 500 + i, event_id=f"{shop.tag}-buy-{i}")
    await platform.restart_all()  # conversions under way
    for i, u in enumerate(users[20:40], start=20):  # ten sent again, ten new
        await shop.charge(u, 500 + i, event_id=f"{shop.tag}-buy-{i}")

    async def all_counted() -> bool:
        goal = (await shop.stats(name)).goal
        return goal.converted + goal.control_converted == 40

    await eventually(all_counted, within=30)
    await asyncio.sleep(1)
    connection = await asyncpg.connect(shop.database_url)
    try:
        facts = await connection.fetchrow(
            """
            SELECT count(*) FILTER (WHERE NOT x.control) AS sent,
                   count(v.converted_at) FILTER (WHERE NOT x.control) AS converted,
                   count(*) FILTER (WHERE x.control) AS control,
                   count(v.converted_at) FILTER (WHERE x.control) AS control_converted,
                   coalesce(sum(v.revenue) FILTER (WHERE NOT x.control), 0) AS revenue,
                   coalesce(sum(v.revenue) FILTER (WHERE x.control), 0) AS control_revenue
            FROM campaign.exposures x LEFT JOIN campaign.conversions v USING (delivery_id)
            WHERE x.campaign_id = $1
            """,
            uuid.UUID(name.removeprefix("campaigns/")),
        )
    finally:
        await connection.close()
    goal = (await shop.stats(name)).goal
    assert (goal.sent, goal.converted, goal.control, goal.control_converted) == (
        facts["sent"],
        facts["converted"],
        facts["control"],
        facts["control_converted"],
    )
    assert (goal.revenue, goal.control_revenue) == pytest.approx((facts["revenue"], facts["control_revenue"]))
    assert goal.sent + goal.control == USERS
    assert goal.revenue + goal.control_revenue == pytest.approx(sum(500 + i for i in range(40)))
