"""What every service process shares: infrastructure set-up, its lifecycle and `main`."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import sqlalchemy as sa
import uvloop
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from herald.events.v1 import events_pb2 as events
from herald_common import bus, tracing
from herald_common.auth import (
    KEY_STATE_HISTORY,
    Authenticator,
    KeyRegistry,
    Permission,
    QuotaDefaults,
    api_key_uses_bucket,
    api_keys_bucket,
    ensure_bucket,
    service_credentials,
)
from herald_common.bus import (
    EventT,
    LaneConsumer,
    MessageHandler,
    PullConsumer,
    Subjects,
    dead_letter,
    decode_batch,
)
from herald_common.db import Database, make_engine, migrate
from herald_common.grpc_server import GrpcServer, PortInUse, Registrar, wait_for_termination_signal
from herald_common.logging import configure_logging, get_logger
from herald_common.loops import WakeableLoop, cancel_and_wait
from herald_common.metrics import Metrics, MetricsServer
from herald_common.outbox import OutboxRelay
from herald_common.secret_box import SecretKeysError
from herald_common.settings import Settings

log = get_logger(__name__)


class StartupError(RuntimeError):
    """A setting the service cannot run without is missing."""


HEALTH_CHECK_TIMEOUT_SECONDS = 2.0
# The service and bootstrap tokens are secrets an attacker may guess at: at least this long.
MIN_TOKEN_CHARACTERS = 32
HEALTH_CHECK_INTERVAL_SECONDS = 2.0


@dataclass
class Infrastructure:
    """A service's connections: its database schema, NATS, and its outbox relay."""

    settings: Settings
    database: Database
    nats: NatsClient
    js: JetStreamContext
    subjects: Subjects
    relay: OutboxRelay
    keys: KeyRegistry
    authenticator: Authenticator
    key_uses: KeyValue
    metrics: Metrics
    consumers: list[PullConsumer | LaneConsumer] = field(default_factory=list)
    # Background loops whose repeated failure makes the service NOT_SERVING.
    loops: list[WakeableLoop] = field(default_factory=list)
    # Set when the process begins to shut down: long work stops taking more and hands back the rest.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # Each loop's failures already added to its metric.
    _failures_counted: dict[str, int] = field(default_factory=dict)

    @classmethod
    async def open(
        cls,
        settings: Settings,
        *,
        service: str,
        schema: str,
        migrations_dir: Path,
        outbox: sa.Table,
    ) -> Infrastructure:
        if not settings.service_token:
            raise StartupError("HERALD_SERVICE_TOKEN is not set: the services use it to call each other")
        for name, token in (
            ("HERALD_SERVICE_TOKEN", settings.service_token),
            ("HERALD_BOOTSTRAP_TOKEN", settings.bootstrap_token),
        ):
            if token and len(token) < MIN_TOKEN_CHARACTERS:
                raise StartupError(
                    f"{name} is too short: use at least {MIN_TOKEN_CHARACTERS} random characters"
                )
        engine = make_engine(settings.database_url)
        await migrate(engine, schema, migrations_dir)
        database = Database(engine)
        nats_client = await bus.connect(settings.nats_url, name=f"herald-{service}")
        js = nats_client.jetstream()
        subjects = Subjects(settings.namespace)
        await bus.ensure_streams(js, subjects, settings.stream_limits)
        keys = KeyRegistry(settings.service_token)
        replicas = settings.stream_replicas
        await keys.start(
            await ensure_bucket(js, api_keys_bucket(settings.namespace), KEY_STATE_HISTORY, replicas)
        )
        key_uses = await ensure_bucket(js, api_key_uses_bucket(settings.namespace), replicas=replicas)
        defaults = QuotaDefaults(
            settings.account_requests_per_second,
            settings.account_max_batch_size,
            settings.publishable_requests_per_second,
        )
        authenticator = Authenticator(keys, settings.service_token, settings.bootstrap_token, defaults)
        authenticator.uses.start(key_uses)
        metrics = Metrics(service)
        relay = OutboxRelay(database, outbox, js, metrics=metrics)
        relay.start()
        return cls(
            settings, database, nats_client, js, subjects, relay, keys, authenticator, key_uses, metrics
        )

    def channel(self, service: str) -> grpc.aio.Channel:
        """A channel to another of our services; calls carry the service token and the account
        the current call acts for."""
        return grpc.aio.insecure_channel(
            self.settings.address(service), interceptors=service_credentials(self.settings.service_token)
        )

    async def consume(
        self,
        *,
        owner: str,
        durable: str,
        filter_subject: str,
        event_type: type[EventT],
        apply: Callable[[list[EventT]], Awaitable[None]],
        problem: Callable[[EventT], str | None] = lambda _: None,
        verify: Callable[[list[EventT]], Awaitable[Mapping[int, str]]] | None = None,
        batch_size: int = 256,
    ) -> None:
        """Starts a durable consumer on the stream of what `owner` publishes. Each batch is decoded
        (malformed events are dead-lettered with `problem`'s reason), verified against what this
        service knows (`verify` gives the positions of events to set aside, with the reason: they
        are dead-lettered too), applied, then acknowledged."""

        async def handler(msgs: list[Msg]) -> None:
            decoded = await decode_batch(
                self.js, self.subjects, durable, msgs, event_type, problem, self.metrics
            )
            rejected = await verify([event for _, event in decoded]) if verify and decoded else {}
            for i, reason in rejected.items():
                await dead_letter(self.js, self.subjects, durable, decoded[i][0], reason, self.metrics)
            accepted = [pair for i, pair in enumerate(decoded) if i not in rejected]
            await apply([event for _, event in accepted])
            for msg, _ in accepted:
                await msg.ack()
            self.metrics.consumer_handled.labels(durable, "acked").inc(len(accepted))

        consumer = PullConsumer(
            self.js,
            self.subjects,
            handler=handler,
            batch_size=batch_size,
            **self._consumer_options(owner, durable, filter_subject),
        )
        await consumer.start()
        self.consumers.append(consumer)

    async def consume_lanes(
        self,
        *,
        owner: str,
        durable: str,
        filter_subject: str,
        handler: MessageHandler,
        lane_concurrency: int,
        max_in_flight: int,
        dead_lettered: Callable[[Msg, str], Awaitable[None]] | None = None,
    ) -> None:
        """Starts a durable consumer that handles each message alone, concurrently, one lane per
        subject; `handler` acks; `dead_lettered` hears of each message set aside after failing
        every attempt."""
        consumer = LaneConsumer(
            self.js,
            self.subjects,
            handler=handler,
            lane_concurrency=lane_concurrency,
            max_in_flight=max_in_flight,
            dead_lettered=dead_lettered,
            **self._consumer_options(owner, durable, filter_subject),
        )
        await consumer.start()
        self.consumers.append(consumer)

    def _consumer_options(self, owner: str, durable: str, filter_subject: str) -> dict[str, Any]:
        return {
            "stream": self.subjects.stream(owner),
            "durable": durable,
            "filter_subject": filter_subject,
            "max_deliveries": self.settings.max_deliveries,
            "redelivery_base_seconds": self.settings.redelivery_base_seconds,
            "ack_wait_seconds": self.settings.ack_wait_seconds,
            "metrics": self.metrics,
        }

    async def stop_consumers(self) -> None:
        # Together: each waits for its pull in flight and its handlers, all within one grace period.
        await asyncio.gather(*(c.stop(self.settings.shutdown_grace_seconds) for c in self.consumers))
        self.consumers.clear()

    def watch(self, *loops: WakeableLoop) -> None:
        """Makes these background loops part of the service's health."""
        self.loops.extend(loops)

    async def sample_metrics(self) -> None:
        """The gauges of state kept elsewhere: the outbox, the consumers, the pool, the loops."""
        m = self.metrics
        outbox = self.relay.table
        async with self.database.transaction() as session:
            waiting, oldest = (
                await session.execute(
                    sa.select(
                        sa.func.count(),
                        sa.func.coalesce(
                            sa.extract("epoch", sa.func.now() - sa.func.min(outbox.c.created_at)), 0
                        ),
                    ).where(outbox.c.problem.is_(None))
                )
            ).one()
        m.outbox_events.set(waiting)
        m.outbox_oldest_age.set(max(0.0, float(oldest)))
        for consumer in self.consumers:
            info = await self.js.consumer_info(consumer.stream, consumer.durable)
            m.consumer_pending.labels(consumer.durable).set(info.num_pending or 0)
            m.consumer_ack_pending.labels(consumer.durable).set(info.num_ack_pending or 0)
            m.consumer_redelivered.labels(consumer.durable).set(info.num_redelivered or 0)
        pool: Any = self.database.engine.pool
        m.db_pool_connections.set(pool.checkedin() + pool.checkedout())
        m.db_pool_in_use.set(pool.checkedout())
        m.db_pool_overflow.set(max(0, pool.overflow()))
        direct_open, direct_in_use = self.database.direct_connections()
        m.db_direct_connections.set(direct_open)
        m.db_direct_in_use.set(direct_in_use)
        for loop in [self.relay.loop, *self.loops]:
            m.loop_failing.labels(loop.name).set(1 if loop.failing else 0)
            m.loop_failures.labels(loop.name).inc(
                loop.failures_total - self._failures_counted.get(loop.name, 0)
            )
            self._failures_counted[loop.name] = loop.failures_total

    async def problems(self) -> list[str]:
        """What keeps this service from doing its work (nothing when healthy): database or NATS
        unreachable, the outbox stuck, a consumer stopped, a background loop failing."""
        found = []
        if not self.nats.is_connected:
            found.append("NATS is not connected")
        if self.relay.stuck:
            found.append("the outbox is stuck")
        found += [f"consumer {c.durable} has stopped" for c in self.consumers if not c.alive]
        found += [
            f"loop {loop.name} failed {loop.failures} times in a row: {loop.last_error}"
            for loop in self.loops
            if loop.failing
        ]
        try:
            async with asyncio.timeout(HEALTH_CHECK_TIMEOUT_SECONDS):
                async with self.database.engine.connect() as connection:
                    await connection.execute(sa.text("SELECT 1"))
        except Exception as error:
            found.append(f"the database is unreachable ({type(error).__name__})")
        return found

    async def close(self) -> None:
        await self.stop_consumers()
        await self.relay.stop()
        # Consumers are stopped and the outbox flushed: nothing is in flight, so close outright.
        await self.authenticator.uses.stop(self.key_uses)
        await self.keys.stop()
        await self.nats.flush()
        await self.nats.close()
        await self.database.dispose()


def campaign_changed_problem(event: events.CampaignChanged) -> str | None:
    """Why a CampaignChanged cannot be applied (every service that follows campaigns checks this)."""
    if not event.campaign.name.startswith("campaigns/") or event.version <= 0:
        return "CampaignChanged without campaign name or version"
    return None


def newest_campaign_changes(changes: Sequence[events.CampaignChanged]) -> list[events.CampaignChanged]:
    """The highest version of each campaign among `changes` (a batch may hold several)."""
    newest: dict[str, events.CampaignChanged] = {}
    for change in changes:
        held = newest.get(change.campaign.name)
        if held is None or held.version < change.version:
            newest[change.campaign.name] = change
    return list(newest.values())


StopCallback = Callable[[], Awaitable[None]]


@dataclass
class ServiceHost:
    """One running service: its gRPC server and infrastructure, shut down in order."""

    name: str
    infra: Infrastructure
    grpc: GrpcServer
    # Extra clean-up (background loops, channels, HTTP sessions): after serving and consuming
    # stop, before the outbox flushes and NATS drains.
    on_stop: list[StopCallback] = field(default_factory=list)
    metrics_server: MetricsServer | None = None
    _health_task: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls,
        name: str,
        infra: Infrastructure,
        service_names: Sequence[str],
        register: Registrar,
        port: int,
        permissions: dict[str, Permission],
    ) -> ServiceHost:
        server = GrpcServer(service_names, register, infra.authenticator, permissions, infra.metrics)
        metrics = MetricsServer(infra.metrics, [infra.sample_metrics])
        try:
            await server.start(infra.settings.host, port, f"HERALD_{name.upper()}_PORT")
            metrics_port = await metrics.start(infra.settings.host, infra.settings.metrics_ports.get(name, 0))
        except Exception:
            await server.stop(0)
            await infra.close()
            raise
        log.info("service_started", service=name, port=server.port, metrics_port=metrics_port)
        host = cls(name, infra, server, metrics_server=metrics)
        host._health_task = asyncio.create_task(host._watch_health(), name=f"health:{name}")
        return host

    async def _watch_health(self) -> None:
        """Reports NOT_SERVING while the service cannot do its work, so probes and operators see it,
        with the reason logged; each background loop also has a health status of its own
        (`loop.<name>`)."""
        serving = True
        loops: dict[str, bool] = {}
        while True:
            await asyncio.sleep(HEALTH_CHECK_INTERVAL_SECONDS)
            problems = await self.infra.problems()
            if (not problems) != serving:
                serving = not problems
                await self.grpc.set_serving(serving)
                log.warning("health_changed", service=self.name, serving=serving, problems=problems)
            for loop in self.infra.loops:
                if loops.get(loop.name) != (not loop.failing):
                    loops[loop.name] = not loop.failing
                    await self.grpc.set_component(f"loop.{loop.name}", not loop.failing)

    @property
    def port(self) -> int:
        return self.grpc.port

    async def stop(self) -> None:
        self.infra.stopping.set()
        await cancel_and_wait(self._health_task)
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        await self.grpc.stop(self.infra.settings.shutdown_grace_seconds)
        await self.infra.stop_consumers()
        for callback in self.on_stop:
            await callback()
        await self.infra.close()
        log.info("service_stopped", service=self.name)


def run(start: Callable[[Settings], Awaitable[ServiceHost]]) -> None:
    """Process entry point: start the service from the environment, serve until SIGTERM/SIGINT."""
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    # Off unless the OTEL_* variables ask for an exporter.
    tracing.configure_from_env(start.__module__.split(".")[0].removeprefix("herald_"))

    async def serve() -> None:
        try:
            host = await start(settings)
        except (PortInUse, SecretKeysError, StartupError) as error:
            log.error("cannot_start", error=str(error))
            raise SystemExit(f"herald: {error}") from None
        # What start-up built lives as long as the process: kept out of every later garbage
        # collection, which then only walks the objects the work itself makes.
        gc.freeze()
        await wait_for_termination_signal()
        await host.stop()
        tracing.shutdown()  # sends the spans still buffered

    # uvloop: the same asyncio API with a faster loop, which the hot paths (gRPC, HTTP to the
    # destinations, PostgreSQL) spend much of their time in.
    uvloop.run(serve())
