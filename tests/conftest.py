"""Real PostgreSQL, real NATS JetStream, real gRPC servers on 127.0.0.1.

With DATABASE_URL and NATS_URL set the tests use those servers; otherwise they start embedded
ones. Every test session gets its own database and NATS namespace, removed at the end, so no
state carries over between runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import nats
import pytest
from herald.campaign.v1 import campaign_service_pb2_grpc as campaign_grpc
from herald.dispatch.v1 import dispatch_service_pb2_grpc as dispatch_grpc
from herald.scheduler.v1 import scheduler_service_pb2_grpc as scheduler_grpc
from herald.segmentation.v1 import segmentation_service_pb2_grpc as segmentation_grpc
from herald_campaign import main as campaign_main
from herald_common.bus import Subjects
from herald_common.embedded import EmbeddedInfrastructure
from herald_common.logging import configure_logging
from herald_common.runtime import ServiceHost
from herald_common.settings import Settings
from herald_dispatch import main as dispatch_main
from herald_scheduler import main as scheduler_main
from herald_segmentation import main as segmentation_main

from tests.fakes.segment_api import SegmentApi


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme.split("+")[0], parts.netloc, f"/{database}", parts.query, ""))


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(PostgreSQL URL, NATS URL) of the servers the tests run against."""
    configure_logging(os.environ.get("LOG_LEVEL", "warning"))
    database_url, nats_url = os.environ.get("DATABASE_URL"), os.environ.get("NATS_URL")
    if database_url and nats_url:
        yield database_url, nats_url
        return
    embedded = EmbeddedInfrastructure(Path(tmp_path_factory.mktemp("embedded")))
    embedded.start()
    try:
        yield embedded.database_url, embedded.nats_url
    finally:
        embedded.stop()


@pytest.fixture(scope="session")
async def settings(servers: tuple[str, str]) -> AsyncIterator[Settings]:
    """Settings pointing at a fresh database and a fresh NATS namespace."""
    admin_url, nats_url = servers
    suffix = uuid.uuid4().hex[:12]
    database = f"herald_test_{suffix}"
    admin = await asyncpg.connect(
        _with_database(admin_url, urlsplit(admin_url).path.lstrip("/") or "postgres")
    )
    await admin.execute(f'CREATE DATABASE "{database}"')
    namespace = f"test{suffix}"
    yield Settings(
        database_url=_with_database(admin_url, database),
        nats_url=nats_url,
        namespace=namespace,
        shutdown_grace_seconds=0.5,
    )
    await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    await admin.close()
    connection = await nats.connect(nats_url)
    js = connection.jetstream()
    for stream in Subjects(namespace).streams():
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(stream)
    await connection.close()


@dataclass
class Platform:
    """The four services, running, and clients for them."""

    settings: Settings
    hosts: dict[str, ServiceHost]
    channels: list[grpc.aio.Channel]
    segmentation: segmentation_grpc.SegmentationServiceAsyncStub
    campaigns: campaign_grpc.CampaignServiceAsyncStub
    scheduler: scheduler_grpc.SchedulerServiceAsyncStub
    dispatch: dispatch_grpc.DispatchServiceAsyncStub

    def address(self, service: str) -> str:
        return f"127.0.0.1:{self.hosts[service].port}"


@pytest.fixture(scope="session")
async def platform(settings: Settings) -> AsyncIterator[Platform]:
    hosts: dict[str, ServiceHost] = {}
    hosts["segmentation"] = await segmentation_main.start(settings, port=0)
    hosts["dispatch"] = await dispatch_main.start(settings, port=0)
    wired = Settings(
        **{
            **settings.__dict__,
            "addresses": {
                "segmentation": f"127.0.0.1:{hosts['segmentation'].port}",
                "dispatch": f"127.0.0.1:{hosts['dispatch'].port}",
            },
        }
    )
    hosts["campaign"] = await campaign_main.start(wired, port=0)
    hosts["scheduler"] = await scheduler_main.start(wired, port=0)
    channels = {name: grpc.aio.insecure_channel(f"127.0.0.1:{h.port}") for name, h in hosts.items()}
    yield Platform(
        settings=wired,
        hosts=hosts,
        channels=list(channels.values()),
        segmentation=segmentation_grpc.SegmentationServiceStub(channels["segmentation"]),
        campaigns=campaign_grpc.CampaignServiceStub(channels["campaign"]),
        scheduler=scheduler_grpc.SchedulerServiceStub(channels["scheduler"]),
        dispatch=dispatch_grpc.DispatchServiceStub(channels["dispatch"]),
    )
    for channel in channels.values():
        await channel.close()
    for name in ("scheduler", "campaign", "dispatch", "segmentation"):
        await hosts[name].stop()


@pytest.fixture
async def segment_api() -> AsyncIterator[SegmentApi]:
    api = SegmentApi(write_keys={f"wk_{uuid.uuid4().hex}"})
    await api.start()
    yield api
    await api.stop()


async def eventually(
    check: Callable[[], Awaitable[bool]], within: float = 30.0, interval: float = 0.1
) -> None:
    """Waits until `check` holds; fails the test with a clear message otherwise."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        if await check():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(interval)
