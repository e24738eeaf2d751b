"""Who of a qualified audience a campaign reaches: a control group stable across runs, a random
cap with its seed recorded, and a safety limit that stops a run and raises an alert."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import grpc
import pytest
from aiohttp import web
from nats.js import JetStreamContext

from herald.accounts.v1 import account_service_pb2 as accounts_pb
from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.events.v1 import events_pb2
from herald.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_common import clock
from herald_common.bus import Subjects
from herald_sandbox import LocalServer
from herald_sandbox.segment_api import SegmentApi
from tests.conftest import CLOCK_START, Platform, eventually
from tests.harness import Clients, create_account
from tests.helpers import (
    condition,
    create_segment,
    create_segment_destination_for,
    field_violations,
    last_message,
    segment_export_campaign,
    user,
)


async def _campaign(
    platform: Platform, segment_api: SegmentApi, users: int, targeting: campaign_pb.Targeting, days: int = 1
) -> tuple[str, str]:
    """A daily campaign (for `days` days from tomorrow 09:00 UTC) to `users` users; (name, tag)."""
    tag = uuid.uuid4().hex[:8]
    for start in range(0, users, 1000):
        batch = [user(f"{tag}-{i:04d}", cohort=tag) for i in range(start, min(start + 1000, users))]
        await platform.segmentation.UpsertUsers(pb.UpsertUsersRequest(users=batch))
    segment = await create_segment(platform, condition("cohort", "EQUALS", tag))
    destination = await create_segment_destination_for(platform, segment_api)
    daily = campaign_pb.Recurring(
        daily=campaign_pb.EveryNDays(every=1), time_of_day="09:00", start_date="2026-11-24", occurrences=days
    )
    campaign = segment_export_campaign(
        segment.name, destination.name, schedule=campaign_pb.Schedule(recurring=daily), targeting=targeting
    )
    created = await platform.campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=campaign))
    await platform.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    return created.name, tag


async def _runs(platform: Platform, name: str) -> list[scheduler_pb.Run]:
    return list((await platform.scheduler.ListRuns(scheduler_pb.ListRunsRequest(parent=name))).runs)


def _received_by_day(segment_api: SegmentApi, tag: str) -> dict[str, set[str]]:
    """Users who received the export, by the day of the event."""
    days: dict[str, set[str]] = {}
    for event in segment_api.events.values():
        if event["userId"].startswith(tag):
            days.setdefault(event["timestamp"][:10], set()).add(event["userId"])
    return days


async def _run_day(platform: Platform, manual_clock: clock.ManualClock, name: str, n: int) -> None:
    """Moves the clock to the n-th 09:00 and waits for that run to end."""

    async def planned() -> bool:
        return len(await _runs(platform, name)) >= n

    await eventually(planned)
    manual_clock.advance(CLOCK_START.replace(hour=9) + timedelta(days=n, seconds=1) - manual_clock.now())

    async def ended() -> bool:
        runs = await _runs(platform, name)
        return runs[n - 1].state in (scheduler_pb.RUN_STATE_DISPATCHED, scheduler_pb.RUN_STATE_FAILED)

    await eventually(ended)


async def _settled(platform: Platform, name: str, outcomes: int) -> campaign_pb.CampaignStats:
    async def counted() -> campaign_pb.CampaignStats | None:
        stats = await platform.campaigns.GetCampaignStats(
            campaign_pb.GetCampaignStatsRequest(name=f"{name}/stats")
        )
        return stats if stats.sent + stats.skipped + stats.failed >= outcomes else None

    await eventually(counted)
    stats = await counted()
    assert stats is not None
    return stats


async def test_a_control_group_is_held_back_and_stays_the_same_across_runs(
    platform: Platform, segment_api: SegmentApi, manual_clock: clock.ManualClock
) -> None:
    name, tag = await _campaign(
        platform, segment_api, 1000, campaign_pb.Targeting(control_group_percent=10), days=3
    )
    for n in (1, 2, 3):
        await _run_day(platform, manual_clock, name, n)
    stats = await _settled(platform, name, 3000)
    reasons = {r.reason: r.count for r in stats.failure_reasons}
    held = reasons["control group"]
    assert 3 * 70 <= held <= 3 * 130  # about 10% of 1,000, three times
    assert (stats.sent + held, stats.failed) == (3000, 0)
    days = _received_by_day(segment_api, tag)
    assert len(days) == 3
    first, *others = days.values()
    assert all(day == first for day in others)  # the same users every run
    assert len(first) == 1000 - held // 3

    async def explain(user_id: str) -> list[tuple[int, int]]:
        request = campaign_pb.ExplainDeliveryRequest(campaign=name, user_id=user_id)
        found = await platform.campaigns.ExplainDelivery(request)
        return [(d.decision, d.rule) for d in found.decisions]

    async def completed() -> bool:
        got = await platform.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=name))
        return got.state == campaign_pb.State.STATE_COMPLETED

    await eventually(completed)  # from now on, no result means not targeted
    control_user = next(f"{tag}-{i:04d}" for i in range(1000) if f"{tag}-{i:04d}" not in first)
    assert await explain(control_user) == [(campaign_pb.DECISION_SKIPPED, campaign_pb.RULE_CONTROL_GROUP)] * 3
    assert await explain(sorted(first)[0]) == [(campaign_pb.DECISION_SENT, campaign_pb.RULE_DELIVERED)] * 3
    assert (
        await explain("someone-else") == [(campaign_pb.DECISION_NOT_TARGETED, campaign_pb.RULE_AUDIENCE)] * 3
    )


async def test_a_random_cap_sends_to_exactly_n_chosen_by_a_recorded_seed(
    platform: Platform, segment_api: SegmentApi, manual_clock: clock.ManualClock
) -> None:
    name, tag = await _campaign(platform, segment_api, 1000, campaign_pb.Targeting(random_cap=100), days=2)
    for n in (1, 2):
        await _run_day(platform, manual_clock, name, n)
    stats = await _settled(platform, name, 2000)
    # Everyone the runs considered is recorded: the hundred drawn sent, the rest left out.
    assert (stats.sent, stats.skipped) == (200, 1800)
    assert {r.reason: r.count for r in stats.failure_reasons} == {"left out by the random cap": 1800}
    days = list(_received_by_day(segment_api, tag).values())
    assert [len(d) for d in days] == [100, 100]
    assert days[0] != days[1]  # each run draws anew
    runs = await _runs(platform, name)
    assert [r.targeted for r in runs] == [1000, 1000]
    assert all(r.sample_seed for r in runs) and runs[0].sample_seed != runs[1].sample_seed
    # Spread over the audience, not the first hundred by id.
    assert max(Counter(int(u.split("-")[1]) // 250 for u in days[0]).values()) <= 50


@pytest.fixture
async def alert_webhook(platform: Platform) -> AsyncIterator[list[tuple[dict[str, Any], str]]]:
    """A webhook the account's alerts go to: what it received, (JSON body, Idempotency-Key)."""
    received: list[tuple[dict[str, Any], str]] = []

    async def receive(request: web.Request) -> web.Response:
        received.append((await request.json(), request.headers.get("Idempotency-Key", "")))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/alerts", receive)
    server = LocalServer()
    url = await server.serve(app)
    settings = accounts_pb.AccountSettings(alert_webhook_url=f"{url}/alerts")
    await platform.accounts.UpdateAccountSettings(accounts_pb.UpdateAccountSettingsRequest(settings=settings))
    yield received
    await platform.accounts.UpdateAccountSettings(accounts_pb.UpdateAccountSettingsRequest())
    await server.stop()


async def test_a_safety_limit_stops_the_run_and_raises_an_alert(
    platform: Platform,
    segment_api: SegmentApi,
    manual_clock: clock.ManualClock,
    js: JetStreamContext,
    alert_webhook: list[tuple[dict[str, Any], str]],
) -> None:
    name, tag = await _campaign(platform, segment_api, 150, campaign_pb.Targeting(safety_limit=100))
    await _run_day(platform, manual_clock, name, 1)
    [run] = await _runs(platform, name)
    assert run.state == scheduler_pb.RUN_STATE_FAILED
    assert "150 users qualify and the limit is 100" in run.error

    async def failed() -> campaign_pb.Campaign | None:
        got = await platform.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=name))
        return got if got.state == campaign_pb.State.STATE_FAILED else None

    await eventually(failed)
    campaign = await failed()
    assert campaign is not None and "safety limit" in campaign.failure_reason
    assert _received_by_day(segment_api, tag) == {}
    subjects = Subjects(platform.settings.namespace)

    async def alerted() -> events_pb2.CampaignAlert | None:
        last = await last_message(js, subjects.stream("scheduler"), subjects.campaign_alert(platform.account))
        if last is None:
            return None
        alert = events_pb2.CampaignAlert.FromString(last.data or b"")
        return alert if alert.campaign == name else None

    await eventually(alerted)
    alert = await alerted()
    assert alert is not None and (alert.run, alert.account) == (run.name, platform.account)
    assert "safety limit" in alert.reason

    # The account's alert webhook got it too, once, keyed by the alert's id.
    async def posted() -> bool:
        return any(body.get("campaign") == name for body, _ in alert_webhook)

    await eventually(posted)
    [(body, key)] = [(b, k) for b, k in alert_webhook if b.get("campaign") == name]
    assert (body["type"], body["run"], key) == ("campaign.alert", run.name, alert.event_id)
    assert "safety limit" in body["reason"]


@pytest.mark.parametrize(
    ("targeting", "field"),
    [
        (campaign_pb.Targeting(control_group_percent=95), "campaign.targeting.control_group_percent"),
        (campaign_pb.Targeting(control_group_percent=-1), "campaign.targeting.control_group_percent"),
        (campaign_pb.Targeting(random_cap=99), "campaign.targeting.random_cap"),
        (campaign_pb.Targeting(safety_limit=50), "campaign.targeting.safety_limit"),
    ],
)
async def test_bad_targeting_names_the_field(
    platform: Platform, segment_api: SegmentApi, targeting: campaign_pb.Targeting, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _campaign(platform, segment_api, 1, targeting)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(raised.value)


async def test_a_dead_alert_webhook_delays_only_its_own_accounts_alerts(
    platform: Platform, js: JetStreamContext
) -> None:
    """Account A's webhook hangs; account B's alert still arrives at once, and only once."""
    received: dict[str, list[str]] = {"hanging": [], "healthy": []}

    def webhook(owner: str, hang: bool) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def receive(request: web.Request) -> web.Response:
            received[owner].append(request.headers.get("Idempotency-Key", ""))
            if hang:
                await asyncio.sleep(30)
            return web.Response(status=204)

        return receive

    app = web.Application()
    app.router.add_post("/hanging", webhook("hanging", hang=True))
    app.router.add_post("/healthy", webhook("healthy", hang=False))
    server = LocalServer()
    url = await server.serve(app)
    accounts = {}
    try:
        for owner in ("hanging", "healthy"):
            account, key = await create_account(
                platform.address("campaign"), platform.settings.bootstrap_token
            )
            clients = Clients.open(platform.addresses, key)
            settings = accounts_pb.AccountSettings(alert_webhook_url=f"{url}/{owner}")
            await clients.accounts.UpdateAccountSettings(
                accounts_pb.UpdateAccountSettingsRequest(settings=settings)
            )
            await clients.close()
            accounts[owner] = account
        subjects = Subjects(platform.settings.namespace)
        for owner, count in (("hanging", 20), ("healthy", 1)):
            for i in range(count):
                alert = events_pb2.CampaignAlert(
                    event_id=str(uuid.uuid4()),
                    account=accounts[owner],
                    campaign=f"campaigns/{uuid.uuid4()}",
                    run=f"campaigns/x/runs/{i}",
                    reason="safety limit",
                )
                await js.publish(
                    subjects.campaign_alert(accounts[owner]),
                    alert.SerializeToString(),
                    headers={"Nats-Msg-Id": alert.event_id},
                )
        started = asyncio.get_running_loop().time()

        async def healthy_alerted() -> bool:
            return bool(received["healthy"])

        await eventually(healthy_alerted, within=8)  # before the hanging webhook's 10 s timeout
        assert asyncio.get_running_loop().time() - started < 8
        await asyncio.sleep(1)
        assert len(received["healthy"]) == 1  # sent once, whatever happens to the other account
        assert len(received["hanging"]) == 1  # the other account waits on its own webhook, one at a time
    finally:
        await server.stop()
