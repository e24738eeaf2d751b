"""Each service serves Prometheus metrics on its own port; scraped during a campaign, the families
an operator watches are there and move."""

from __future__ import annotations

import uuid

import aiohttp
from nats.js import JetStreamContext
from prometheus_client.parser import text_string_to_metric_families

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald_common.bus import Subjects
from herald_sandbox.segment_api import SegmentApi
from tests.conftest import Platform, eventually
from tests.helpers import (
    completed_stats,
    condition,
    create_segment,
    create_segment_destination_for,
    segment_export_campaign,
    user,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# Every service serves these; the services that do the work also serve their own.
COMMON = {
    "grpc_server_handled_total",
    "grpc_server_handling_seconds",
    "herald_outbox_events",
    "herald_outbox_oldest_event_age_seconds",
    "herald_outbox_published_total",
    "herald_consumer_pending_messages",
    "herald_consumer_ack_pending_messages",
    "herald_consumer_redelivered_messages",
    "herald_consumer_messages_total",
    "herald_dead_letters_total",
    "herald_db_pool_connections",
    "herald_db_pool_connections_in_use",
    "herald_db_direct_connections",
    "herald_db_direct_connections_in_use",
    "herald_background_loop_failures_total",
    "herald_background_loop_failing",
    "herald_deliveries_total",
    "herald_provider_request_seconds",
    "herald_provider_throttled_total",
    "herald_run_recipients_total",
    "herald_pending_release_batches",
    "herald_release_lateness_seconds",
    "herald_live_timer_lateness_seconds",
}


async def _scrape(port: int) -> tuple[set[str], Samples]:
    """(family names with HELP, each sample's value) of one service's metrics."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    families = list(text_string_to_metric_families(text))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}
    return {f.name for f in families if f.documentation}, samples


def _total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include these."""
    return sum(
        value
        for (found, pairs), value in samples.items()
        if found == name and set(labels.items()) <= set(pairs)
    )


def _port(platform: Platform, service: str) -> int:
    server = platform.hosts[service].metrics_server
    assert server is not None
    return server.port


async def test_every_service_serves_metrics_that_move_during_a_campaign(
    platform: Platform, segment_api: SegmentApi, js: JetStreamContext
) -> None:
    before = {s: (await _scrape(_port(platform, s)))[1] for s in platform.hosts}
    tag = uuid.uuid4().hex[:8]
    await platform.segmentation.UpsertUsers(
        segmentation_pb.UpsertUsersRequest(users=[user(f"{tag}-{n}", cohort=tag) for n in range(3)])
    )
    segment = await create_segment(platform, condition("cohort", "EQUALS", tag))
    destination = await create_segment_destination_for(platform, segment_api)
    segment_api.fail_next(1, status=429, retry_after=0.1)  # Segment throttles the first request
    created = await platform.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=segment_export_campaign(segment.name, destination.name))
    )
    await platform.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    assert (await completed_stats(platform, created.name)).sent == 3
    # A malformed event on a stream the campaign service follows is dead-lettered, and counted.
    await js.publish(Subjects(platform.settings.namespace).run_changed, b"\xff not a RunChanged")

    async def moved() -> bool:
        after = {s: (await _scrape(_port(platform, s)))[1] for s in platform.hosts}

        def grew(service: str, name: str, **labels: str) -> bool:
            return _total(after[service], name, **labels) > _total(before[service], name, **labels)

        return all(
            [
                grew("campaign", "grpc_server_handled_total", grpc_method="PublishCampaign", grpc_code="OK"),
                grew("campaign", "grpc_server_handled_total", grpc_method="GetCampaign", grpc_code="OK"),
                grew("campaign", "grpc_server_handling_seconds_count", grpc_method="CreateCampaign"),
                grew("campaign", "herald_outbox_published_total"),
                grew(
                    "campaign", "herald_consumer_messages_total", consumer="campaign-outcomes", result="acked"
                ),
                grew("campaign", "herald_dead_letters_total", consumer="campaign-runs"),
                grew("segmentation", "grpc_server_handled_total", grpc_method="UpsertUsers", grpc_code="OK"),
                grew("scheduler", "herald_run_recipients_total", result="targeted"),
                grew("scheduler", "herald_released_batches_total"),
                grew("scheduler", "herald_release_lateness_seconds_count"),
                grew("dispatch", "herald_deliveries_total", destination_type="segment", outcome="sent"),
                grew("dispatch", "herald_provider_request_seconds_count", destination_type="segment"),
                grew("dispatch", "herald_provider_throttled_total", destination_type="segment"),
                # Sampled every few seconds: each service's pool holds connections.
                all(_total(after[s], "herald_db_pool_connections") > 0 for s in after),
                _total(after["campaign"], "herald_consumer_pending_messages", consumer="campaign-runs") >= 0
                and ("herald_consumer_pending_messages", (("consumer", "campaign-runs"),))
                in after["campaign"],
            ]
        )

    await eventually(moved, within=20)
    for service in platform.hosts:
        families, _ = await _scrape(_port(platform, service))
        # prometheus_client names a counter's family without its `_total`.
        missing = {name for name in COMMON if name.removesuffix("_total") not in families}
        assert not missing, (service, missing)
