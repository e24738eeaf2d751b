"""The web SDK in a real browser (Debian's Chromium, driven by Playwright) on a demo site the test
serves: exit intent made with real mouse movements, the pop-up as a visitor sees and uses it."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from playwright.async_api import Browser, Page, async_playwright

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald_common.embedded import free_port
from herald_common.timing import in_control_group
from tests.conftest import Platform, eventually
from tests.web_site import WebSite, by_language, page_count, popup_message, signature, web_site

CHROMIUM = shutil.which("chromium") or ""
ARTIFACTS = Path(__file__).parent.parent / ".artifacts"
# As a root process on a machine without a display or a network beyond loopback.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HOSTILE_CSS = "<style>* { display: none !important; }</style>"


def _page(web_url: str, key: str, title: str, extra: str = "") -> str:
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>{extra}
<script src="{web_url}/sdk.js" data-key="{key}"></script></head>
<body style="height:3000px"><h1>{title}</h1><p>A demo shop page.</p>
<script>
  window.cartOpened = 0;
  herald.registerAction("openCart", function (info) {{ window.cartOpened += 1; window.lastInfo = info; }});
</script></body></html>"""


@asynccontextmanager
async def demo_site(platform: Platform) -> AsyncIterator[tuple[str, Callable[[str], None]]]:
    """A shop on 127.0.0.1 whose pages load the SDK with the key set later; yields (origin, set key)."""
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    state = {"key": ""}

    async def page(request: web.Request) -> web.Response:
        path = request.match_info["path"]
        extra = HOSTILE_CSS if path.startswith("hostile") else ""
        html = _page(platform.web_url, state["key"], path or "home", extra)
        return web.Response(text=html, content_type="text/html")

    app = web.Application()
    app.router.add_get("/{path:.*}", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield origin, lambda key: state.update(key=key)
    finally:
        await runner.cleanup()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM:
        pytest.fail("Chromium is missing: `make test` installs Debian's chromium package (see the README)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield launched
        await launched.close()


@pytest.fixture
async def shop(platform: Platform) -> AsyncIterator[tuple[WebSite, str]]:
    async with demo_site(platform) as (origin, set_key), web_site(platform, origin=origin) as site:
        set_key(site.key)
        yield site, origin


async def _visitor(page: Page) -> str:
    stored = await page.evaluate("localStorage.getItem('herald:visitor')")
    return str(json.loads(stored)["anonymousId"])


async def _session(page: Page) -> str:
    stored = await page.evaluate("localStorage.getItem('herald:session')")
    return str(json.loads(stored)["id"])


async def _delivered(site: WebSite, page: Page) -> None:
    """Waits until the visitor's pop-up is in their inbox (the pipeline is asynchronous)."""
    visitor, session = await _visitor(page), await _session(page)

    async def ready() -> bool:
        return bool(await site.popups(visitor, session))

    await eventually(ready, within=20)


async def _leave_through_the_top(page: Page) -> None:
    """A real pointer: into the page, then up and out through the top edge."""
    await page.mouse.move(400, 300)
    await page.mouse.move(400, 40, steps=5)
    await page.mouse.move(400, -20, steps=3)


def _dialog(page: Page) -> Any:
    return page.locator("herald-popup").locator("[role=dialog]")


async def _stats(site: WebSite, campaign: str) -> campaign_pb.CampaignStats:
    request = campaign_pb.GetCampaignStatsRequest(name=f"{campaign}/stats")
    return await site.admin.campaigns.GetCampaignStats(request)


async def _screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


async def _open(browser: Browser, origin: str, *paths: str, visitor: str = "") -> Page:
    context = await browser.new_context(viewport={"width": 1000, "height": 700})
    if visitor:  # a visitor the test chose (the SDK keeps the id it finds)
        stored = json.dumps({"anonymousId": visitor, "userId": "", "signature": ""})
        await context.add_init_script(f"localStorage.setItem('herald:visitor', {json.dumps(stored)})")
    page = await context.new_page()
    for path in paths:
        await page.goto(f"{origin}/{path}")
    return page


async def test_exit_intent_shows_the_pop_up_and_its_button_opens_the_link(
    browser: Browser, shop: tuple[WebSite, str]
) -> None:
    site, origin = shop
    content = campaign_pb.WebPopupContent(
        message=popup_message(
            "Before you go",
            "Your cart is waiting",
            text="Back to cart",
            open_link=campaign_pb.OpenLink(url=f"{origin}/cart"),
        )
    )
    campaign = await site.campaign(page_count(2), content)
    page = await _open(browser, origin, "home", "shoes")
    await _delivered(site, page)
    await _leave_through_the_top(page)
    dialog = _dialog(page)
    await dialog.wait_for(state="visible", timeout=10_000)
    assert await dialog.get_attribute("aria-modal") == "true"
    assert await dialog.locator("h2").inner_text() == "Before you go"
    await _screenshot(page, "exit-intent-popup")
    await dialog.locator("button.cta").click()
    await page.wait_for_url(f"{origin}/cart")

    async def counted() -> bool:
        stats = await _stats(site, campaign.name)
        return stats.popups.viewed == 1 and stats.popups.clicked == 1

    await eventually(counted)


async def test_once_per_session_holds_across_reloads_and_escape_closes(
    browser: Browser, shop: tuple[WebSite, str]
) -> None:
    site, origin = shop
    campaign = await site.campaign(
        page_count(1), campaign_pb.WebPopupContent(message=popup_message("Hello", text="OK"))
    )
    page = await _open(browser, origin, "home")
    await _delivered(site, page)
    await _leave_through_the_top(page)
    dialog = _dialog(page)
    await dialog.wait_for(state="visible", timeout=10_000)
    # Focus stays in the pop-up: Tab goes from the button to the close control and back.
    focused = []
    for _ in range(3):
        await page.keyboard.press("Tab")
        focused.append(
            await page.evaluate("document.querySelector('herald-popup').shadowRoot.activeElement.className")
        )
    assert focused == ["close", "cta", "close"]
    await page.keyboard.press("Escape")
    await dialog.wait_for(state="detached")
    # Reloads qualify the visitor again, in the same session: nothing more is shown.
    await page.reload()
    await page.reload()
    await asyncio.sleep(3)
    await _leave_through_the_top(page)
    await asyncio.sleep(1.5)
    assert await page.locator("herald-popup").count() == 0

    async def closed() -> bool:
        stats = await _stats(site, campaign.name)
        return stats.popups.viewed == 1 and stats.popups.closed == 1

    await eventually(closed)


async def test_campaign_text_is_shown_as_text(browser: Browser, shop: tuple[WebSite, str]) -> None:
    site, origin = shop
    title = "<script>window.pwned = 1</script>"
    body = '<img src="x" onerror="window.pwned = 2">'
    await site.campaign(page_count(1), campaign_pb.WebPopupContent(message=popup_message(title, body)))
    page = await _open(browser, origin, "home")
    await _delivered(site, page)
    await _leave_through_the_top(page)
    dialog = _dialog(page)
    await dialog.wait_for(state="visible", timeout=10_000)
    assert await dialog.locator("h2").inner_text() == title
    assert await dialog.locator("p").inner_text() == body
    assert await dialog.locator("img").count() == 0 and await dialog.locator("script").count() == 0
    assert await page.evaluate("window.pwned") is None


async def test_a_registered_function_is_called_and_an_unknown_one_does_nothing(
    browser: Browser, shop: tuple[WebSite, str]
) -> None:
    site, origin = shop
    known = await site.campaign(
        page_count(1),
        campaign_pb.WebPopupContent(message=popup_message("Cart", text="Open", call_function="openCart")),
    )
    page = await _open(browser, origin, "home")
    await _delivered(site, page)
    await _leave_through_the_top(page)
    await _dialog(page).locator("button.cta").click()
    assert await page.evaluate("window.cartOpened") == 1
    assert (await page.evaluate("window.lastInfo"))["campaign"] == known.name
    # A name the page never registered: the click closes the pop-up, and nothing else happens.
    await site.admin.campaigns.StopCampaign(campaign_pb.StopCampaignRequest(name=known.name))
    await site.campaign(
        page_count(1),
        campaign_pb.WebPopupContent(message=popup_message("Other", text="Go", call_function="notThere")),
    )
    other = await _open(browser, origin, "home")
    await _delivered(site, other)
    errors: list[str] = []
    other.on("pageerror", lambda error: errors.append(str(error)))
    await _leave_through_the_top(other)
    await _dialog(other).locator("button.cta").click()
    await _dialog(other).wait_for(state="detached")
    assert await other.evaluate("window.cartOpened") == 0 and errors == []


async def test_a_page_hiding_everything_still_shows_the_pop_up(
    browser: Browser, shop: tuple[WebSite, str]
) -> None:
    site, origin = shop
    await site.campaign(
        page_count(1), campaign_pb.WebPopupContent(message=popup_message("Still here", text="OK"))
    )
    page = await _open(browser, origin, "hostile")
    await _delivered(site, page)
    await _leave_through_the_top(page)
    dialog = _dialog(page)
    await dialog.wait_for(state="visible", timeout=10_000)
    await _screenshot(page, "hostile-css-popup")
    box = await dialog.bounding_box()
    assert box is not None and box["width"] > 200 and box["height"] > 50


async def test_each_trigger_kind_fires_when_and_only_when_it_should(
    browser: Browser, shop: tuple[WebSite, str]
) -> None:
    site, origin = shop
    referral = campaign_pb.LiveTrigger(page=campaign_pb.PageTrigger(utm_source="newsletter"))
    action = campaign_pb.LiveTrigger(
        action=campaign_pb.ActionTrigger(event=campaign_pb.LiveEvent(event_name="Added to Cart"))
    )
    by_referral = await site.campaign(
        referral, campaign_pb.WebPopupContent(message=popup_message("From the newsletter"))
    )
    by_action = await site.campaign(
        action, campaign_pb.WebPopupContent(message=popup_message("Complete your order"))
    )
    count = await site.campaign(
        page_count(3), campaign_pb.WebPopupContent(message=popup_message("Thanks for browsing"))
    )

    async def shown_to(page: Page) -> set[str]:
        visitor, session = await _visitor(page), await _session(page)
        return {p["campaign"] for p in await site.popups(visitor, session)}

    came = await _open(browser, origin, "home?utm_source=newsletter", "shoes")
    await _delivered(site, came)
    acted = await _open(browser, origin, "home")
    await acted.evaluate("herald.track('Added to Cart', {sku: 'red-shoe'})")
    await _delivered(site, acted)
    browsed = await _open(browser, origin, "a", "b", "c")
    await _delivered(site, browsed)
    await asyncio.sleep(2)  # anything else that was going to arrive has
    assert await shown_to(came) == {by_referral.name}
    assert await shown_to(acted) == {by_action.name}
    assert await shown_to(browsed) == {count.name}


async def test_a_control_group_visitor_sees_nothing(browser: Browser, shop: tuple[WebSite, str]) -> None:
    site, origin = shop
    campaign = await site.campaign(
        page_count(1),
        campaign_pb.WebPopupContent(message=popup_message("Offer")),
        targeting=campaign_pb.Targeting(control_group_percent=50),
    )
    held = next(
        v for v in (f"anon:{uuid.uuid4().hex}" for _ in range(100)) if in_control_group(campaign.name, v, 50)
    )
    page = await _open(browser, origin, "home", visitor=held)

    async def recorded() -> bool:
        stats = await _stats(site, campaign.name)
        return stats.skipped == 1

    await eventually(recorded)
    await _leave_through_the_top(page)
    await asyncio.sleep(1.5)
    assert await page.locator("herald-popup").count() == 0


async def test_the_sdk_adds_one_global(browser: Browser, shop: tuple[WebSite, str]) -> None:
    _, origin = shop
    page = await _open(browser, origin, "home")
    added = await page.evaluate(
        """() => {
            const frame = document.createElement("iframe");
            document.body.appendChild(frame);
            const plain = new Set(Object.getOwnPropertyNames(frame.contentWindow));
            // Numbered names are the frames (this iframe).
            return Object.getOwnPropertyNames(window).filter((name) => !plain.has(name) && isNaN(name));
        }"""
    )
    # The demo page's own globals are cartOpened (and lastInfo once used); the SDK's is herald.
    assert sorted(added) == ["cartOpened", "herald"]


async def test_a_signed_in_visitor_gets_the_variant_of_their_property(
    browser: Browser, shop: tuple[WebSite, str]
) -> None:
    site, origin = shop
    content = by_language()
    await site.campaign(page_count(2), content)
    user_id = f"shopper-{uuid.uuid4().hex[:8]}"
    page = await _open(browser, origin, "home")
    anonymous = await _visitor(page)
    proof = signature(site.identity_secret, user_id)
    await page.evaluate(f"herald.identify({json.dumps(user_id)}, {{language: 'de'}}, {json.dumps(proof)})")
    await page.goto(f"{origin}/shoes")

    async def ready() -> bool:
        shown = await site.popups(user_id, await _session(page), user_signature=proof)
        return bool(shown)

    await eventually(ready, within=20)
    await _leave_through_the_top(page)
    dialog = _dialog(page)
    await dialog.wait_for(state="visible", timeout=10_000)
    assert await dialog.locator("h2").inner_text() == "Hallo"
    # The anonymous visitor's page view became the signed-in user's.
    found = await site.admin.segmentation.GetUser(segmentation_pb.GetUserRequest(name=f"users/{user_id}"))
    assert dict(found.properties)["language"] == "de"
    assert anonymous.startswith("anon:")


def _event_bodies(requests: list[Any]) -> list[dict[str, Any]]:
    """The events the SDK posted, in the order it posted them."""
    return [
        event for request in requests for event in json.loads(request.post_data or "{}").get("events", [])
    ]


async def test_a_session_ends_after_thirty_idle_minutes(browser: Browser, shop: tuple[WebSite, str]) -> None:
    _, origin = shop
    context = await browser.new_context()
    await context.clock.install()
    page = await context.new_page()
    posted: list[Any] = []
    page.on("request", lambda request: posted.append(request) if request.url.endswith("/events") else None)
    await page.goto(f"{origin}/home?utm_source=newsletter")
    first = await _session(page)
    await context.clock.fast_forward("29:00")
    await page.goto(f"{origin}/shoes")
    assert await _session(page) == first
    await context.clock.fast_forward("30:01")
    await page.goto(f"{origin}/hats")
    second = await _session(page)
    assert second != first
    await context.clock.fast_forward("00:02")  # the batch goes out a second after the page view

    async def all_sent() -> bool:
        return len([e for e in _event_bodies(posted) if e["name"] == "Page Viewed"]) >= 3

    await eventually(all_sent, within=10)
    viewed = {
        e["properties"]["path"]: e["properties"] for e in _event_bodies(posted) if e["name"] == "Page Viewed"
    }
    # The session keeps where it came from and counts its pages; the next starts afresh.
    assert (viewed["/home"]["session_id"], viewed["/home"]["session_page_count"]) == (first, 1)
    assert (viewed["/shoes"]["session_id"], viewed["/shoes"]["session_page_count"]) == (first, 2)
    assert viewed["/shoes"]["utm_source"] == "newsletter"
    assert (viewed["/hats"]["session_id"], viewed["/hats"]["session_page_count"]) == (second, 1)
    assert viewed["/hats"]["utm_source"] == ""
    await context.close()


async def _did(site: WebSite, visitor: str, event_name: str, times: int) -> bool:
    """Whether segmentation holds exactly `times` of the visitor's events of that name."""
    did = segmentation_pb.EventCondition(
        event_name=event_name,
        count=segmentation_pb.CountCondition(operator=segmentation_pb.OPERATOR_EQUALS, value=times),
    )
    audience = segmentation_pb.Audience(
        filter=segmentation_pb.SegmentFilter(all_of=[segmentation_pb.Condition(event=did)])
    )
    found = await site.admin.segmentation.MatchUsers(
        segmentation_pb.MatchUsersRequest(audience=audience, user_ids=[visitor])
    )
    return len(found.members) == 1


async def test_events_are_kept_across_pages_and_retried_until_taken_once(
    browser: Browser, shop: tuple[WebSite, str]
) -> None:
    site, origin = shop
    context = await browser.new_context()
    attempts: list[tuple[float, str]] = []
    answers = ["429", "lost", "lost"]  # then the network heals

    async def flaky(route: Any) -> None:
        loop = asyncio.get_running_loop()
        answer = answers.pop(0) if answers else "through"
        attempts.append((loop.time(), answer))
        cors = {"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": "Retry-After"}
        if answer == "429":  # as the web API answers a key over its rate
            body = json.dumps({"error": "more than 20 requests a second"})
            await route.fulfill(status=429, headers={**cors, "Retry-After": "2"}, body=body)
        elif answer == "lost":  # Herald took the batch, but its answer never reached the page
            await route.fetch()
            await route.fulfill(status=503, headers=cors, body="")
        else:
            await route.continue_()

    await context.route("**/v1/web/*/events", flaky)
    page = await context.new_page()
    await page.goto(f"{origin}/home")
    visitor = await _visitor(page)
    await page.evaluate("herald.track('Added to Cart', {sku: 'red-shoe'})")
    await asyncio.sleep(3.5)
    # The 429's Retry-After (2 s) was waited out before the next try.
    assert [answer for _, answer in attempts] == ["429", "lost"]
    assert attempts[1][0] - attempts[0][0] >= 1.9
    # The visitor moves on while the page holds no answer: the next page sends what it kept.
    await page.goto(f"{origin}/shoes")

    async def emptied() -> bool:
        return bool(await page.evaluate("localStorage.getItem('herald:queue')") == "[]")

    await eventually(emptied, within=30)
    assert "through" in [answer for _, answer in attempts]
    # Sent two or three times, taken once.
    assert await _did(site, visitor, "Added to Cart", 1) and await _did(site, visitor, "Page Viewed", 2)
    await context.close()


async def test_one_pop_up_per_page_view(browser: Browser, shop: tuple[WebSite, str]) -> None:
    site, origin = shop
    titles = {"First offer", "Second offer"}
    for title in sorted(titles):
        await site.campaign(page_count(1), campaign_pb.WebPopupContent(message=popup_message(title)))
    page = await _open(browser, origin, "home")
    visitor, session = await _visitor(page), await _session(page)

    async def both() -> bool:
        return len(await site.popups(visitor, session)) == 2

    await eventually(both, within=20)
    await _leave_through_the_top(page)
    dialog = _dialog(page)
    await dialog.wait_for(state="visible", timeout=10_000)
    seen = await dialog.locator("h2").inner_text()
    await page.keyboard.press("Escape")
    await dialog.wait_for(state="detached")
    # Leaving again on the same page view shows nothing more, though another pop-up is waiting.
    await _leave_through_the_top(page)
    await asyncio.sleep(1.5)
    assert await page.locator("herald-popup").count() == 0
    # The next page view shows the other one (the first was shown once this session).
    await page.goto(f"{origin}/shoes")
    await asyncio.sleep(2)
    await _leave_through_the_top(page)
    await dialog.wait_for(state="visible", timeout=10_000)
    assert {seen, await dialog.locator("h2").inner_text()} == titles


async def test_on_a_touch_screen_a_fast_scroll_back_up_is_exit_intent(
    browser: Browser, shop: tuple[WebSite, str]
) -> None:
    site, origin = shop
    await site.campaign(page_count(1), campaign_pb.WebPopupContent(message=popup_message("Leaving?")))
    context = await browser.new_context(viewport={"width": 390, "height": 700}, has_touch=True)
    page = await context.new_page()
    await page.goto(f"{origin}/home")
    await _delivered(site, page)
    dialog = _dialog(page)
    # Reading down the page, slowly, and a slow way back up: no exit intent.
    for y in (600, 1200, 1800, 1500, 1200):
        await page.evaluate(f"window.scrollTo(0, {y})")
        await asyncio.sleep(0.3)
    assert await page.locator("herald-popup").count() == 0
    # A flick back to the top, a few hundred pixels a frame.
    await page.evaluate(
        """async () => {
            for (let y = 1200; y >= 0; y -= 300) {
                window.scrollTo(0, y);
                await new Promise((done) => requestAnimationFrame(done));
            }
        }"""
    )
    await dialog.wait_for(state="visible", timeout=10_000)
    assert await dialog.locator("h2").inner_text() == "Leaving?"
    await context.close()
