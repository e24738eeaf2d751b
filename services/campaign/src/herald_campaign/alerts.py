"""Campaign alerts sent to the account's alert webhook.

Each CampaignAlert the scheduler publishes is POSTed as JSON to the webhook URL in the account's
settings, if one is set, with the alert's id in an `Idempotency-Key` header so a receiver can drop
a repeat. A refused or failed call is retried by JetStream's redelivery, with growing delays, and
then dead-lettered with the reason.
"""

from __future__ import annotations

import json
import uuid

import aiohttp
from google.protobuf.json_format import MessageToDict

from herald.events.v1 import events_pb2 as events
from herald_campaign.accounts import settings_of
from herald_common.auth import account_id_of
from herald_common.db import Database
from herald_common.logging import get_logger
from herald_common.netguard import NetworkPolicy

log = get_logger(__name__)
WEBHOOK_TIMEOUT_SECONDS = 10.0


class WebhookRefused(Exception):
    """The webhook did not accept the alert: retried later."""


def alert_problem(alert: events.CampaignAlert) -> str | None:
    if account_id_of(alert.account) is None:
        return f"CampaignAlert names no account ({alert.account!r})"
    if not alert.event_id or not alert.campaign:
        return "CampaignAlert without event_id or campaign"
    return None


class AlertWebhooks:
    def __init__(self, database: Database, network: NetworkPolicy) -> None:
        self.database = database
        self.network = network

    async def _url(self, account_id: uuid.UUID) -> str:
        async with self.database.transaction() as session:
            settings, _ = await settings_of(session, account_id)
        return settings.alert_webhook_url

    async def send(self, alerts: list[events.CampaignAlert]) -> None:
        async with aiohttp.ClientSession(
            connector=self.network.connector(),
            timeout=aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_SECONDS),
        ) as http:
            for alert in alerts:
                account_id = account_id_of(alert.account)
                url = await self._url(account_id) if account_id is not None else ""
                if not url:
                    continue
                body = json.dumps({"type": "campaign.alert", **MessageToDict(alert)})
                headers = {"Content-Type": "application/json", "Idempotency-Key": alert.event_id}
                try:
                    async with http.post(url, data=body, headers=headers) as response:
                        if response.status >= 300:
                            raise WebhookRefused(f"alert webhook answered {response.status}")
                except aiohttp.ClientError as error:
                    raise WebhookRefused(f"alert webhook unreachable: {type(error).__name__}") from error
                log.info("alert_webhook_sent", campaign=alert.campaign, event_id=alert.event_id)
