"""The platform under test: a fresh database and NATS namespace, and the four services running."""

from __future__ import annotations

import contextlib
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from types import ModuleType
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import nats

from herald.accounts.v1 import account_service_pb2 as accounts_pb
from herald.accounts.v1 import account_service_pb2_grpc as accounts_grpc
from herald.campaign.v1 import campaign_service_pb2_grpc as campaign_grpc
from herald.dispatch.v1 import dispatch_service_pb2_grpc as dispatch_grpc
from herald.scheduler.v1 import scheduler_service_pb2_grpc as scheduler_grpc
from herald.segmentation.v1 import segmentation_service_pb2_grpc as segmentation_grpc
from herald_campaign import main as campaign_main
from herald_common.auth import api_key_credentials
from herald_common.bus import Subjects
from herald_common.embedded import free_port
from herald_common.runtime import ServiceHost
from herald_common.secret_box import new_key_setting
from herald_common.settings import DEFAULT_METRICS_PORTS, Settings
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
            # Several services (and replicas) share the machine: each on a free port.
            metrics_ports=dict.fromkeys(DEFAULT_METRICS_PORTS, 0),
            shutdown_grace_seconds=0.5,
            ack_wait_seconds=3.0,
            # A message that keeps failing is dead-lettered within seconds, not minutes.
            max_deliveries=4,
            redelivery_base_seconds=0.2,
            allowed_destination_networks=("127.0.0.0/8", "::1/128"),
            secret_keys=new_key_setting("test"),
            service_token=secrets.token_urlsafe(24),
            bootstrap_token=secrets.token_urlsafe(24),
            # Tests call as fast as they can; quotas are tested with accounts' own limits.
            account_requests_per_second=5000.0,
            # Providers that answer late are tested without waiting the production 15 s.
            sms_answer_timeout_seconds=2.0,
            # Twice how long a yes to "may I still send" lasts: dispatch refuses one within it.
            sms_settle_seconds=2.0,
            # Small enough that the isolation test's hanging destination could fill it all.
            dispatch_max_in_flight=64,
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


def keyed_channel(address: str, key: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, interceptors=api_key_credentials(key))


async def create_account(
    campaign_address: str,
    bootstrap_token: str,
    name: str = "test account",
    quota: accounts_pb.Quota | None = None,
) -> tuple[str, str]:
    """(account name, admin key) of a new account, made as an operator does."""
    async with grpc.aio.insecure_channel(campaign_address) as channel:
        stub = accounts_grpc.AccountServiceStub(channel)
        created = await stub.CreateAccount(
            accounts_pb.CreateAccountRequest(account=accounts_pb.Account(display_name=name, quota=quota)),
            metadata=(("authorization", f"Bootstrap {bootstrap_token}"),),
        )
    return created.account.name, created.key


@dataclass
class Clients:
    """Stubs of every service, calling with one API key."""

    channels: list[grpc.aio.Channel]
    accounts: accounts_grpc.AccountServiceAsyncStub
    segmentation: segmentation_grpc.SegmentationServiceAsyncStub
    campaigns: campaign_grpc.CampaignServiceAsyncStub
    scheduler: scheduler_grpc.SchedulerServiceAsyncStub
    dispatch: dispatch_grpc.DispatchServiceAsyncStub

    @classmethod
    def open(cls, addresses: dict[str, str], key: str) -> Clients:
        channels = {name: keyed_channel(address, key) for name, address in addresses.items()}
        return cls(
            list(channels.values()),
            accounts_grpc.AccountServiceStub(channels["campaign"]),
            segmentation_grpc.SegmentationServiceStub(channels["segmentation"]),
            campaign_grpc.CampaignServiceStub(channels["campaign"]),
            scheduler_grpc.SchedulerServiceStub(channels["scheduler"]),
            dispatch_grpc.DispatchServiceStub(channels["dispatch"]),
        )

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


@dataclass
class Platform:
    """The four services, running, and clients for them with an admin key of one account."""

    settings: Settings
    hosts: dict[str, ServiceHost]
    account: str
    admin_key: str
    clients: Clients

    @property
    def accounts(self) -> accounts_grpc.AccountServiceAsyncStub:
        return self.clients.accounts

    @property
    def segmentation(self) -> segmentation_grpc.SegmentationServiceAsyncStub:
        return self.clients.segmentation

    @property
    def campaigns(self) -> campaign_grpc.CampaignServiceAsyncStub:
        return self.clients.campaigns

    @property
    def scheduler(self) -> scheduler_grpc.SchedulerServiceAsyncStub:
        return self.clients.scheduler

    @property
    def dispatch(self) -> dispatch_grpc.DispatchServiceAsyncStub:
        return self.clients.dispatch

    def address(self, service: str) -> str:
        return f"127.0.0.1:{self.hosts[service].port}"

    async def restart_scheduler(self) -> None:
        """Stops the scheduler and starts it again on the same port, as a redeploy would."""
        await self.hosts["scheduler"].stop()
        self.hosts["scheduler"] = await scheduler_main.start(self.settings)

    async def restart_all(self) -> None:
        """Stops every service, then starts them again on the same ports, as a full redeploy would."""
        for name in STOP_ORDER:
            await self.hosts[name].stop()
        for name in reversed(STOP_ORDER):
            self.hosts[name] = await MAINS[name].start(self.settings)

    @property
    def web_url(self) -> str:
        """The web SDK's API (dispatch's web pop-up worker)."""
        return f"http://127.0.0.1:{self.settings.web_port}"

    @property
    def addresses(self) -> dict[str, str]:
        return {name: self.address(name) for name in self.hosts}


STOP_ORDER = ("scheduler", "campaign", "dispatch", "segmentation")
MAINS: dict[str, ModuleType] = {
    "segmentation": segmentation_main,
    "dispatch": dispatch_main,
    "campaign": campaign_main,
    "scheduler": scheduler_main,
}


@contextlib.asynccontextmanager
async def running_platform(settings: Settings) -> AsyncIterator[Platform]:
    """All four services on free 127.0.0.1 ports, wired to each other."""
    # Every service may call every other (campaign checks references, segmentation and dispatch
    # ask campaign whether what they delete is in use): ports are chosen before any starts.
    ports: dict[str, int] = {}
    for name in ("segmentation", "dispatch", "campaign", "scheduler", "receipts", "web"):
        ports[name] = free_port(avoid=set(ports.values()))  # none bound yet: all must differ
    receipts_port = ports.pop("receipts")
    web_port = ports.pop("web")
    wired = replace(
        settings,
        ports=ports,
        addresses={name: f"127.0.0.1:{port}" for name, port in ports.items()},
        receipts_port=receipts_port,
        web_port=web_port,
    )
    hosts: dict[str, ServiceHost] = {}
    for name in reversed(STOP_ORDER):
        hosts[name] = await MAINS[name].start(wired)
    addresses = {name: f"127.0.0.1:{h.port}" for name, h in hosts.items()}
    account, admin_key = await create_account(addresses["campaign"], settings.bootstrap_token)
    clients = Clients.open(addresses, admin_key)
    platform = Platform(settings=wired, hosts=hosts, account=account, admin_key=admin_key, clients=clients)
    try:
        yield platform
    finally:
        await clients.close()
        for name in STOP_ORDER:
            await platform.hosts[name].stop()
