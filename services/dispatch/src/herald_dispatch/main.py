"""Dispatch service process: the destinations API and the destination workers.

HERALD_DISPATCH_WORKERS picks the workers this process runs (comma-separated destination types,
default all; empty for an API-only process), so each worker type can scale on its own.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import grpc

from herald.dispatch.v1 import dispatch_service_pb2 as pb
from herald.dispatch.v1 import dispatch_service_pb2_grpc as pb_grpc
from herald.events.v1 import events_pb2 as events
from herald_common import runtime
from herald_common.campaign_usage import CampaignUsage
from herald_common.db import Database, make_engine
from herald_common.logging import get_logger
from herald_common.loops import WakeableLoop
from herald_common.netguard import NetworkPolicy
from herald_common.runtime import Infrastructure, ServiceHost
from herald_common.secret_box import SecretBox
from herald_common.settings import Settings
from herald_dispatch.campaigns import CampaignBook
from herald_dispatch.channels import registry
from herald_dispatch.deliveries import DeliveryQueries
from herald_dispatch.destinations import HTTP_CONNECTIONS, Destinations, reseal
from herald_dispatch.gate import STALE_ADMISSION_SECONDS, SendGate
from herald_dispatch.provider_calls import ProviderCallMetrics, provider_call_metrics
from herald_dispatch.provider_http import ProviderHttp
from herald_dispatch.ratelimit import SharedRateLimiter
from herald_dispatch.receipts import ReceiptServer
from herald_dispatch.servicer import PERMISSIONS, DispatchServicer
from herald_dispatch.storage import SCHEMA, outbox
from herald_dispatch.test_messages import TestMessages
from herald_dispatch.web.forwarding import Forwarder
from herald_dispatch.web.inbox import EXPIRY_SWEEP_SECONDS, PopupInbox
from herald_dispatch.web.server import WebServer
from herald_dispatch.worker import DeliveryWorker, WorkerOptions

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DispatchService"].full_name
MIGRATIONS = Path(__file__).parent / "migrations"
log = get_logger(__name__)
# Connections to destinations, in all: enough for every lane's concurrent requests.


def worker_types_from_env(known: list[str]) -> list[str]:
    raw = os.environ.get("HERALD_DISPATCH_WORKERS")
    if raw is None:
        return known
    chosen = [w.strip() for w in raw.split(",") if w.strip()]
    unknown = set(chosen) - set(known)
    if unknown:
        raise RuntimeError(f"unknown HERALD_DISPATCH_WORKERS {sorted(unknown)}; known: {known}")
    return chosen


async def start(
    settings: Settings,
    port: int | None = None,
    workers: list[str] | None = None,
    options: WorkerOptions | None = None,
) -> ServiceHost:
    if settings.sms_settle_seconds <= STALE_ADMISSION_SECONDS:
        # A sender writes within this long of its last confirmation; the settler must ask later.
        raise RuntimeError(
            f"HERALD_SMS_SETTLE_SECONDS must be over {STALE_ADMISSION_SECONDS:g} s: an unanswered "
            "message is looked up only after every request confirmed before it was written"
        )
    secrets = SecretBox.from_setting(settings.secret_keys)  # refuse to start without keys
    infra = await Infrastructure.open(
        settings, service="dispatch", schema=SCHEMA, migrations_dir=MIGRATIONS, outbox=outbox
    )
    policy = NetworkPolicy(settings.allowed_destination_networks)
    calls = ProviderCallMetrics(infra.metrics)
    # No cookie jar: a provider's cookies must not follow one account's requests into another's.
    http = aiohttp.ClientSession(
        connector=policy.connector(limit=HTTP_CONNECTIONS),
        cookie_jar=aiohttp.DummyCookieJar(),
        trace_configs=[provider_call_metrics(calls)],
    )
    messages = ProviderHttp(policy, [calls])
    channels = registry(
        http, messages, answer_timeout_seconds=settings.sms_answer_timeout_seconds, database=infra.database
    )
    campaigns = CampaignBook(infra.database)
    campaign_service = infra.channel("campaign")
    destinations = Destinations(infra.database, channels, policy, CampaignUsage(campaign_service), secrets)
    resealed = await reseal(infra.database, secrets)
    if resealed:
        log.info("destination_credentials_resealed", count=resealed, key_id=secrets.current)
    gate = SendGate(infra.database, infra.nats, infra.subjects)
    await gate.follow_halts()
    tests = TestMessages(destinations, SharedRateLimiter(infra.database), gate)
    servicer = DispatchServicer(destinations, DeliveryQueries(infra.database), tests, gate)

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_DispatchServiceServicer_to_server(servicer, server)

    host = await ServiceHost.start(
        "dispatch",
        infra,
        [SERVICE_NAME],
        register,
        settings.port("dispatch") if port is None else port,
        permissions=PERMISSIONS,
    )
    host.on_stop.append(http.close)
    host.on_stop.append(messages.close)
    host.on_stop.append(campaign_service.close)
    await infra.consume(
        owner="campaign",
        durable="dispatch-campaigns",
        filter_subject=infra.subjects.campaign_changed,
        event_type=events.CampaignChanged,
        apply=campaigns.apply,
        problem=runtime.campaign_changed_problem,
    )
    destinations.receipts_url = settings.receipts_url
    if settings.receipts_port:
        server = ReceiptServer(
            infra.database,
            infra.subjects,
            destinations.for_receipts,
            infra.relay.notify,
            settings.receipts_url,
        )
        port_taken = await server.start(settings.host, settings.receipts_port)
        infra.watch(server.sweeper)
        host.on_stop.append(server.stop)
        destinations.receipts_url = settings.receipts_url or f"http://{settings.host}:{port_taken}"
    chosen = worker_types_from_env(sorted(channels)) if workers is None else workers
    if settings.web_port and "web_popup" in chosen:
        await _serve_web(settings, infra, host, campaigns)
    worker_options = options or WorkerOptions(max_in_flight=settings.dispatch_max_in_flight)
    for worker_type in chosen:
        worker = DeliveryWorker(infra, destinations, campaigns, channels[worker_type], gate, worker_options)
        await worker.start()
        host.on_stop.append(worker.stop)
        infra.watch(worker.settler)
    return host


async def _serve_web(
    settings: Settings, infra: Infrastructure, host: ServiceHost, campaigns: CampaignBook
) -> None:
    """The web SDK's API, and what keeps visitors' pop-up inboxes current."""
    segmentation = infra.channel("segmentation")
    host.on_stop.append(segmentation.close)
    inbox = PopupInbox(infra.database, campaigns, infra.subjects, infra.relay.notify)
    server = WebServer(
        infra.keys, inbox, Forwarder(segmentation), settings.service_token, settings.web_requests_per_second
    )
    port = await server.start(settings.host, settings.web_port)
    host.on_stop.append(server.stop)
    log.info("web_sdk_api_serving", port=port)
    await infra.consume(
        owner="segmentation",
        durable="dispatch-visitor-merges",
        filter_subject=infra.subjects.visitor_merged,
        event_type=events.VisitorMerged,
        apply=inbox.visitors_merged,
    )
    expiry = WakeableLoop("web-inbox-expiry", inbox.forget_expired, EXPIRY_SWEEP_SECONDS)
    expiry.start()
    host.on_stop.append(expiry.stop)
    infra.watch(expiry)


def main() -> None:
    runtime.run(start)


def reseal_main() -> None:
    """`herald-reseal-secrets`: seals every destination's credentials under the first key of
    HERALD_SECRET_KEYS (dispatch also does this when it starts)."""
    settings = Settings.from_env()
    secrets = SecretBox.from_setting(settings.secret_keys)

    async def run() -> int:
        database = Database(make_engine(settings.database_url, pool_size=1, max_overflow=0))
        try:
            return await reseal(database, secrets)
        finally:
            await database.dispose()

    count = asyncio.run(run())
    print(f"resealed {count} destinations under key {secrets.current!r}")


if __name__ == "__main__":
    main()
