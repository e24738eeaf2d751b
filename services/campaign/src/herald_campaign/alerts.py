"""Campaign alerts sent to the account's alert webhook.

Each CampaignAlert the scheduler publishes is POSTed as JSON to the webhook URL in the account's
settings, if one is set, with the alert's id in an `Idempotency-Key` header so a receiver can drop
a repeat. Alerts travel on a subject per account and each account is a lane of its own, one alert
at a time: an account whose webhook is down or slow delays only its own alerts, and each alert is
acknowledged alone once its webhook took it, so none is sent again for another's failure. A
refused or failed call is retried by JetStream's redelivery, with growing delays, and then
dead-lettered with the reason.
"""

from __future__ import annotations

import json
import uuid

import aiohttp
from google.protobuf.json_format import MessageToDict
from nats.aio.msg import Msg

from herald.events.v1 import events_pb2 as events
from herald_campaign.accounts import settings_of
from herald_common import bus
from herald_common.auth import account_id_of
from herald_common.logging import get_logger
from herald_common.netguard import NetworkPolicy
from herald_common.runtime import Infrastructure

log = get_logger(__name__)
WEBHOOK_TIMEOUT_SECONDS = 10.0
CONSUMER = "campaign-alert-webhooks"
# Alerts held at once, across accounts (each account's lane holds at most two).
MAX_ALERTS_IN_FLIGHT = 64


class WebhookRefused(Exception):
    """The webhook did not accept the alert: retried later."""


def alert_problem(alert: events.CampaignAlert) -> str | None:
    if account_id_of(alert.account) is None:
        return f"CampaignAlert names no account ({alert.account!r})"
    if not alert.event_id or not alert.campaign:
        return "CampaignAlert without event_id or campaign"
    return None


class AlertWebhooks:
    def __init__(self, infra: Infrastructure, network: NetworkPolicy) -> None:
        self.infra = infra
        self.http = aiohttp.ClientSession(
            connector=network.connector(),
            timeout=aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_SECONDS),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def start(self) -> None:
        await self.infra.consume_lanes(
            owner="scheduler",
            durable=CONSUMER,
            filter_subject=self.infra.subjects.campaign_alerts,
            handler=self.handle,
            lane_concurrency=1,
            max_in_flight=MAX_ALERTS_IN_FLIGHT,
        )

    async def close(self) -> None:
        await self.http.close()

    async def _url(self, account_id: uuid.UUID) -> str:
        async with self.infra.database.transaction() as session:
            settings, _ = await settings_of(session, account_id)
        return settings.alert_webhook_url

    async def handle(self, msg: Msg) -> None:
        decoded = await bus.decode_batch(
            self.infra.js, self.infra.subjects, CONSUMER, [msg], events.CampaignAlert, alert_problem
        )
        for _, alert in decoded:  # none when dead-lettered with the reason
            await self.send(alert)
            await msg.ack()

    async def send(self, alert: events.CampaignAlert) -> None:
        account_id = account_id_of(alert.account)
        url = await self._url(account_id) if account_id is not None else ""
        if not url:
            return
        body = json.dumps({"type": "campaign.alert", **MessageToDict(alert)})
        headers = {"Content-Type": "application/json", "Idempotency-Key": alert.event_id}
        try:
            async with self.http.post(url, data=body, headers=headers, allow_redirects=False) as response:
                if response.status >= 300:
                    raise WebhookRefused(f"alert webhook answered {response.status}")
        except (TimeoutError, aiohttp.ClientError) as error:
            raise WebhookRefused(f"alert webhook unreachable: {type(error).__name__}") from error
        log.info("alert_webhook_sent", campaign=alert.campaign, event_id=alert.event_id)
