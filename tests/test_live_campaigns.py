"""Live campaigns end to end, through the public API on the manual clock: users get the message
as they act (an action), when they fail to act in time (an inaction) or as a date draws near,
once per trigger occurrence, within the campaign's frequency and limits."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf.duration_pb2 import Duration

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_common import clock
from tests.conftest import Platform, eventually
from tests.fakes.segment_api import SegmentApi
from tests.harness import Clients, create_account
from tests.helpers import condition, create_segment_destination, user


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
    sent: int = 0

    async def campaign(
        self,
        trigger: campaign_pb.LiveTrigger,
        *,
        frequency: campaign_pb.LiveFrequency | None = None,
        targeting: campaign_pb.Targeting | None = None,
        audience: campaign_pb.Audience | None = None,
        delivery: campaign_pb.DeliveryPreferences | None = None,
        end_after: timedelta | None = None,
    ) -> campaign_pb.Campaign:
        live = campaign_pb.Live(trigger=trigger, frequency=frequency)
        if end_after is not None:
            live.end_time.FromDatetime(self.clock.now() + end_after)
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
        published = await self.clients.campaigns.PublishCampaign(
            campaign_pb.PublishCampaignRequest(name=created.name)
        )

        async def live_run() -> bool:
            runs = await self.clients.scheduler.ListRuns(scheduler_pb.ListRunsRequest(parent=created.name))
            return any(r.state == scheduler_pb.RunState.RUN_STATE_LIVE for r in runs.runs)

        await eventually(live_run, within=10)
        await asyncio.sleep(0.3)  # segmentation has the trigger too (it follows the same event)
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

    def received(self, campaign: campaign_pb.Campaign | None = None) -> list[str]:
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
    destination = await create_segment_destination(
        clients, segment_api.url, next(iter(segment_api.write_keys))
    )
    users = [user(f"{tag}-{i}", cohort=tag, plan="gold" if i % 2 else "free") for i in range(6)]
    await clients.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=users))
    yield Live(clients, segment_api, destination.name, manual_clock, tag)
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
    await eventually(lambda: _async(live.received() == [ana]))
    # The same event again (the client retried), and one past the lateness allowance: nothing.
    await live.act(ana, "Added to Cart", amount=250, event_id=f"{live.tag}-cart-1")
    await live.act(ben, "Added to Cart", at=live.clock.now() - timedelta(minutes=11), amount=900)
    await live.settle()
    assert live.received() == [ana]


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
    await live.campaign(trigger)
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
    live.clock.advance(timedelta(minutes=6, seconds=1))
    await eventually(lambda: _async(sorted(live.received()) == sorted([abandons, buys_another])))
    live.clock.advance(timedelta(minutes=30))
    await live.settle()
    assert sorted(live.received()) == sorted([abandons, buys_another])


async def test_how_often_one_user_may_get_it(live: Live) -> None:
    action = campaign_pb.LiveTrigger(action=campaign_pb.ActionTrigger(event=live_event("Opened App")))
    once = await live.campaign(action, frequency=campaign_pb.LiveFrequency(once=True))
    ana = f"{live.tag}-0"
    for _ in range(3):
        await live.act(ana, "Opened App")
    await eventually(lambda: _async(live.received() == [ana]))
    await live.clients.campaigns.StopCampaign(campaign_pb.StopCampaignRequest(name=once.name))
    daily = await live.campaign(action, frequency=campaign_pb.LiveFrequency(at_most_every=seconds(24 * 3600)))
    ben = f"{live.tag}-1"
    await live.act(ben, "Opened App")
    await live.act(ben, "Opened App")
    await eventually(lambda: _async(live.received().count(ben) == 1))
    live.clock.advance(timedelta(hours=23))
    await live.act(ben, "Opened App")
    live.clock.advance(timedelta(hours=1, seconds=1))
    await live.act(ben, "Opened App")
    await eventually(lambda: _async(live.received().count(ben) == 2))
    await live.clients.campaigns.StopCampaign(campaign_pb.StopCampaignRequest(name=daily.name))
    await live.campaign(action, frequency=campaign_pb.LiveFrequency(every_time=True))
    cy = f"{live.tag}-2"
    for _ in range(3):
        await live.act(cy, "Opened App")
    await eventually(lambda: _async(live.received().count(cy) == 3))
    await live.settle()
    assert live.received().count(ana) == 1 and live.received().count(ben) == 2


async def _async(value: bool) -> bool:
    return value


__all__ = ["UTC"]
