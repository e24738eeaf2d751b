"""A website of an account of its own, as the web pop-up tests use it: a publishable key for its
origin, a web pop-up destination, and calls to the web SDK's API as its pages make them."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
from google.protobuf.duration_pb2 import Duration

from herald.accounts.v1 import account_service_pb2 as accounts_pb
from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald_common import api
from tests.conftest import Platform
from tests.harness import Clients, create_account
from tests.helpers import until_live

ORIGIN = "https://shop.example.com"


def signature(secret: str, user_id: str) -> str:
    return hmac.new(secret.encode(), user_id.encode(), hashlib.sha256).hexdigest()


def popup_message(title: str, body: str = "", **button: Any) -> campaign_pb.PopupMessage:
    message = campaign_pb.PopupMessage(title=title, body=body)
    if button:
        message.button.CopyFrom(campaign_pb.PopupButton(**button))
    return message


def by_language() -> campaign_pb.WebPopupContent:
    """A pop-up by user property: German and French variants of a default English one."""
    return campaign_pb.WebPopupContent(
        message=popup_message("Hello"),
        variant_property="language",
        variants=[
            campaign_pb.PopupVariant(value="de", message=popup_message("Hallo")),
            campaign_pb.PopupVariant(value="fr", message=popup_message("Bonjour")),
        ],
    )


def page_count(at_least: int) -> campaign_pb.LiveTrigger:
    return campaign_pb.LiveTrigger(page=campaign_pb.PageTrigger(page_count=at_least))


@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class WebSite:
    platform: Platform
    admin: Clients
    key: str
    identity_secret: str
    destination: str
    http: aiohttp.ClientSession
    origin: str = ORIGIN

    async def call(
        self,
        action: str,
        body: Any,
        *,
        key: str | None = None,
        origin: str | None = "",
        raw: bytes | None = None,
    ) -> Answer:
        headers = {"Content-Type": "text/plain"}
        origin = self.origin if origin == "" else origin  # the site's own page; None: no browser
        if origin is not None:
            headers["Origin"] = origin
        url = f"{self.platform.web_url}/v1/web/{key or self.key}/{action}"
        data = raw if raw is not None else json.dumps(body).encode()
        async with self.http.post(url, data=data, headers=headers) as response:
            text = await response.text()
            return Answer(response.status, json.loads(text) if text else {}, dict(response.headers))

    async def view_pages(
        self, visitor: str, session: str, count: int, url: str = "https://shop.example.com/", **extra: Any
    ) -> None:
        """The visitor views `count` pages in a session, as the SDK reports them."""
        events = [
            {
                "user_id": visitor,
                "name": "Page Viewed",
                "client_event_id": uuid.uuid4().hex,
                "time": api.utcnow().isoformat(),
                "properties": {"url": url, "session_id": session, "session_page_count": n, **extra},
            }
            for n in range(1, count + 1)
        ]
        answer = await self.call("events", {"events": events})
        assert answer.status == 200, answer.body

    async def popups(self, visitor: str, session: str, **extra: Any) -> list[dict[str, Any]]:
        answer = await self.call("popups", {"user_id": visitor, "session_id": session, **extra})
        assert answer.status == 200, answer.body
        found: list[dict[str, Any]] = answer.body["popups"]
        return found

    async def campaign(
        self,
        trigger: campaign_pb.LiveTrigger,
        content: campaign_pb.WebPopupContent,
        *,
        publish: bool = True,
        starts: datetime | None = None,
        ends: datetime | None = None,
        **fields: Any,
    ) -> campaign_pb.Campaign:
        when = campaign_pb.Live(trigger=trigger)
        if starts is not None:
            when.start_time.CopyFrom(api.timestamp(starts))
        if ends is not None:
            when.end_time.CopyFrom(api.timestamp(ends))
        campaign = campaign_pb.Campaign(
            display_name="exit offer",
            destination=self.destination,
            schedule=campaign_pb.Schedule(live=when),
            web_popup=content,
            **fields,
        )
        created = await self.admin.campaigns.CreateCampaign(
            campaign_pb.CreateCampaignRequest(campaign=campaign)
        )
        if publish:
            await self.admin.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))

            await until_live(self.admin, self.platform.settings.database_url, created.name)
        return created


@asynccontextmanager
async def web_site(platform: Platform, origin: str = ORIGIN) -> AsyncIterator[WebSite]:
    _, key = await create_account(platform.address("campaign"), platform.settings.bootstrap_token, "shop")
    admin = Clients.open(platform.addresses, key)
    created = await admin.accounts.CreateApiKey(
        accounts_pb.CreateApiKeyRequest(
            api_key=accounts_pb.ApiKey(
                display_name="website", role=accounts_pb.Role.ROLE_PUBLISHABLE, allowed_origins=[origin]
            )
        )
    )
    secret = await admin.accounts.GetIdentitySecret(accounts_pb.GetIdentitySecretRequest())
    expire = Duration()
    expire.FromSeconds(86400)
    destination = await admin.dispatch.CreateDestination(
        dispatch_pb.CreateDestinationRequest(
            destination=dispatch_pb.Destination(
                display_name="shop pop-ups", web_popup=dispatch_pb.WebPopupConfig(expire_after=expire)
            )
        )
    )
    async with aiohttp.ClientSession() as http:
        try:
            yield WebSite(
                platform, admin, created.key, secret.identity_secret, destination.name, http, origin
            )
        finally:
            await admin.close()
