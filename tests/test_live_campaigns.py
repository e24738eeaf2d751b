"""Live campaigns end to end, through the public API on the manual clock: users get the message
as they act (an action), when they fail to act in time (an inaction) or as a date draws near,
once per trigger occurrence, within the campaign's frequency and limits."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_common import clock
from herald_common.skips import SkipReason
from herald_common.timing import in_control_group
from herald_sandbox.segment_api import SegmentApi
from herald_scheduler import main as scheduler_main
from herald_segmentation import live as segmentation_live
from tests.conftest import Platform, eventually
from tests.harness import Clients, create_account
from tests.helpers import (
    completed_stats,
    condition,
    create_segment_destination_for,
    field_violations,
    live_run,
    segmentation_has,
    until_live,
    user,
    writes_held,
)


def seconds(n: float) -> Duration:
    duration = Duration()
    duration.FromTimedelta(timedelta(seconds=n))
    return duration


def live_event(name: str, *where: pb.PropertyCondition) -> campaign_pb.LiveEvent:
    return campaign_pb.LiveEvent(event_name=name, where=list(where))


@dataclass
class Live:
    """An account of its own, a Segment destination, and helpers to act as its users."""

    clients: Clients
    segment_api: SegmentApi
    destination: str
    clock: clock.ManualClock
    tag: str
    database_url: str
    sent: int = 0
    # What CreateCampaign answered for the last campaign made.
    warnings: list[str] = field(default_factory=list)

    async def campaign(
        self,
        trigger: campaign_pb.LiveTrigger,
        *,
        frequency: campaign_pb.LiveFrequency | None = None,
        targeting: campaign_pb.Targeting | None = None,
        audience: campaign_pb.Audience | None = None,
        delivery: campaign_pb.DeliveryPreferences | None = None,
        end_after: timedelta | None = None,
        start_after: timedelta | None = None,
        delay: timedelta | None = None,
        armed: bool = True,
    ) -> campaign_pb.Campaign:
        """Creates and publishes a live campaign; waits until it is `armed` (see until_live)."""
        live = campaign_pb.Live(trigger=trigger, frequency=frequency)
        if end_after is not None:
            live.end_time.FromDatetime(self.clock.now() + end_after)
        if start_after is not None:
            live.start_time.FromDatetime(self.clock.now() + start_after)
        if delay is not None:
            live.delay.FromTimedelta(delay)
        campaign = campaign_pb.Campaign(
            display_name="live",
            audience=audience,
            destination=self.destination,
            schedule=campaign_pb.Schedule(live=live),
            targeting=targeting,
            delivery=delivery,
            segment_export=campaign_pb.SegmentExportContent(event_name=f"Herald live {self.tag}"),
        )
        created = await self.clients.campaigns.CreateCampaign(
            campaign_pb.CreateCampaignRequest(campaign=campaign)
        )
        self.warnings = list(created.warnings)
        published = await self.clients.campaigns.PublishCampaign(
            campaign_pb.PublishCampaignRequest(name=created.name)
        )
        if armed:
            await until_live(self.clients, self.database_url, created.name)
        return published

    async def act(
        self, user_id: str, name: str, at: datetime | None = None, event_id: str = "", **properties: Any
    ) -> None:
        self.sent += 1
        event = pb.Event(
            user_id=user_id,
            name=name,
            client_event_id=event_id or f"{self.tag}-e{self.sent}-{uuid.uuid4().hex[:6]}",
        )
        event.time.FromDatetime(at or self.clock.now())
        event.properties.update(properties)
        await self.clients.segmentation.IngestEvents(pb.IngestEventsRequest(events=[event]))

    def move_to(self, at: datetime) -> None:
        self.clock.advance(at - self.clock.now())

    async def act_all(self, user_ids: list[str], name: str) -> None:
        """Each user does the event once, in one call."""
        batch = []
        for user_id in user_ids:
            self.sent += 1
            event = pb.Event(user_id=user_id, name=name, client_event_id=f"{self.tag}-e{self.sent}")
            event.time.FromDatetime(self.clock.now())
            batch.append(event)
        await self.clients.segmentation.IngestEvents(pb.IngestEventsRequest(events=batch))

    async def wait_for(self, check: Callable[[], bool], within: float = 30) -> None:
        async def holds() -> bool:
            return check()

        await eventually(holds, within=within)

    async def explain(self, name: str, user_id: str) -> campaign_pb.DeliveryExplanation:
        return await self.clients.campaigns.ExplainDelivery(
            campaign_pb.ExplainDeliveryRequest(campaign=name, user_id=user_id)
        )

    async def stats(self, name: str) -> campaign_pb.CampaignStats:
        return await self.clients.campaigns.GetCampaignStats(
            campaign_pb.GetCampaignStatsRequest(name=f"{name}/stats")
        )

    async def wait_for_stats(self, name: str, check: Callable[[campaign_pb.CampaignStats], bool]) -> None:
        async def holds() -> bool:
            return check(await self.stats(name))

        await eventually(holds)

    def received(self) -> list[str]:
        """The users the Segment destination got this account's live events for, in order."""
        return [
            e["userId"]
            for e in self.segment_api.events.values()
            if e.get("event") == f"Herald live {self.tag}"
        ]

    async def settle(self, seconds: float = 1.5) -> None:
        """Gives the pipeline time to act: what has not arrived by then was not sent."""
        await asyncio.sleep(seconds)


@pytest.fixture
async def live(
    platform: Platform, segment_api: SegmentApi, manual_clock: clock.ManualClock
) -> AsyncIterator[Live]:
    tag = uuid.uuid4().hex[:8]
    _, key = await create_account(
        platform.address("campaign"), platform.settings.bootstrap_token, f"live {tag}"
    )
    clients = Clients.open(platform.addresses, key)
    destination = await create_segment_destination_for(clients, segment_api)
    users = [user(f"{tag}-{i}", cohort=tag, plan="gold" if i % 2 else "free") for i in range(6)]
    await clients.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=users))
    yield Live(clients, segment_api, destination.name, manual_clock, tag, platform.settings.database_url)
    await clients.close()


async def test_an_action_with_a_property_filter_sends_once_per_matching_event(live: Live) -> None:
    trigger = campaign_pb.LiveTrigger(
        action=campaign_pb.ActionTrigger(
            event=live_event("Added to Cart", condition("amount", "GREATER_THAN", 100))
        )
    )
    await live.campaign(trigger)
    ana, ben = f"{live.tag}-0", f"{live.tag}-1"
    await live.act(ana, "Added to Cart", amount=250, event_id=f"{live.tag}-cart-1")
    await live.act(ben, "Added to Cart", amount=20)
    await live.act(ben, "Viewed", amount=500)
    await live.wait_for(lambda: live.received() == [ana])
    # The same event again (the client retried), and one past the lateness allowance: nothing.
    await live.act(ana, "Added to Cart", amount=250, event_id=f"{live.tag}-cart-1")
    await live.act(ben, "Added to Cart", at=live.clock.now() - timedelta(minutes=11), amount=900)
    await live.settle()
    assert live.received() == [ana]


async def test_an_action_can_hold_a_property_constant_with_an_earlier_event(live: Live) -> None:
    """ "Added to cart the product they viewed in the last hour": the same product_id on both."""
    trigger = campaign_pb.LiveTrigger(
        action=campaign_pb.ActionTrigger(
            event=live_event("Added to Cart"),
            earlier_event=live_event("Viewed Product", condition("source", "EQUALS", "search")),
            constant_property="product_id",
            within=seconds(3600),
        )
    )
    await live.campaign(trigger)
    same, other, stale, unsearched = (f"{live.tag}-{i}" for i in range(4))
    await live.act(
        stale, "Viewed Product", at=live.clock.now() - timedelta(hours=2), product_id="p1", source="search"
    )
    for who in (same, other):
        await live.act(who, "Viewed Product", product_id="p1", source="search")
    await live.act(unsearched, "Viewed Product", product_id="p1", source="email")
    live.clock.advance(timedelta(minutes=5))
    await live.act(same, "Added to Cart", product_id="p1")
    await live.act(other, "Added to Cart", product_id="p2")
    await live.act(stale, "Added to Cart", product_id="p1")
    await live.act(unsearched, "Added to Cart", product_id="p1")
    await live.wait_for(lambda: live.received() == [same])
    await live.settle()
    assert live.received() == [same]


async def test_a_live_campaign_triggers_from_its_start_and_sends_after_its_delay(live: Live) -> None:
    action = campaign_pb.LiveTrigger(action=campaign_pb.ActionTrigger(event=live_event("Signed Up")))
    await live.campaign(action, start_after=timedelta(hours=1), delay=timedelta(minutes=15))
    early, late = f"{live.tag}-0", f"{live.tag}-1"
    await live.act(early, "Signed Up")  # before the start: nothing, ever
    live.clock.advance(timedelta(hours=1, minutes=1))
    await live.act(late, "Signed Up")
    await live.settle()
    assert live.received() == []  # the delay runs
    live.clock.advance(timedelta(minutes=14))
    await live.settle()
    assert live.received() == []
    live.clock.advance(timedelta(minutes=1, seconds=1))
    await live.wait_for(lambda: live.received() == [late])
    live.clock.advance(timedelta(days=1))
    await live.settle()
    assert live.received() == [late]


async def test_cart_abandonment_sends_when_the_wait_runs_out_unless_that_cart_was_bought(
    live: Live, platform: Platform
) -> None:
    trigger = campaign_pb.LiveTrigger(
        inaction=campaign_pb.InactionTrigger(
            event=live_event("Added to Cart"),
            awaited_event=live_event("Charged"),
            within=seconds(600),
            match_property="cart_id",
        )
    )
    campaign = await live.campaign(trigger)
    abandons, buys, buys_another = (f"{live.tag}-{i}" for i in range(3))
    for who in (abandons, buys, buys_another):
        await live.act(who, "Added to Cart", cart_id=f"cart-{who}")
    live.clock.advance(timedelta(minutes=4))
    await live.act(buys, "Charged", cart_id=f"cart-{buys}")
    await live.act(buys_another, "Charged", cart_id="some-other-cart")
    await live.settle(1)
    # Every service restarts while the waits run: they are rows, not tasks.
    await platform.restart_all()
    await live.settle(1)
    assert live.received() == []
    waiting = await live.explain(campaign.name, abandons)
    assert [(w.event_name, w.fire_time.seconds - w.event_time.seconds) for w in waiting.waits] == [
        ("Added to Cart", 600)
    ]
    assert waiting.decisions[0].decision == campaign_pb.DECISION_PENDING
    assert (await live.explain(campaign.name, buys)).waits == []
    live.clock.advance(timedelta(minutes=6, seconds=1))
    await live.wait_for(lambda: sorted(live.received()) == sorted([abandons, buys_another]))

    async def explained_sent() -> bool:
        sent = await live.explain(campaign.name, abandons)
        return [(d.via, d.decision) for d in sent.live_decisions] == [("timer", campaign_pb.DECISION_SENT)]

    await eventually(explained_sent)  # once dispatch has recorded the Segment's answer
    live.clock.advance(timedelta(minutes=30))
    await live.settle()
    assert sorted(live.received()) == sorted([abandons, buys_another])


async def test_how_often_one_user_may_get_it(live: Live) -> None:
    action = campaign_pb.LiveTrigger(action=campaign_pb.ActionTrigger(event=live_event("Opened App")))
    once = await live.campaign(action, frequency=campaign_pb.LiveFrequency(once=True))
    ana = f"{live.tag}-0"
    for _ in range(3):
        await live.act(ana, "Opened App")
    await live.wait_for(lambda: live.received() == [ana])
    await live.clients.campaigns.StopCampaign(campaign_pb.StopCampaignRequest(name=once.name))
    # Each campaign after the first is published a moment later: an event at the very moment a
    # campaign is published is one it watches, caught up on if it arrived first.
    live.clock.advance(timedelta(seconds=1))
    daily = await live.campaign(action, frequency=campaign_pb.LiveFrequency(at_most_every=seconds(24 * 3600)))
    ben = f"{live.tag}-1"
    await live.act(ben, "Opened App")
    await live.act(ben, "Opened App")
    await live.wait_for(lambda: live.received().count(ben) == 1)
    live.clock.advance(timedelta(hours=23))
    await live.act(ben, "Opened App")
    live.clock.advance(timedelta(hours=1, seconds=1))
    await live.act(ben, "Opened App")
    await live.wait_for(lambda: live.received().count(ben) == 2)
    await live.clients.campaigns.StopCampaign(campaign_pb.StopCampaignRequest(name=daily.name))
    live.clock.advance(timedelta(seconds=1))
    await live.campaign(action, frequency=campaign_pb.LiveFrequency(every_time=True))
    cy = f"{live.tag}-2"
    for _ in range(3):
        await live.act(cy, "Opened App")
    await live.wait_for(lambda: live.received().count(cy) == 3)
    await live.settle()
    assert live.received().count(ana) == 1 and live.received().count(ben) == 2


async def test_explain_delivery_says_what_qualified_each_time_and_what_held_it_back(live: Live) -> None:
    gold = campaign_pb.Audience(
        filter=pb.SegmentFilter(all_of=[pb.Condition(property=condition("plan", "EQUALS", "gold"))])
    )
    action = campaign_pb.LiveTrigger(action=campaign_pb.ActionTrigger(event=live_event("Opened App")))
    created = await live.campaign(action, audience=gold, frequency=campaign_pb.LiveFrequency(once=True))
    free, gold_user, idle = f"{live.tag}-0", f"{live.tag}-1", f"{live.tag}-3"
    await live.act(free, "Opened App")
    await live.act(gold_user, "Opened App", event_id=f"{live.tag}-first")
    await live.wait_for(lambda: live.received() == [gold_user])
    live.clock.advance(timedelta(minutes=1))
    await live.act(gold_user, "Opened App", event_id=f"{live.tag}-second")

    expected = [
        (f"{live.tag}-second", campaign_pb.DECISION_SKIPPED, campaign_pb.RULE_LIVE_FREQUENCY),
        (f"{live.tag}-first", campaign_pb.DECISION_SENT, campaign_pb.RULE_DELIVERED),
    ]

    async def explained_twice() -> bool:
        found = (await live.explain(created.name, gold_user)).live_decisions
        return [(d.client_event_id, d.decision, d.rule) for d in found] == expected

    await eventually(explained_twice)  # once dispatch has recorded the Segment's answer
    twice = await live.explain(created.name, gold_user)
    assert twice.live_decisions[0].reason == "already got this campaign once (frequency: once)"
    outside = await live.explain(created.name, free)
    assert [(d.decision, d.rule) for d in outside.live_decisions] == [
        (campaign_pb.DECISION_NOT_TARGETED, campaign_pb.RULE_AUDIENCE)
    ]
    [never] = (await live.explain(created.name, idle)).decisions
    assert (never.decision, never.rule) == (campaign_pb.DECISION_NOT_TARGETED, campaign_pb.RULE_LIVE_TRIGGER)


async def test_two_scheduler_replicas_fire_each_wait_once(live: Live, platform: Platform) -> None:
    second = await scheduler_main.start(platform.settings, port=0)
    try:
        trigger = campaign_pb.LiveTrigger(
            inaction=campaign_pb.InactionTrigger(
                event=live_event("Added to Cart"), awaited_event=live_event("Charged"), within=seconds(60)
            )
        )
        await live.campaign(trigger)
        waiting = [f"{live.tag}-pair-{i:03}" for i in range(300)]
        await live.act_all(waiting, "Added to Cart")
        await live.settle(1)
        live.clock.advance(timedelta(minutes=2))
        await live.wait_for(lambda: len(live.received()) == 300)
        await live.settle()
        assert sorted(live.received()) == waiting
        assert live.segment_api.duplicated_ids == set()
    finally:
        await second.stop()


async def test_what_users_did_before_segmentation_kept_the_trigger_still_counts(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Segmentation follows CampaignChanged on its own, and here keeps a new cart abandonment
    trigger only after the scheduler went live and the shoppers acted: it then catches up on
    what they did since the campaign was published, a page of two events at a time."""
    monkeypatch.setattr(segmentation_live, "CATCH_UP_PAGE", 2)
    trigger = campaign_pb.LiveTrigger(
        inaction=campaign_pb.InactionTrigger(
            event=live_event("Added to Cart"), awaited_event=live_event("Charged"), within=seconds(60)
        )
    )
    shoppers = [f"{live.tag}-{i}" for i in range(3)]
    async with writes_held(live.database_url, "segmentation.live_triggers"):
        created = await live.campaign(trigger, armed=False)
        await eventually(lambda: live_run(live.clients, created.name))
        await live.act_all(shoppers, "Added to Cart")
        live.clock.advance(timedelta(seconds=1))
        await live.act(shoppers[0], "Charged")
        await live.settle(0.5)
        assert not await segmentation_has(live.database_url, "live_triggers", created.name)
    await until_live(live.clients, live.database_url, created.name)
    await live.settle(1)
    live.clock.advance(timedelta(minutes=2))
    await live.wait_for(lambda: sorted(live.received()) == shoppers[1:])
    await live.settle()
    assert sorted(live.received()) == shoppers[1:]
    assert live.segment_api.duplicated_ids == set()


async def test_matches_that_reach_the_scheduler_before_the_campaign_wait_for_it(live: Live) -> None:
    """The scheduler follows CampaignChanged on its own too, and here makes the live run only
    after segmentation matched the users' events: the matches wait for the run, not dropped."""
    buyers = [f"{live.tag}-{i}" for i in range(4)]
    async with writes_held(live.database_url, "scheduler.campaigns"):
        created = await live.campaign(_action(), armed=False)
        await eventually(lambda: segmentation_has(live.database_url, "live_triggers", created.name, "active"))
        await live.act_all(buyers, "Added to Cart")
        await live.settle(1)  # the matches reached the scheduler, which has no run for them yet
        assert not await live_run(live.clients, created.name)
    await live.wait_for(lambda: sorted(live.received()) == buyers)
    await live.settle()
    assert sorted(live.received()) == buyers
    assert live.segment_api.duplicated_ids == set()


async def test_each_live_message_keeps_to_the_control_group_and_do_not_disturb_hours(live: Live) -> None:
    quiet = campaign_pb.DeliveryPreferences(
        quiet_hours=campaign_pb.QuietHours(
            start="21:00", end="08:00", action=campaign_pb.QuietHoursAction.QUIET_HOURS_ACTION_DELAY
        )
    )
    action = campaign_pb.LiveTrigger(action=campaign_pb.ActionTrigger(event=live_event("Opened App")))
    created = await live.campaign(
        action, delivery=quiet, targeting=campaign_pb.Targeting(control_group_percent=50)
    )
    others = [f"{live.tag}-cg-{i:02}" for i in range(40)]
    control = [u for u in others if in_control_group(created.name, u, 50)]
    assert 5 < len(control) < 35
    # Someone in Tokyo, outside the control group, acting at noon UTC: 21:00 there, quiet hours.
    night_owl = next(
        u for u in (f"{live.tag}-owl-{i}" for i in range(100)) if not in_control_group(created.name, u, 50)
    )
    await live.clients.segmentation.UpsertUsers(
        pb.UpsertUsersRequest(users=[pb.User(user_id=night_owl, timezone="Asia/Tokyo")])
    )
    await live.act_all(others, "Opened App")
    await live.act(night_owl, "Opened App")
    treated = sorted(set(others) - set(control))
    await live.wait_for(lambda: sorted(live.received()) == treated)
    await live.wait_for_stats(created.name, lambda stats: stats.skipped == len(control))
    stats = await live.stats(created.name)
    assert {r.reason: r.count for r in stats.failure_reasons} == {SkipReason.CONTROL_GROUP: len(control)}
    # The message waits for 08:00 in Tokyo (23:00 UTC).
    live.move_to(datetime(2026, 11, 23, 22, 59, tzinfo=UTC))
    await live.settle()
    assert night_owl not in live.received()
    live.move_to(datetime(2026, 11, 23, 23, 0, 30, tzinfo=UTC))
    await live.wait_for(lambda: night_owl in live.received())


async def test_a_total_limit_completes_the_campaign_and_a_daily_limit_resets_each_day(live: Live) -> None:
    users = [user(f"{live.tag}-many-{i:03}") for i in range(120)]
    await live.clients.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=users))
    action = campaign_pb.LiveTrigger(action=campaign_pb.ActionTrigger(event=live_event("Signed Up")))
    total = await live.campaign(action, targeting=campaign_pb.Targeting(total_limit=100))
    await live.act_all([u.user_id for u in users], "Signed Up")
    stats = await completed_stats(live.clients, total.name)
    assert (stats.sent, stats.skipped) == (100, 20)
    assert {r.reason: r.count for r in stats.failure_reasons} == {SkipReason.LIVE_LIMIT: 20}
    await live.act_all([u.user_id for u in users[:5]], "Signed Up")
    await live.settle()
    assert len(live.received()) == 100  # completed: no more

    live.clock.advance(timedelta(seconds=1))  # the Signed Up events above are before it
    daily = await live.campaign(action, targeting=campaign_pb.Targeting(daily_limit=50))
    await live.act_all([u.user_id for u in users[:60]], "Signed Up")
    await live.wait_for(lambda: len(live.received()) == 150)
    live.clock.advance(timedelta(days=1))
    await live.act_all([u.user_id for u in users[60:]], "Signed Up")
    await live.wait_for(lambda: len(live.received()) == 200)
    await live.wait_for_stats(daily.name, lambda stats: stats.sent + stats.skipped == 120)
    await live.settle()
    stats = await live.stats(daily.name)
    assert (stats.sent, stats.skipped) == (100, 20)


async def test_a_date_reminder_goes_two_days_before_at_ten_in_each_users_zone_across_dst(live: Live) -> None:
    new_york, berlin = f"{live.tag}-ny", f"{live.tag}-berlin"
    await live.clients.segmentation.UpsertUsers(
        pb.UpsertUsersRequest(
            users=[
                pb.User(user_id=new_york, timezone="America/New_York"),
                pb.User(user_id=berlin, timezone="Europe/Berlin"),
            ]
        )
    )
    reminder = campaign_pb.DatePropertyTrigger(
        event=live_event("Booked Flight"),
        date_property="travel_date",
        offset=-2,
        unit=campaign_pb.OFFSET_UNIT_DAYS,
        time_of_day="10:00",
    )
    await live.campaign(campaign_pb.LiveTrigger(date_property=reminder))
    # Both reminders fall after the clocks change (New York 14 March 2027, Berlin 28 March) from
    # the booking's winter time: 10:00 is 15:00 UTC in New York (still EST) on 13 March, and
    # 08:00 UTC in Berlin (CEST) on 29 March.
    await live.act(new_york, "Booked Flight", travel_date="2027-03-15T08:00:00-04:00")
    await live.act(berlin, "Booked Flight", travel_date="2027-03-31T07:00:00+02:00")
    await live.settle(1)
    live.move_to(datetime(2027, 3, 13, 14, 59, tzinfo=UTC))
    await live.settle()
    assert live.received() == []
    live.move_to(datetime(2027, 3, 13, 15, 0, 30, tzinfo=UTC))
    await live.wait_for(lambda: live.received() == [new_york])
    live.move_to(datetime(2027, 3, 29, 7, 59, tzinfo=UTC))
    await live.settle()
    assert live.received() == [new_york]
    live.move_to(datetime(2027, 3, 29, 8, 0, 30, tzinfo=UTC))
    await live.wait_for(lambda: live.received() == [new_york, berlin])


async def test_a_date_that_passed_or_is_not_a_date_is_skipped_with_the_reason(live: Live) -> None:
    def reminder(event: str) -> campaign_pb.LiveTrigger:
        dated = campaign_pb.DatePropertyTrigger(
            event=live_event(event),
            date_property="travel_date",
            offset=-3,
            unit=campaign_pb.OFFSET_UNIT_HOURS,
        )
        return campaign_pb.LiveTrigger(date_property=dated)

    flights = await live.campaign(reminder("Booked Flight"))
    soon = (live.clock.now() + timedelta(hours=2)).isoformat()
    await live.act(f"{live.tag}-0", "Booked Flight", travel_date=soon)
    await live.act(f"{live.tag}-1", "Booked Flight")
    # The first train booking ever sent carries no date: the campaign was saved with a warning.
    trains = await live.campaign(reminder("Booked Train"))
    assert live.warnings == [
        "campaign.schedule.live.trigger.date_property.event.event_name: "
        "no 'Booked Train' event has been ingested yet"
    ]
    await live.act(f"{live.tag}-2", "Booked Train", travel_date="next tuesday")
    expected = {
        flights.name: {SkipReason.DATE_PASSED: 1, SkipReason.MALFORMED_DATE: 1},
        trains.name: {SkipReason.MALFORMED_DATE: 1},
    }
    for name, reasons in expected.items():
        skipped = sum(reasons.values())
        await live.wait_for_stats(name, lambda stats, n=skipped: stats.skipped == n)  # type: ignore[misc]
        stats = await live.stats(name)
        assert {r.reason: r.count for r in stats.failure_reasons} == reasons
    assert live.received() == []


async def test_a_live_campaign_completes_at_its_end_time_and_drops_its_waits(live: Live) -> None:
    trigger = campaign_pb.LiveTrigger(
        inaction=campaign_pb.InactionTrigger(
            event=live_event("Added to Cart"), awaited_event=live_event("Charged"), within=seconds(3600)
        )
    )
    created = await live.campaign(trigger, end_after=timedelta(minutes=30))
    await live.act(f"{live.tag}-0", "Added to Cart")  # its wait would run out after the end
    await live.settle(1)
    live.clock.advance(timedelta(minutes=31))
    await completed_stats(live.clients, created.name)
    await live.act(f"{live.tag}-1", "Added to Cart")
    live.clock.advance(timedelta(hours=2))
    await live.settle()
    assert live.received() == []
    assert (await live.explain(created.name, f"{live.tag}-0")).waits == []


async def test_a_stop_cancels_every_pending_wait(live: Live) -> None:
    trigger = campaign_pb.LiveTrigger(
        inaction=campaign_pb.InactionTrigger(
            event=live_event("Added to Cart"), awaited_event=live_event("Charged"), within=seconds(600)
        )
    )
    created = await live.campaign(trigger)
    await live.act_all([f"{live.tag}-wait-{i:04}" for i in range(1000)], "Added to Cart")
    await live.settle(1)
    await live.clients.campaigns.StopCampaign(campaign_pb.StopCampaignRequest(name=created.name))
    live.clock.advance(timedelta(minutes=11))
    await live.settle(2)
    assert live.received() == []


def _with_within(inaction: campaign_pb.InactionTrigger, n: float) -> campaign_pb.InactionTrigger:
    changed = campaign_pb.InactionTrigger()
    changed.CopyFrom(inaction)
    changed.within.CopyFrom(seconds(n))
    return changed


def _action(name: str = "Added to Cart") -> campaign_pb.LiveTrigger:
    return campaign_pb.LiveTrigger(action=campaign_pb.ActionTrigger(event=live_event(name)))


def _with(live: campaign_pb.Live, **changes: Any) -> campaign_pb.Live:
    changed = campaign_pb.Live()
    changed.CopyFrom(live)
    for name, value in changes.items():
        getattr(changed, name).CopyFrom(value)
    return changed


_INACTION = campaign_pb.InactionTrigger(
    event=live_event("Added to Cart"), awaited_event=live_event("Charged")
)
_BAD: list[tuple[str, campaign_pb.Live, campaign_pb.Targeting | None, str]] = [
    ("no trigger", campaign_pb.Live(), None, "campaign.schedule.live.trigger"),
    (
        "a wait under a minute",
        campaign_pb.Live(trigger=campaign_pb.LiveTrigger(inaction=_with_within(_INACTION, 30))),
        None,
        "campaign.schedule.live.trigger.inaction.within",
    ),
    (
        "a wait over 30 days",
        campaign_pb.Live(trigger=campaign_pb.LiveTrigger(inaction=_with_within(_INACTION, 31 * 86400))),
        None,
        "campaign.schedule.live.trigger.inaction.within",
    ),
    (
        "a delay over 30 days",
        campaign_pb.Live(trigger=_action(), delay=seconds(31 * 86400)),
        None,
        "campaign.schedule.live.delay",
    ),
    (
        "an end before the start",
        campaign_pb.Live(
            trigger=_action(),
            start_time=Timestamp(seconds=1_900_000_000),
            end_time=Timestamp(seconds=1_890_000_000),
        ),
        None,
        "campaign.schedule.live.end_time",
    ),
    (
        "a system event Herald does not record",
        campaign_pb.Live(trigger=_action("Geocluster Entered")),
        None,
        "campaign.schedule.live.trigger.action.event.event_name",
    ),
    (
        "a frequency of zero",
        campaign_pb.Live(trigger=_action(), frequency=campaign_pb.LiveFrequency(at_most_every=seconds(0))),
        None,
        "campaign.schedule.live.frequency.at_most_every",
    ),
    (
        "a daily limit under 1",
        campaign_pb.Live(trigger=_action()),
        campaign_pb.Targeting(daily_limit=0),
        "campaign.targeting.daily_limit",
    ),
    (
        "a run's cap",
        campaign_pb.Live(trigger=_action()),
        campaign_pb.Targeting(random_cap=500),
        "campaign.targeting.random_cap",
    ),
    (
        "days without a time of day",
        campaign_pb.Live(
            trigger=campaign_pb.LiveTrigger(
                date_property=campaign_pb.DatePropertyTrigger(
                    event=live_event("Booked Flight"),
                    date_property="travel_date",
                    offset=-2,
                    unit=campaign_pb.OFFSET_UNIT_DAYS,
                )
            )
        ),
        None,
        "campaign.schedule.live.trigger.date_property.time_of_day",
    ),
    (
        "a where test that does not fit the property",
        campaign_pb.Live(
            trigger=campaign_pb.LiveTrigger(
                action=campaign_pb.ActionTrigger(
                    event=live_event("Added to Cart", condition("amount", "GREATER_THAN", "lots"))
                )
            )
        ),
        None,
        "campaign.schedule.live.trigger.action.event.where[0].value",
    ),
]


@pytest.mark.parametrize(
    ("live_schedule", "targeting", "field_name"), [c[1:] for c in _BAD], ids=[c[0] for c in _BAD]
)
async def test_bad_live_settings_are_refused_naming_the_field(
    live: Live, live_schedule: campaign_pb.Live, targeting: campaign_pb.Targeting | None, field_name: str
) -> None:
    await live.act(f"{live.tag}-0", "Added to Cart", amount=12.5)  # amount is a number from now on
    before = await live.clients.campaigns.ListCampaigns(campaign_pb.ListCampaignsRequest())
    campaign = campaign_pb.Campaign(
        display_name="bad",
        destination=live.destination,
        schedule=campaign_pb.Schedule(live=live_schedule),
        targeting=targeting,
        segment_export=campaign_pb.SegmentExportContent(event_name="x"),
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await live.clients.campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=campaign))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_name in field_violations(refused.value)
    after = await live.clients.campaigns.ListCampaigns(campaign_pb.ListCampaignsRequest())
    assert len(after.campaigns) == len(before.campaigns)


async def test_a_date_trigger_on_a_property_that_is_not_a_date_is_refused(live: Live) -> None:
    await live.act(f"{live.tag}-0", "Booked Flight", travel_date="soon", seat="12A")
    dated = campaign_pb.DatePropertyTrigger(
        event=live_event("Booked Flight"),
        date_property="travel_date",
        offset=1,
        unit=campaign_pb.OFFSET_UNIT_HOURS,
    )
    campaign = campaign_pb.Campaign(
        display_name="reminder",
        destination=live.destination,
        schedule=campaign_pb.Schedule(
            live=campaign_pb.Live(trigger=campaign_pb.LiveTrigger(date_property=dated))
        ),
        segment_export=campaign_pb.SegmentExportContent(event_name="x"),
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await live.clients.campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=campaign))
    assert field_violations(refused.value) == {
        "campaign.schedule.live.trigger.date_property.date_property": (
            "'Booked Flight' events carry 'travel_date' as a string, not an RFC 3339 date-time"
        )
    }
