"""Prometheus metrics: each service process serves its own on its own HTTP port (`/metrics`).

Counters and histograms move where the work happens; gauges of state kept elsewhere (the outbox
table, JetStream consumers, the database pool, background loops) are read by a sampler every few
seconds, so a scrape costs no query. Every service has a registry of its own: the tests run the
four services in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from herald_common.logging import get_logger

log = get_logger(__name__)

# Seconds between two samples of the gauges read from elsewhere.
SAMPLE_SECONDS = 5.0
# Latency buckets (seconds) from a millisecond to a minute.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Lateness buckets (seconds): on time is under a second; an hour late is an incident.
LATENESS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


@dataclass
class Metrics:
    """One service's metric families."""

    service: str
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        r = self.registry
        self.grpc_handled = Counter(
            "grpc_server_handled_total",
            "gRPC calls completed, by method and status code.",
            ["grpc_service", "grpc_method", "grpc_code"],
            registry=r,
        )
        self.grpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time to answer a gRPC call, by method.",
            ["grpc_service", "grpc_method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.outbox_events = Gauge(
            "herald_outbox_events", "Events written to the outbox and not yet published to NATS.", registry=r
        )
        self.outbox_oldest_age = Gauge(
            "herald_outbox_oldest_event_age_seconds",
            "Age of the oldest event waiting in the outbox (0 when none waits).",
            registry=r,
        )
        self.outbox_published = Counter(
            "herald_outbox_published_total", "Events the outbox relay published to NATS.", registry=r
        )
        self.outbox_set_aside = Counter(
            "herald_outbox_set_aside_total",
            "Outbox events set aside as never publishable (kept with the reason).",
            registry=r,
        )
        self.consumer_pending = Gauge(
            "herald_consumer_pending_messages",
            "Messages in the stream a JetStream consumer has not yet been handed.",
            ["consumer"],
            registry=r,
        )
        self.consumer_ack_pending = Gauge(
            "herald_consumer_ack_pending_messages",
            "Messages handed to a consumer and not yet acknowledged.",
            ["consumer"],
            registry=r,
        )
        self.consumer_redelivered = Gauge(
            "herald_consumer_redelivered_messages",
            "Messages a consumer is handling that were delivered more than once.",
            ["consumer"],
            registry=r,
        )
        self.consumer_handled = Counter(
            "herald_consumer_messages_total",
            "Messages a consumer handled, by result (acked, retried, dead_lettered).",
            ["consumer", "result"],
            registry=r,
        )
        self.dead_letters = Counter(
            "herald_dead_letters_total",
            "Messages set aside as dead letters, with a reason, by consumer.",
            ["consumer"],
            registry=r,
        )
        self.deliveries = Counter(
            "herald_deliveries_total",
            "Delivery results recorded, by destination type and outcome (sent, failed, skipped, unknown).",
            ["destination_type", "outcome"],
            registry=r,
        )
        self.provider_seconds = Histogram(
            "herald_provider_request_seconds",
            "Time a destination's API took to answer one request, by destination type.",
            ["destination_type"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.provider_throttled = Counter(
            "herald_provider_throttled_total",
            "Requests a destination's API answered with 429 (or its own throttling answer).",
            ["destination_type"],
            registry=r,
        )
        self.run_recipients = Counter(
            "herald_run_recipients_total",
            "Recipients the scheduler planned, by what became of them (targeted, skipped).",
            ["result"],
            registry=r,
        )
        self.runs_in_progress = Gauge(
            "herald_runs_in_progress", "Runs being planned or delivering.", registry=r
        )
        self.pending_releases = Gauge(
            "herald_pending_release_batches",
            "Delivery batches waiting for their time (user time zones, throttles, do-not-disturb hours).",
            registry=r,
        )
        self.released_batches = Counter(
            "herald_released_batches_total", "Delivery batches handed to dispatch at their time.", registry=r
        )
        self.release_lateness = Histogram(
            "herald_release_lateness_seconds",
            "How long after its due time a batch was handed to dispatch.",
            buckets=LATENESS_BUCKETS,
            registry=r,
        )
        self.live_timer_lateness = Histogram(
            "herald_live_timer_lateness_seconds",
            "How long after its time a live campaign's wait (inaction window, date) fired.",
            buckets=LATENESS_BUCKETS,
            registry=r,
        )
        self.db_pool_connections = Gauge(
            "herald_db_pool_connections", "Connections the database pool holds open.", registry=r
        )
        self.db_pool_in_use = Gauge(
            "herald_db_pool_connections_in_use", "Connections checked out of the database pool.", registry=r
        )
        self.db_pool_overflow = Gauge(
            "herald_db_pool_overflow_connections",
            "Connections open beyond the pool's size (max_overflow).",
            registry=r,
        )
        self.db_direct_connections = Gauge(
            "herald_db_direct_connections",
            "Connections the hot paths' asyncpg pool holds open (at most 10).",
            registry=r,
        )
        self.db_direct_in_use = Gauge(
            "herald_db_direct_connections_in_use",
            "Connections of the hot paths' asyncpg pool in use.",
            registry=r,
        )
        self.loop_failures = Counter(
            "herald_background_loop_failures_total",
            "Steps of a background loop (outbox relay, releasers, timers) that raised.",
            ["loop"],
            registry=r,
        )
        self.loop_failing = Gauge(
            "herald_background_loop_failing",
            "1 while a background loop keeps failing (its service reports NOT_SERVING).",
            ["loop"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


Sample = Callable[[], Awaitable[None]]


class MetricsServer:
    """Serves a service's metrics on HTTP and keeps its sampled gauges fresh."""

    def __init__(self, metrics: Metrics, samples: Iterable[Sample] = ()) -> None:
        self.metrics = metrics
        self.samples = list(samples)
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._task: asyncio.Task[None] | None = None

    def add_sample(self, sample: Sample) -> None:
        self.samples.append(sample)

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self, host: str, port: int) -> int:
        """Serves on host:port (0: a free port); returns the port."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        self._task = asyncio.create_task(self._sample_forever(), name=f"{self.metrics.service}-metrics")
        return self.port

    async def sample_once(self) -> None:
        for sample in self.samples:
            try:
                await sample()
            except Exception as error:  # a sample that fails leaves its gauges as they were
                log.warning(
                    "metrics_sample_failed", sample=getattr(sample, "__qualname__", ""), error=repr(error)
                )

    async def _sample_forever(self) -> None:
        while True:
            started = time.monotonic()
            await self.sample_once()
            await asyncio.sleep(max(0.0, SAMPLE_SECONDS - (time.monotonic() - started)))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._runner is not None:
            await self._runner.cleanup()
