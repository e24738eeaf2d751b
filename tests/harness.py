"""The platform under test: a fresh database and NATS namespace, and the four services running."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import nats

from herald.campaign.v1 import campaign_service_pb2_grpc as campaign_grpc
from herald.dispatch.v1 import dispatch_service_pb2_grpc as dispatch_grpc
from herald.scheduler.v1 import scheduler_service_pb2_grpc as scheduler_grpc
from herald.segmentation.v1 import segmentation_service_pb2_grpc as segmentation_grpc
from herald_campaign import main as campaign_main
from herald_common.bus import Subjects
from herald_common.embedded import free_port
from herald_common.runtime import ServiceHost
from herald_common.secret_box import new_key_setting
from herald_common.settings import Settings
from herald_dispatch import main as dispatch_main
from herald_scheduler import main as scheduler_main
from herald_segmentation import main as segmentation_main


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme.split("+")[0], parts.netloc, f"/{database}", parts.query, ""))


def admin_url(database_url: str) -> str:
    """The same server's maintenance database, for operations on a test database."""
    return _with_database(database_url, "postgres")


def database_name(database_url: str) -> str:
    return urlsplit(database_url).path.lstrip("/")


@contextlib.asynccontextmanager
async def fresh_settings(admin_url: str, nats_url: str) -> AsyncIterator[Settings]:
    """Settings for a new database and NATS namespace, both removed on exit."""
    suffix = uuid.uuid4().hex[:12]
    database = f"herald_test_{suffix}"
    namespace = f"test{suffix}"
    admin = await asyncpg.connect(
        _with_database(admin_url, urlsplit(admin_url).path.lstrip("/") or "postgres")
    )
    await admin.execute(f'CREATE DATABASE "{database}"')
    try:
        yield Settings(
            database_url=_with_database(admin_url, database),
            nats_url=nats_url,
            namespace=namespace,
            shutdown_grace_seconds=0.5,
            ack_wait_seconds=3.0,
            allowed_destination_networks=("127.0.0.0/8", "::1/128"),
            secret_keys=new_key_setting("test"),
        )
    finally:
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
    segmentation: segmentation_grpc.SegmentationServiceAsyncStub
    campaigns: campaign_grpc.CampaignServiceAsyncStub
    scheduler: scheduler_grpc.SchedulerServiceAsyncStub
    dispatch: dispatch_grpc.DispatchServiceAsyncStub

    def address(self, service: str) -> str:
        return f"127.0.0.1:{self.hosts[service].port}"


@contextlib.asynccontextmanager
async def running_platform(settings: Settings) -> AsyncIterator[Platform]:
    """All four services on free 127.0.0.1 ports, wired to each other."""
    # Every service may call every other (campaign checks references, segmentation and dispatch
    # ask campaign whether what they delete is in use): ports are chosen before any starts.
    ports = {name: free_port() for name in ("segmentation", "dispatch", "campaign", "scheduler")}
    wired = replace(
        settings,
        ports=ports,
        addresses={name: f"127.0.0.1:{port}" for name, port in ports.items()},
    )
    hosts: dict[str, ServiceHost] = {}
    hosts["segmentation"] = await segmentation_main.start(wired)
    hosts["dispatch"] = await dispatch_main.start(wired)
    hosts["campaign"] = await campaign_main.start(wired)
    hosts["scheduler"] = await scheduler_main.start(wired)
    channels = {name: grpc.aio.insecure_channel(f"127.0.0.1:{h.port}") for name, h in hosts.items()}
    try:
        yield Platform(
            settings=wired,
            hosts=hosts,
            segmentation=segmentation_grpc.SegmentationServiceStub(channels["segmentation"]),
            campaigns=campaign_grpc.CampaignServiceStub(channels["campaign"]),
            scheduler=scheduler_grpc.SchedulerServiceStub(channels["scheduler"]),
            dispatch=dispatch_grpc.DispatchServiceStub(channels["dispatch"]),
        )
    finally:
        for channel in channels.values():
            await channel.close()
        for name in ("scheduler", "campaign", "dispatch", "segmentation"):
            await hosts[name].stop()
