"""Web Exit Intent pop-ups through the web SDK's HTTP API (the browser itself is driven in
test_web_sdk_browser.py): visitors qualify by page count, visit, referral or action, see the pop-up
rendered for them, and what they do with it becomes the campaign's stats and system events."""

from __future__ import annotations

import asyncio
import gzip
import uuid
from dataclasses import replace
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from herald.accounts.v1 import account_service_pb2 as accounts_pb
from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from herald.segmentation.v1 import segmentation_service_pb2 as pb
from herald_common import api, clock
from herald_common.settings import Settings
from herald_common.timing import in_control_group
from tests.conftest import Platform, eventually
from tests.harness import running_platform
from tests.helpers import condition, field_violations, until_goal_matched, user
from tests.web_site import WebSite, by_language, page_count, popup_message, signature, web_site


@pytest.fixture
async def site(platform: Platform) -> Any:
    async with web_site(platform) as made:
        yield made


def _single(title: str = "Wait!", **button: Any) -> campaign_pb.WebPopupContent:
    return campaign_pb.WebPopupContent(message=popup_message(title, "10% off today", **button))


async def _shown(site: WebSite, visitor: str, session: str, **extra: Any) -> list[dict[str, Any]]:
    """The pop-ups the visitor gets, once the pipeline delivered what their pages qualified them for."""
    found: list[dict[str, Any]] = []

    async def check() -> bool:
        found[:] = await site.popups(visitor, session, **extra)
        return bool(found)

    await eventually(check, within=20)
    return found


async def _saw(site: WebSite, visitor: str, session: str, popup: dict[str, Any]) -> None:
    """The visitor's page reports the pop-up shown."""
    viewed = {
        "user_id": visitor,
        "session_id": session,
        "delivery_id": popup["delivery_id"],
        "kind": "viewed",
    }
    assert (await site.call("interactions", viewed)).status == 200


async def _stats(site: WebSite, name: str) -> campaign_pb.CampaignStats:
    return await site.admin.campaigns.GetCampaignStats(
        campaign_pb.GetCampaignStatsRequest(name=f"{name}/stats")
    )


async def test_a_page_count_pop_up_shows_to_the_visitor_and_counts_what_they_do(site: WebSite) -> None:
    content = campaign_pb.WebPopupContent(
        message=popup_message(
            "Hi {{ profile.first_name | default: 'there' }}",
            "Your cart misses you",
            text="Back to cart",
            open_link=campaign_pb.OpenLink(url="https://shop.example.com/cart", new_tab=True),
        )
    )
    campaign = await site.campaign(page_count(3), content)
    reader, browser = f"anon:{uuid.uuid4().hex}", f"anon:{uuid.uuid4().hex}"
    await site.view_pages(browser, "s1", 1)
    await site.view_pages(reader, "s2", 3)

    popup = (await _shown(site, reader, "s2"))[0]
    assert popup["title"] == "Hi there" and popup["body"] == "Your cart misses you"
    assert popup["button"] == {
        "text": "Back to cart",
        "action": "open_link",
        "url": "https://shop.example.com/cart",
        "new_tab": True,
    }
    assert popup["campaign"] == campaign.name
    # One page is not three: the other visitor has none (the reader's arrived after theirs).
    assert await site.popups(browser, "s1") == []

    for kind in ("viewed", "clicked"):
        answer = await site.call(
            "interactions",
            {"user_id": reader, "session_id": "s2", "delivery_id": popup["delivery_id"], "kind": kind},
        )
        assert answer.status == 200, answer.body
    # A view takes it out of the inbox; a second report of a click counts once.
    assert await site.popups(reader, "s2") == []
    await site.call(
        "interactions",
        {"user_id": reader, "session_id": "s2", "delivery_id": popup["delivery_id"], "kind": "clicked"},
    )

    async def counted() -> bool:
        stats = await _stats(site, campaign.name)
        return stats.popups.viewed == 1 and stats.popups.clicked == 1 and stats.sent == 1

    await eventually(counted)
    # The run the pop-up went out in counts them too.
    (run,) = (await site.admin.scheduler.ListRuns(scheduler_pb.ListRunsRequest(parent=campaign.name))).runs
    run_stats = await _stats(site, run.name)
    assert (run_stats.sent, run_stats.popups.viewed, run_stats.popups.clicked) == (1, 1, 1)
    # Notification Viewed and Clicked are the visitor's events, which triggers and goals can use.
    for name in ("Notification Viewed", "Notification Clicked"):

        async def recorded(name: str = name) -> bool:
            described = await site.admin.segmentation.DescribeEvent(pb.DescribeEventRequest(event_name=name))
            return described.seen

        await eventually(recorded)
    # Someone else cannot report on that pop-up.
    stranger = await site.call(
        "interactions",
        {
            "user_id": f"anon:{uuid.uuid4().hex}",
            "session_id": "x",
            "delivery_id": popup["delivery_id"],
            "kind": "clicked",
        },
    )
    assert stranger.status == 400 and stranger.body["field"] == "delivery_id"


async def test_visit_and_referral_triggers_fire_only_for_matching_pages(site: WebSite) -> None:
    visit = campaign_pb.LiveTrigger(
        page=campaign_pb.PageTrigger(
            visit=campaign_pb.UrlTest(
                match=campaign_pb.URL_MATCH_PATTERN, value="https://shop.example.com/*/checkout*"
            )
        )
    )
    utm = campaign_pb.LiveTrigger(page=campaign_pb.PageTrigger(utm_source="Newsletter"))
    checkout = await site.campaign(visit, _single("Checkout help"))
    newsletter = await site.campaign(utm, _single("Welcome, reader"))
    buyer, reader, other = (f"anon:{uuid.uuid4().hex}" for _ in range(3))
    await site.view_pages(other, "o", 1, url="https://shop.example.com/shoes/cart", utm_source="ads")
    await site.view_pages(reader, "r", 1, url="https://shop.example.com/", utm_source="newsletter")
    await site.view_pages(buyer, "b", 1, url="https://shop.example.com/shoes/checkout?step=2")

    assert [p["campaign"] for p in await _shown(site, buyer, "b")] == [checkout.name]
    # A page visit's pop-up shows on such pages, not on the next page the visitor goes to.
    elsewhere = await site.popups(buyer, "b", url="https://shop.example.com/about")
    assert elsewhere == []
    back = await site.popups(buyer, "b", url="https://shop.example.com/shoes/checkout")
    assert [p["campaign"] for p in back] == [checkout.name]
    assert [p["campaign"] for p in await _shown(site, reader, "r")] == [newsletter.name]
    assert await site.popups(other, "o") == []


async def test_a_by_user_property_pop_up_shows_each_visitor_their_variant(site: WebSite) -> None:
    content = by_language()
    campaign = await site.campaign(page_count(1), content)
    people = {"de": "anna", "fr": "zoe", "": "sam"}
    await site.admin.segmentation.UpsertUsers(
        pb.UpsertUsersRequest(
            users=[user(f"{name}-{campaign.name[-6:]}", language=lang) for lang, name in people.items()]
        )
    )
    preview = await site.admin.campaigns.PreviewMessage(
        campaign_pb.PreviewMessageRequest(web_popup=content, user_id=f"zoe-{campaign.name[-6:]}")
    )
    assert [(v.variant, v.title) for v in preview.popups] == [
        ("", "Hello"),
        ("de", "Hallo"),
        ("fr", "Bonjour"),
    ]
    assert preview.chosen_variant == "fr"
    for lang, name in people.items():
        visitor = f"{name}-{campaign.name[-6:]}"
        await site.view_pages(visitor, "s", 1)
        signed = {"user_signature": signature(site.identity_secret, visitor)}
        shown = await _shown(site, visitor, "s", **signed)
        assert shown[0]["title"] == {"de": "Hallo", "fr": "Bonjour", "": "Hello"}[lang]


async def test_a_control_visitor_sees_nothing_and_once_per_session_holds(site: WebSite) -> None:
    campaign = await site.campaign(
        page_count(1), _single(), targeting=campaign_pb.Targeting(control_group_percent=50)
    )
    held: list[str] = []
    shown: list[str] = []
    while len(held) < 5 or len(shown) < 5:  # random visitors, enough of each kind
        visitor = f"anon:{uuid.uuid4().hex}"
        (held if in_control_group(campaign.name, visitor, 50) else shown).append(visitor)
    visitors = held + shown
    for visitor in visitors:
        await site.view_pages(visitor, "s", 1)
    popup = (await _shown(site, shown[0], "s"))[0]
    await site.call(
        "interactions",
        {"user_id": shown[0], "session_id": "s", "delivery_id": popup["delivery_id"], "kind": "viewed"},
    )
    # Qualifying again in the same session shows nothing more; a new session may.
    await site.view_pages(shown[0], "s", 1)
    await asyncio.sleep(1.5)
    assert await site.popups(shown[0], "s") == []
    assert await _shown(site, shown[0], "s-next")
    for visitor in shown[1:]:
        await _shown(site, visitor, "s")
    for visitor in held:
        assert await site.popups(visitor, "s") == []

    async def recorded() -> bool:
        stats = await _stats(site, campaign.name)
        return stats.skipped >= len(held)

    await eventually(recorded)


async def test_a_stopped_campaigns_pop_ups_are_not_shown(site: WebSite) -> None:
    campaign = await site.campaign(page_count(1), _single())
    visitor = f"anon:{uuid.uuid4().hex}"
    await site.view_pages(visitor, "s", 1)
    await _shown(site, visitor, "s")
    await site.admin.campaigns.StopCampaign(campaign_pb.StopCampaignRequest(name=campaign.name))

    async def hidden() -> bool:
        return await site.popups(visitor, "s") == []

    await eventually(hidden, within=5)


async def test_identify_merges_the_anonymous_visitor_into_the_user(site: WebSite) -> None:
    anonymous, user_id = f"anon:{uuid.uuid4().hex}", f"user-{uuid.uuid4().hex[:8]}"
    answer = await site.call(
        "events",
        {
            "events": [
                {
                    "user_id": anonymous,
                    "name": "herald.profile",
                    "client_event_id": "p1",
                    "properties": {"shoe_size": 42},
                }
            ]
        },
    )
    assert answer.status == 200, answer.body
    await site.view_pages(anonymous, "s", 2)
    refused = await site.call(
        "identify", {"anonymous_id": anonymous, "user_id": user_id, "user_signature": "0" * 64}
    )
    assert refused.status == 400 and "signature" in refused.body["error"]
    signed = signature(site.identity_secret, user_id)
    merged = await site.call(
        "identify", {"anonymous_id": anonymous, "user_id": user_id, "user_signature": signed}
    )
    assert merged.status == 200 and merged.body["moved_events"] == 3, merged.body
    again = await site.call(
        "identify", {"anonymous_id": anonymous, "user_id": user_id, "user_signature": signed}
    )
    assert again.body == {"moved_events": 0, "already_merged": True}
    # A batch the SDK had not sent yet, under the anonymous id, is the user's too.
    await site.view_pages(anonymous, "s", 1)
    found = await site.admin.segmentation.GetUser(pb.GetUserRequest(name=f"users/{user_id}"))
    assert dict(found.properties)["shoe_size"] == 42
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await site.admin.segmentation.GetUser(pb.GetUserRequest(name=f"users/{anonymous}"))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    seen = await site.admin.segmentation.EstimateReach(
        pb.EstimateReachRequest(
            audience=pb.Audience(
                filter=pb.SegmentFilter(
                    all_of=[
                        pb.Condition(
                            event=pb.EventCondition(
                                event_name="Page Viewed",
                                count=pb.CountCondition(operator=pb.OPERATOR_GREATER_THAN_OR_EQUAL, value=3),
                            ),
                        )
                    ]
                )
            )
        )
    )
    assert seen.user_count == 1
    # An identified visitor's pop-ups are theirs alone: asking without the signature is refused.
    unsigned = await site.call("popups", {"user_id": user_id, "session_id": "s"})
    assert unsigned.status == 400 and unsigned.body["field"] == "user_signature"


async def _pop_up_with_a_charged_goal(site: WebSite) -> campaign_pb.Campaign:
    """A one-page pop-up campaign whose goal is "Charged" within 24 hours, its goal in force."""
    window = Duration()
    window.FromTimedelta(timedelta(hours=24))
    goal = campaign_pb.Goal(event=campaign_pb.LiveEvent(event_name="Charged"), conversion_window=window)
    campaign = await site.campaign(page_count(1), _single(), goal=goal)
    await until_goal_matched(site.platform.settings.database_url, campaign.name)
    return campaign


async def test_a_purchase_recorded_before_the_sign_in_is_heard_of_still_converts(site: WebSite) -> None:
    """The user buys before the campaign service hears of the merge: the purchase waits for an
    exposure of the user's, and the merge brings it the visitor's."""
    campaign = await _pop_up_with_a_charged_goal(site)
    anonymous, user_id = f"anon:{uuid.uuid4().hex}", f"user-{uuid.uuid4().hex[:8]}"
    await site.view_pages(anonymous, "s", 1)
    await _shown(site, anonymous, "s")

    async def exposed() -> bool:
        return (await _stats(site, campaign.name)).goal.sent == 1

    await eventually(exposed)
    await site.admin.segmentation.IngestEvents(
        pb.IngestEventsRequest(events=[pb.Event(user_id=user_id, name="Charged", client_event_id="order-1")])
    )

    async def waiting() -> bool:
        connection = await asyncpg.connect(site.platform.settings.database_url)
        try:
            found = await connection.fetchval(
                "SELECT count(*) FROM campaign.waiting_goal_events WHERE user_id = $1", user_id
            )
        finally:
            await connection.close()
        return bool(found)

    await eventually(waiting)
    assert (await _stats(site, campaign.name)).goal.converted == 0
    signed = signature(site.identity_secret, user_id)
    merged = await site.call(
        "identify", {"anonymous_id": anonymous, "user_id": user_id, "user_signature": signed}
    )
    assert merged.status == 200, merged.body

    async def converted() -> bool:
        return (await _stats(site, campaign.name)).goal.converted == 1

    await eventually(converted)


async def test_a_visitor_who_signs_in_keeps_their_pop_up_conversion_and_active_hours(site: WebSite) -> None:
    campaign = await _pop_up_with_a_charged_goal(site)
    anonymous, user_id = f"anon:{uuid.uuid4().hex}", f"user-{uuid.uuid4().hex[:8]}"
    hours = {api.utcnow().hour}
    await site.view_pages(anonymous, "s", 1)
    hours.add(api.utcnow().hour)
    await _shown(site, anonymous, "s")

    async def exposed() -> bool:
        return (await _stats(site, campaign.name)).goal.sent == 1

    await eventually(exposed)
    signed = signature(site.identity_secret, user_id)
    merged = await site.call(
        "identify", {"anonymous_id": anonymous, "user_id": user_id, "user_signature": signed}
    )
    assert merged.status == 200, merged.body
    # The user buys: the pop-up they saw before signing in converts.
    await site.admin.segmentation.IngestEvents(
        pb.IngestEventsRequest(events=[pb.Event(user_id=user_id, name="Charged", client_event_id="order-1")])
    )

    async def converted() -> bool:
        return (await _stats(site, campaign.name)).goal.converted == 1

    await eventually(converted)
    # And the hour of the visitor's page view is the user's best hour (Best Time).
    (member,) = (
        await site.admin.segmentation.MatchUsers(
            pb.MatchUsersRequest(user_ids=[user_id], with_best_hour=True)
        )
    ).members
    assert member.best_hour_utc in hours and member.best_hour_count == 1


async def test_bad_pop_up_campaigns_are_refused_naming_the_field(site: WebSite) -> None:
    good = _single()
    cases: list[tuple[campaign_pb.LiveTrigger, campaign_pb.WebPopupContent, str]] = [
        (
            campaign_pb.LiveTrigger(
                page=campaign_pb.PageTrigger(visit=campaign_pb.UrlTest(match=campaign_pb.URL_MATCH_PATTERN))
            ),
            good,
            "campaign.schedule.live.trigger.page.visit.value",
        ),
        (
            campaign_pb.LiveTrigger(
                page=campaign_pb.PageTrigger(visit=campaign_pb.UrlTest(value="https://x/\x01"))
            ),
            good,
            "campaign.schedule.live.trigger.page.visit.match",
        ),
        (campaign_pb.LiveTrigger(), good, "campaign.schedule.live.trigger"),
        (
            campaign_pb.LiveTrigger(page=campaign_pb.PageTrigger(page_count=0)),
            good,
            "campaign.schedule.live.trigger.page.page_count",
        ),
        (page_count(1), _single(text="Go"), "campaign.web_popup.message.button.call_function"),
        (
            page_count(1),
            _single(text="Go", call_function="open cart()"),
            "campaign.web_popup.message.button.call_function",
        ),
        (
            page_count(1),
            campaign_pb.WebPopupContent(
                message=campaign_pb.PopupMessage(title="Hi", image_url="http://cdn.example.com/a.png")
            ),
            "campaign.web_popup.message.image_url",
        ),
        (
            page_count(1),
            campaign_pb.WebPopupContent(
                message=popup_message("Hi"),
                variant_property="plan",
                variants=[
                    campaign_pb.PopupVariant(value=str(n), message=popup_message("Hi")) for n in range(21)
                ],
            ),
            "campaign.web_popup.variants",
        ),
        (
            page_count(1),
            campaign_pb.WebPopupContent(
                message=popup_message("Hi"),
                variant_property="plan",
                variants=[campaign_pb.PopupVariant(value="gold", message=popup_message("Hi"))] * 2,
            ),
            "campaign.web_popup.variants[1].value",
        ),
    ]
    # A button with an empty call_function is a button whose action is unset: given as empty.
    cases[4][1].message.button.call_function = ""
    before = await site.admin.campaigns.ListCampaigns(campaign_pb.ListCampaignsRequest())
    for trigger, content, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await site.campaign(trigger, content, publish=False)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in field_violations(refused.value), (field, field_violations(refused.value))
    after = await site.admin.campaigns.ListCampaigns(campaign_pb.ListCampaignsRequest())
    assert len(after.campaigns) == len(before.campaigns)


async def test_a_publishable_key_names_its_web_origins(platform: Platform) -> None:
    for origins, field in (
        ([], "api_key.allowed_origins"),
        (["https://shop.example.com/path"], "api_key.allowed_origins[0]"),
        (["ftp://shop.example.com"], "api_key.allowed_origins[0]"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await platform.accounts.CreateApiKey(
                accounts_pb.CreateApiKeyRequest(
                    api_key=accounts_pb.ApiKey(
                        display_name="web", role=accounts_pb.Role.ROLE_PUBLISHABLE, allowed_origins=origins
                    )
                )
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in field_violations(refused.value)
    made = await platform.accounts.CreateApiKey(
        accounts_pb.CreateApiKeyRequest(
            api_key=accounts_pb.ApiKey(
                display_name="web",
                role=accounts_pb.Role.ROLE_PUBLISHABLE,
                allowed_origins=["HTTPS://Shop.Example.com:443"],
            )
        )
    )
    assert list(made.api_key.allowed_origins) == ["https://shop.example.com"]


async def test_the_web_api_bounds_what_a_page_can_do(site: WebSite) -> None:
    visitor = {"user_id": f"anon:{uuid.uuid4().hex}", "session_id": "s"}
    allowed = await site.call("popups", visitor)
    assert allowed.status == 200 and allowed.headers["Access-Control-Allow-Origin"] == site.origin
    foreign = await site.call("popups", visitor, origin="https://evil.example.net")
    assert foreign.status == 403 and "Access-Control-Allow-Origin" not in foreign.headers
    for raw, problem in (
        (b"{not json", "not JSON"),
        (b"[1, 2]", "a JSON object"),
        (b" " * 40_000, "at most 32 KB"),
    ):
        answer = await site.call("events", None, raw=raw)
        assert answer.status == 400 and answer.body["error"] == problem, answer.body
    many = {"events": [{"user_id": "anon:x", "name": "e", "client_event_id": str(n)} for n in range(51)]}
    assert (await site.call("events", many)).body["field"] == "events"
    bad_event = {"events": [{"user_id": "anon:x", "name": "", "client_event_id": "1"}]}
    refused = await site.call("events", bad_event)
    assert refused.status == 400 and refused.body["field"] == "events[0].name"
    for key in ("hrld_nope", site.platform.admin_key):
        assert (await site.call("popups", visitor, key=key)).status == 401
    assert (await site.call("nothing", visitor)).status == 404
    async with site.http.options(
        f"{site.platform.web_url}/v1/web/{site.key}/events", headers={"Origin": site.origin}
    ) as preflight:
        assert preflight.status == 204
        assert preflight.headers["Access-Control-Allow-Origin"] == site.origin


async def test_each_key_is_held_to_its_request_rate(settings: Settings) -> None:
    async with (
        running_platform(replace(settings, web_requests_per_second=5)) as platform,
        web_site(platform) as site,
    ):
        visitor = {"user_id": f"anon:{uuid.uuid4().hex}", "session_id": "s"}
        answers = [await site.call("popups", visitor) for _ in range(15)]
        limited = [a for a in answers if a.status == 429]
        assert limited and all(a.status in (200, 429) for a in answers)
        assert int(limited[0].headers["Retry-After"]) >= 1
        assert limited[0].headers["Access-Control-Allow-Origin"] == site.origin


async def test_the_sdk_is_one_small_script_without_eval(site: WebSite) -> None:
    async with site.http.get(
        f"{site.platform.web_url}/sdk.js", headers={"Accept-Encoding": "gzip"}, auto_decompress=False
    ) as served:
        assert served.status == 200 and served.headers["Content-Encoding"] == "gzip"
        assert served.content_type == "application/javascript"
        compressed = await served.read()
    assert len(compressed) < 15 * 1024, f"{len(compressed):,} bytes gzipped"
    source = gzip.decompress(compressed).decode()
    assert "eval(" not in source and "new Function" not in source and "innerHTML" not in source


async def test_a_pop_up_the_visitor_never_came_back_for_expires(
    platform: Platform, manual_clock: clock.ManualClock
) -> None:
    async with web_site(platform) as site:  # its destination keeps pop-ups for a day
        await site.campaign(page_count(1), _single())
        visitor = f"anon:{uuid.uuid4().hex}"
        await site.view_pages(visitor, "s", 1)
        assert await _shown(site, visitor, "s")
        manual_clock.advance(timedelta(hours=23))
        assert await site.popups(visitor, "s2")
        manual_clock.advance(timedelta(hours=2))
        assert await site.popups(visitor, "s3") == []


async def test_a_referral_and_an_audience_narrow_who_qualifies(site: WebSite) -> None:
    referral = campaign_pb.LiveTrigger(
        page=campaign_pb.PageTrigger(
            referrer=campaign_pb.UrlTest(match=campaign_pb.URL_MATCH_CONTAINS, value="news.example.org")
        )
    )
    gold = campaign_pb.Audience(
        filter=pb.SegmentFilter(all_of=[pb.Condition(property=condition("plan", "EQUALS", "gold"))])
    )
    campaign = await site.campaign(referral, _single("For our gold readers"), audience=gold)
    tag = campaign.name[-6:]
    await site.admin.segmentation.UpsertUsers(
        pb.UpsertUsersRequest(users=[user(f"gold-{tag}", plan="gold"), user(f"free-{tag}", plan="free")])
    )
    came = "https://News.Example.org/today"
    for name, referrer in (
        (f"gold-{tag}", came),
        (f"free-{tag}", came),
        (f"gold2-{tag}", "https://other.example"),
    ):
        await site.view_pages(name, "s", 1, referrer=referrer)
    signed = {"user_signature": signature(site.identity_secret, f"gold-{tag}")}
    assert [p["campaign"] for p in await _shown(site, f"gold-{tag}", "s", **signed)] == [campaign.name]
    for name in (f"free-{tag}", f"gold2-{tag}"):
        assert await site.popups(name, "s", user_signature=signature(site.identity_secret, name)) == []


async def test_quiet_hours_and_once_ever_hold_when_the_pop_up_would_show(
    platform: Platform, manual_clock: clock.ManualClock
) -> None:
    # Monday noon UTC: 21:00 in Tokyo, inside the campaign's quiet hours; 13:00 in Berlin.
    content = campaign_pb.WebPopupContent(
        message=popup_message("Once"), frequency=campaign_pb.POPUP_FREQUENCY_ONCE_EVER
    )
    quiet = campaign_pb.DeliveryPreferences(
        quiet_hours=campaign_pb.QuietHours(
            start="21:00", end="09:00", action=campaign_pb.QUIET_HOURS_ACTION_DELAY
        )
    )
    async with web_site(platform) as site:
        await site.campaign(page_count(1), content, delivery=quiet)
        visitor = f"anon:{uuid.uuid4().hex}"
        await site.view_pages(visitor, "s1", 1)
        popup = (await _shown(site, visitor, "s1", timezone="Europe/Berlin"))[0]
        assert await site.popups(visitor, "s1", timezone="Asia/Tokyo") == []
        await _saw(site, visitor, "s1", popup)
        # Qualifying again in a later session: once ever means never again.
        manual_clock.advance(timedelta(hours=1))
        await site.view_pages(visitor, "s2", 1)
        await asyncio.sleep(1.5)
        assert await site.popups(visitor, "s2", timezone="Europe/Berlin") == []


async def test_once_per_day_counts_the_visitors_own_day(
    platform: Platform, manual_clock: clock.ManualClock
) -> None:
    content = campaign_pb.WebPopupContent(
        message=popup_message("Daily deal"), frequency=campaign_pb.POPUP_FREQUENCY_ONCE_PER_DAY
    )
    async with web_site(platform) as site:
        await site.campaign(page_count(1), content)
        visitor = f"anon:{uuid.uuid4().hex}"
        await site.view_pages(visitor, "s1", 1)
        popup = (await _shown(site, visitor, "s1", timezone="Europe/Berlin"))[0]
        await _saw(site, visitor, "s1", popup)
        # Later that Monday, in another session: not again today.
        manual_clock.advance(timedelta(hours=3))
        await site.view_pages(visitor, "s2", 1)
        await asyncio.sleep(1.5)
        assert await site.popups(visitor, "s2", timezone="Europe/Berlin") == []
        # 00:00 UTC Tuesday: a new day in Berlin (01:00), still Monday in New York (19:00).
        manual_clock.advance(timedelta(hours=9))
        assert await site.popups(visitor, "s3", timezone="America/New_York") == []
        assert [p["title"] for p in await site.popups(visitor, "s3", timezone="Europe/Berlin")] == [
            "Daily deal"
        ]


async def test_a_pop_up_is_not_shown_after_the_campaign_ends(
    platform: Platform, manual_clock: clock.ManualClock
) -> None:
    async with web_site(platform) as site:
        await site.campaign(
            page_count(1), _single("Ends at one"), ends=manual_clock.now() + timedelta(hours=1)
        )
        visitor = f"anon:{uuid.uuid4().hex}"
        await site.view_pages(visitor, "s", 1)
        assert await _shown(site, visitor, "s")
        manual_clock.advance(timedelta(minutes=61))
        assert await site.popups(visitor, "s") == []


async def test_the_accounts_web_cap_holds_unless_a_campaign_opts_out(site: WebSite) -> None:
    cap = accounts_pb.FrequencyCap(channel=accounts_pb.CAP_CHANNEL_WEB_POPUP, per_day=1)
    await site.admin.accounts.UpdateAccountSettings(
        accounts_pb.UpdateAccountSettingsRequest(settings=accounts_pb.AccountSettings(frequency_caps=[cap]))
    )
    capped = [await site.campaign(page_count(1), _single(title)) for title in ("Capped A", "Capped B")]
    opted_out = await site.campaign(
        page_count(1),
        _single("Always"),
        delivery=campaign_pb.DeliveryPreferences(ignore_frequency_caps=True),
    )
    visitor = f"anon:{uuid.uuid4().hex}"
    await site.view_pages(visitor, "s", 1)

    async def decided() -> bool:
        stats = [await _stats(site, c.name) for c in capped]
        return sum(s.sent + s.skipped for s in stats) == 2

    await eventually(decided, within=20)
    stats = [await _stats(site, c.name) for c in capped]
    assert sorted((s.sent, s.skipped) for s in stats) == [(0, 1), (1, 0)]
    held = next(s for s in stats if s.skipped)
    assert "frequency" in held.failure_reasons[0].reason.lower()

    async def all_in() -> bool:
        return len(await site.popups(visitor, "s")) == 2

    await eventually(all_in, within=20)
    shown = {p["campaign"]: p["title"] for p in await site.popups(visitor, "s")}
    assert shown[opted_out.name] == "Always"
    assert len(set(shown.values()) & {"Capped A", "Capped B"}) == 1


async def test_a_pop_up_campaign_starts_on_time_and_holds_to_its_daily_limit(
    platform: Platform, manual_clock: clock.ManualClock
) -> None:
    async with web_site(platform) as site:
        campaign = await site.campaign(
            page_count(1),
            _single("From one o'clock"),
            starts=manual_clock.now() + timedelta(hours=1),
            targeting=campaign_pb.Targeting(daily_limit=1),
        )
        early, first, second = (f"anon:{uuid.uuid4().hex}" for _ in range(3))
        await site.view_pages(early, "s", 1)
        await asyncio.sleep(1.5)
        assert await site.popups(early, "s") == []
        manual_clock.advance(timedelta(hours=1))
        await site.view_pages(first, "s", 1)
        assert await _shown(site, first, "s")
        await site.view_pages(second, "s", 1)

        async def capped() -> bool:
            stats = await _stats(site, campaign.name)
            # Two qualified (the visitor before the start did not); the second was over the limit.
            reasons = [r.reason for r in stats.failure_reasons]
            return (stats.targeted, stats.sent, stats.skipped, reasons) == (
                2,
                1,
                1,
                ["the live campaign's limit was reached"],
            )

        await eventually(capped)
        assert await site.popups(second, "s") == []
        # The next day (in the account's zone, UTC) the limit starts again.
        manual_clock.advance(timedelta(hours=12))
        await site.view_pages(second, "s2", 1)
        assert await _shown(site, second, "s2")


async def test_a_total_limit_completes_the_campaign_and_its_pop_up_stays_shown(site: WebSite) -> None:
    campaign = await site.campaign(
        page_count(1), _single("Only one"), targeting=campaign_pb.Targeting(total_limit=1)
    )
    first, second = (f"anon:{uuid.uuid4().hex}" for _ in range(2))
    await site.view_pages(first, "s", 1)
    assert await _shown(site, first, "s")

    async def completed() -> bool:
        got = await site.admin.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=campaign.name))
        return got.state == campaign_pb.STATE_COMPLETED

    await eventually(completed)
    await site.view_pages(second, "s", 1)
    await asyncio.sleep(1.5)
    assert await site.popups(second, "s") == []
    assert await site.popups(first, "s")
