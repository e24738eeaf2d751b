"""The fault suite: Herald deployed as separate processes (two dispatch replicas) against a
PostgreSQL and a nats-server of its own, exporting 20,000 users to the fake Segment API, and
texting 5,000 users through a provider group (the Twilio fake, then the Vonage fake), while one
part after another is killed, frozen or made to fail.

Every case asserts what the campaign's owner would check: every member received; for the export,
a duplicate only where Segment's messageId makes it harmless and Herald counted it as resent; for
SMS, no phone texted twice, counted at the fakes by (phone, text); the campaign COMPLETED with
exact stats; and nothing done by hand (a killed service is restarted by the supervisor, as
Kubernetes would).

`make test` runs the cases marked as the fast subset; `make chaos` runs all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import asyncpg
import grpc
import nats
import pytest

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.campaign.v1 import campaign_service_pb2_grpc as campaign_grpc
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald.dispatch.v1 import dispatch_service_pb2_grpc as dispatch_grpc
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald.segmentation.v1 import segmentation_service_pb2_grpc as segmentation_grpc
from herald_common.bus import Subjects
from herald_common.grpc_server import health_status
from herald_common.secret_box import new_key_setting
from herald_sandbox.segment_api import SegmentApi
from herald_sandbox.twilio_api import TwilioApi
from herald_sandbox.vonage_api import VonageApi
from tests.harness import create_account, keyed_channel
from tests.helpers import busiest_second, condition, matching, segment_export_campaign, user
from tests.processes import NatsCluster, OwnNats, OwnPostgres, ServiceProcesses

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]

AUDIENCE = 20_000
SMS_AUDIENCE = 5_000
ACK_WAIT_SECONDS = 5
SETTINGS = {
    "HERALD_SMS_ANSWER_TIMEOUT_SECONDS": "5",
    "HERALD_SMS_SETTLE_SECONDS": "2",
    "HERALD_ACK_WAIT_SECONDS": str(ACK_WAIT_SECONDS),
    "HERALD_RUN_LEASE_SECONDS": "10",
    "HERALD_SHUTDOWN_GRACE_SECONDS": "2",
    "HERALD_REDELIVERY_BASE_SECONDS": "1",
    "HERALD_ALLOWED_DESTINATION_NETWORKS": "127.0.0.0/8",
    "HERALD_NAMESPACE": "chaos",
    "HERALD_SECRET_KEYS": new_key_setting("chaos"),
    "HERALD_SERVICE_TOKEN": secrets.token_urlsafe(24),
    "HERALD_BOOTSTRAP_TOKEN": secrets.token_urlsafe(24),
    "LOG_LEVEL": "warning",
}


@dataclass
class Cluster:
    postgres: OwnPostgres
    nats: OwnNats | NatsCluster
    services: ServiceProcesses
    database_url: str
    segmentation: segmentation_grpc.SegmentationServiceAsyncStub
    campaigns: campaign_grpc.CampaignServiceAsyncStub
    dispatch: dispatch_grpc.DispatchServiceAsyncStub


@contextlib.asynccontextmanager
async def _deployed(
    root: Path, nats_server: OwnNats | NatsCluster, settings: dict[str, str] | None = None
) -> AsyncIterator[Cluster]:
    """Herald as separate processes (two dispatch replicas) over a PostgreSQL of its own and this
    NATS, with an account's clients."""
    postgres = OwnPostgres(root / "postgres")
    await asyncio.to_thread(postgres.init)
    postgres.start()
    await postgres.wait_ready()
    admin = await asyncpg.connect(postgres.url)
    await admin.execute("CREATE DATABASE herald")
    await admin.close()
    database_url = postgres.url.rsplit("/", 1)[0] + "/herald"
    env = {
        **os.environ,
        **SETTINGS,
        **(settings or {}),
        "DATABASE_URL": database_url,
        "NATS_URL": nats_server.url,
    }
    services = ServiceProcesses(env, root / "logs", replicas={"dispatch": 2})
    channels: list[grpc.aio.Channel] = []
    try:
        await services.start()
        _, key = await create_account(services.address("campaign"), SETTINGS["HERALD_BOOTSTRAP_TOKEN"])
        channels = [keyed_channel(services.address(s), key) for s in ("segmentation", "campaign", "dispatch")]
        yield Cluster(
            postgres,
            nats_server,
            services,
            database_url,
            segmentation_grpc.SegmentationServiceStub(channels[0]),
            campaign_grpc.CampaignServiceStub(channels[1]),
            dispatch_grpc.DispatchServiceStub(channels[2]),
        )
    finally:
        for channel in channels:
            await channel.close()
        await services.stop()
        nats_server.stop()
        postgres.stop()


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    root = tmp_path_factory.mktemp("chaos")
    nats_server = OwnNats(root / "nats")
    nats_server.start()
    async with _deployed(root, nats_server) as deployed:
        yield deployed


class Delivery(Protocol):
    """A campaign under way, as the faults see it: how much has arrived, and its destination's
    faults on demand."""

    campaign: str
    audience: int

    def received(self) -> int: ...

    def fail_for(self, seconds: float, status: int = 500, retry_after: float | None = None) -> None: ...

    def hang_for(self, seconds: float) -> None: ...


@dataclass
class Export:
    campaign: str
    users: set[str]
    segment_api: SegmentApi
    audience: int = AUDIENCE

    def received(self) -> int:
        return len(self.segment_api.events)

    def fail_for(self, seconds: float, status: int = 500, retry_after: float | None = None) -> None:
        self.segment_api.fail_for(seconds, status, retry_after)

    def hang_for(self, seconds: float) -> None:
        self.segment_api.hang_for(seconds)


@dataclass
class Texting:
    """An SMS campaign through a group of Twilio (throttled to 500 messages a second, so the
    faults land mid-campaign), then Vonage."""

    campaign: str
    texts: dict[str, str]  # phone: the text each member must get
    twilio: TwilioApi
    vonage: VonageApi
    audience: int = SMS_AUDIENCE

    def arrived(self) -> list[tuple[str, str]]:
        return [(m.to, m.body) for m in self.twilio.messages] + [
            ("+" + m.to, m.text) for m in self.vonage.messages
        ]

    def received(self) -> int:
        return len(self.twilio.messages) + len(self.vonage.messages)

    def fail_for(self, seconds: float, status: int = 500, retry_after: float | None = None) -> None:
        self.twilio.fail_for(seconds, status, retry_after)

    def hang_for(self, seconds: float) -> None:
        self.twilio.hang_for(seconds)


async def _start_export(cluster: Cluster, segment_api: SegmentApi, audience: int = AUDIENCE) -> Export:
    tag = uuid.uuid4().hex[:8]
    users = [f"{tag}-{i:05d}" for i in range(audience)]
    for offset in range(0, audience, 1000):
        await cluster.segmentation.UpsertUsers(
            segmentation_pb.UpsertUsersRequest(
                users=[
                    user(user_id, cohort=tag, first_name=f"U{i}", plan="gold", code=f"C{i % 97}")
                    for i, user_id in enumerate(users[offset : offset + 1000], start=offset)
                ]
            )
        )
    segment = await cluster.segmentation.CreateSegment(
        segmentation_pb.CreateSegmentRequest(
            segment=segmentation_pb.Segment(
                display_name=f"chaos {tag}",
                filter=matching(condition("cohort", "EQUALS", tag)),
            )
        )
    )
    [write_key] = segment_api.write_keys
    destination = await cluster.dispatch.CreateDestination(
        dispatch_pb.CreateDestinationRequest(
            destination=dispatch_pb.Destination(
                display_name=f"chaos {tag}",
                segment=dispatch_pb.SegmentConfig(write_key=write_key, endpoint_url=segment_api.url),
            )
        )
    )
    created = await cluster.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(campaign=segment_export_campaign(segment.name, destination.name))
    )
    await cluster.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created.name))
    return Export(created.name, set(users), segment_api, audience)


async def _until(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within}s")
        await asyncio.sleep(0.05)


async def _start_texting(cluster: Cluster, twilio: TwilioApi, vonage: VonageApi) -> Texting:
    tag = uuid.uuid4().hex[:8]
    phones = [f"+1415{i:07d}" for i in range(SMS_AUDIENCE)]
    for offset in range(0, SMS_AUDIENCE, 1000):
        members = []
        for i in range(offset, offset + 1000):
            member = user(f"{tag}-{i:05d}", cohort=tag, first_name=f"U{i}")
            member.phone = phones[i]
            members.append(member)
        await cluster.segmentation.UpsertUsers(segmentation_pb.UpsertUsersRequest(users=members))
    segment = await cluster.segmentation.CreateSegment(
        segmentation_pb.CreateSegmentRequest(
            segment=segmentation_pb.Segment(
                display_name=f"chaos sms {tag}", filter=matching(condition("cohort", "EQUALS", tag))
            )
        )
    )
    twilio_config = dispatch_pb.TwilioConfig(
        account_sid=twilio.account_sid,
        auth_token=twilio.auth_token,
        endpoint_url=twilio.url,
        requests_per_second=500,
    )
    setattr(twilio_config, "from", "+14155550000")
    providers: list[str] = []
    for config in (
        {"twilio": twilio_config},
        {
            "vonage": dispatch_pb.VonageConfig(
                api_key=vonage.api_key, api_secret=vonage.api_secret, sender="Herald", endpoint_url=vonage.url
            )
        },
    ):
        created = await cluster.dispatch.CreateDestination(
            dispatch_pb.CreateDestinationRequest(
                destination=dispatch_pb.Destination(display_name=f"chaos {tag}", **config)
            )
        )
        providers.append(created.name)
    group = await cluster.dispatch.CreateDestination(
        dispatch_pb.CreateDestinationRequest(
            destination=dispatch_pb.Destination(
                display_name=f"chaos group {tag}",
                sms_provider_group=dispatch_pb.SmsProviderGroupConfig(destinations=providers),
            )
        )
    )
    created_campaign = await cluster.campaigns.CreateCampaign(
        campaign_pb.CreateCampaignRequest(
            campaign=campaign_pb.Campaign(
                display_name=f"chaos sms {tag}",
                audience=campaign_pb.Audience(segment=segment.name),
                destination=group.name,
                schedule=campaign_pb.Schedule(send_now=campaign_pb.SendNow()),
                sms=campaign_pb.SmsContent(body="Hi {{ profile.first_name }}, your order shipped"),
            )
        )
    )
    await cluster.campaigns.PublishCampaign(campaign_pb.PublishCampaignRequest(name=created_campaign.name))
    texts = {phone: f"Hi U{i}, your order shipped" for i, phone in enumerate(phones)}
    return Texting(created_campaign.name, texts, twilio, vonage)


async def _received(export: Delivery, count: int) -> None:
    async def enough() -> bool:
        return export.received() >= count

    await _until(enough, 120, f"{count} deliveries at the destination")


async def _planning(cluster: Cluster, export: Delivery) -> None:
    """Waits until the run has planned its first page: the fault then lands mid-run."""

    async def started() -> bool:
        connection = await asyncpg.connect(cluster.database_url)
        try:
            targeted = await connection.fetchval(
                "SELECT max(targeted) FROM scheduler.runs WHERE campaign = $1", export.campaign
            )
        finally:
            await connection.close()
        return bool(targeted)

    await _until(started, 120, "run planning")


async def _completed(cluster: Cluster, export: Delivery, within: float = 400) -> campaign_pb.CampaignStats:
    """The campaign's stats once it is COMPLETED; services may be restarting meanwhile."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            got = await cluster.campaigns.GetCampaign(
                campaign_pb.GetCampaignRequest(name=export.campaign), timeout=5
            )
            if got.state == campaign_pb.State.STATE_FAILED:
                raise AssertionError(f"campaign FAILED: {got.failure_reason}")
            if got.state == campaign_pb.State.STATE_COMPLETED:
                return await cluster.campaigns.GetCampaignStats(
                    campaign_pb.GetCampaignStatsRequest(name=f"{export.campaign}/stats"), timeout=5
                )
        except grpc.aio.AioRpcError as error:
            if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
        await asyncio.sleep(0.5)
    raise AssertionError(
        f"campaign not COMPLETED within {within}s ({export.received()} of {export.audience} received)\n"
        + cluster.services.logs()
    )


def _assert_everyone_received_once(export: Export, stats: campaign_pb.CampaignStats) -> None:
    received = {event["userId"] for event in export.segment_api.events.values()}
    missing = export.users - received
    assert not missing, f"{len(missing)} members never received, e.g. {sorted(missing)[:3]}"
    assert received == export.users
    # One event per member: the messageId is the member's delivery id, reused on every retry.
    assert len(export.segment_api.events) == export.audience
    assert (stats.targeted, stats.sent, stats.failed, stats.skipped, stats.unknown) == (
        export.audience,
        export.audience,
        0,
        0,
        0,
    ), stats
    # Every delivery Segment got more than once was sent again knowingly, and counted.
    duplicated = len(export.segment_api.duplicated_ids)
    assert duplicated <= stats.resent, (duplicated, stats.resent)
    assert not stats.waiting_reason


def _assert_everyone_texted_once(texting: Texting, stats: campaign_pb.CampaignStats) -> None:
    arrived = Counter(texting.arrived())
    twice = [pair for pair, count in arrived.items() if count > 1]
    assert not twice, f"{len(twice)} phones texted twice, e.g. {twice[:3]}"
    missing = set(texting.texts.items()) - set(arrived)
    assert not missing, f"{len(missing)} members never texted, e.g. {sorted(missing)[:3]}"
    assert sum(arrived.values()) == SMS_AUDIENCE
    # Twilio's 500 requests a second held in every rolling second, across both replicas.
    assert busiest_second(texting.twilio.arrivals) <= 500
    assert (stats.targeted, stats.sent, stats.failed, stats.skipped, stats.unknown, stats.resent) == (
        SMS_AUDIENCE,
        SMS_AUDIENCE,
        0,
        0,
        0,
        0,
    ), stats


Fault = Callable[[Cluster, Delivery], Awaitable[None]]


async def _kill_services(cluster: Cluster, service: str) -> None:
    for process in cluster.services.of(service):
        process.kill()  # the supervisor starts it again


async def dispatch_killed(cluster: Cluster, export: Delivery) -> None:
    await _received(export, export.audience // 10)
    await _kill_services(cluster, "dispatch")


async def scheduler_killed(cluster: Cluster, export: Delivery) -> None:
    await _planning(cluster, export)
    await _kill_services(cluster, "scheduler")


async def campaign_killed(cluster: Cluster, export: Delivery) -> None:
    await _received(export, export.audience // 10)
    await _kill_services(cluster, "campaign")


async def segmentation_killed(cluster: Cluster, export: Delivery) -> None:
    await _planning(cluster, export)
    await _kill_services(cluster, "segmentation")


async def nats_killed(cluster: Cluster, export: Delivery) -> None:
    await _received(export, export.audience // 10)
    assert isinstance(cluster.nats, OwnNats)
    # Off the event loop, which also runs the fake destinations: a blocked loop would hold their
    # requests back and then count them all at once.
    await asyncio.to_thread(cluster.nats.kill)
    await asyncio.sleep(3)
    await asyncio.to_thread(cluster.nats.start)  # same port, same store


async def postgres_killed(cluster: Cluster, export: Delivery) -> None:
    await _received(export, export.audience // 10)
    await asyncio.to_thread(cluster.postgres.kill)
    # While the database is away the services say so, for probes and operators.
    address = cluster.services.address("campaign")

    async def not_serving() -> bool:
        return await health_status(address) == "NOT_SERVING"

    await _until(not_serving, 15, "campaign NOT_SERVING while PostgreSQL is down")
    await asyncio.to_thread(cluster.postgres.start)  # crash recovery on the same data


async def destination_fails_for_20s(cluster: Cluster, export: Delivery) -> None:
    await _received(export, export.audience // 10)
    export.fail_for(20, status=500)


async def destination_rate_limits(cluster: Cluster, export: Delivery) -> None:
    await _received(export, export.audience // 10)
    export.fail_for(6, status=429, retry_after=2)


async def destination_hangs_for_60s(cluster: Cluster, export: Delivery) -> None:
    await _received(export, export.audience // 10)
    export.hang_for(60)


async def dispatch_terminated(cluster: Cluster, export: Delivery) -> None:
    """A rolling restart: SIGTERM, then the supervisor starts it again."""
    await _received(export, export.audience // 10)
    await asyncio.gather(*(asyncio.to_thread(p.terminate) for p in cluster.services.of("dispatch")))


async def dispatch_frozen_past_ack_wait(cluster: Cluster, export: Delivery) -> None:
    await _received(export, export.audience // 10)
    frozen = cluster.services.of("dispatch")[0]
    frozen.signal(signal.SIGSTOP)
    await asyncio.sleep(ACK_WAIT_SECONDS * 3)  # its batches go to the other replica meanwhile
    frozen.signal(signal.SIGCONT)


FAST = [dispatch_killed, postgres_killed, nats_killed]
SMS_FAST = [dispatch_killed, dispatch_terminated]
FULL = [
    scheduler_killed,
    campaign_killed,
    segmentation_killed,
    destination_fails_for_20s,
    destination_rate_limits,
    destination_hangs_for_60s,
    dispatch_frozen_past_ack_wait,
]


@pytest.mark.parametrize(
    "fault",
    [pytest.param(f, id=f.__name__) for f in FAST]
    + [pytest.param(f, id=f.__name__, marks=pytest.mark.full_chaos) for f in FULL],
)
async def test_export_survives(cluster: Cluster, fault: Fault) -> None:
    await cluster.services.wait_serving()
    segment_api = SegmentApi(write_keys={f"wk_{uuid.uuid4().hex}"})
    await segment_api.start()
    try:
        export = await _start_export(cluster, segment_api)
        await fault(cluster, export)
        stats = await _completed(cluster, export)
        _assert_everyone_received_once(export, stats)
    finally:
        await segment_api.stop()


@pytest.mark.parametrize(
    "fault",
    [pytest.param(f, id=f.__name__) for f in SMS_FAST]
    + [
        pytest.param(f, id=f.__name__, marks=pytest.mark.full_chaos)
        for f in [*FAST, *FULL]
        if f not in SMS_FAST
    ],
)
async def test_sms_survives(cluster: Cluster, fault: Fault) -> None:
    await cluster.services.wait_serving()
    twilio = TwilioApi("AC" + uuid.uuid4().hex, secrets.token_hex(16))
    vonage = VonageApi("a1b2c3d4", "s3cr3tS3cr3tAbCd")
    await twilio.start()
    await vonage.start()
    try:
        texting = await _start_texting(cluster, twilio, vonage)
        await fault(cluster, texting)
        stats = await _completed(cluster, texting)
        _assert_everyone_texted_once(texting, stats)
    finally:
        await twilio.stop()
        await vonage.stop()


# --- a clustered NATS --------------------------------------------------------------------------

CLUSTER_AUDIENCE = 10_000


async def _jetstream_ready(url: str) -> None:
    """Waits until the cluster has elected its JetStream meta leader."""
    client = await nats.connect(url.split(","))
    try:
        js = client.jetstream()

        async def ready() -> bool:
            try:
                await js.account_info()
            except Exception:
                return False
            return True

        await _until(ready, 30, "JetStream cluster ready")
    finally:
        await client.close()


async def _stream_leader(url: str, stream: str) -> str:
    """The server leading the stream (asked again while the cluster settles after a restart)."""
    client = await nats.connect(url.split(","))
    leader = ""
    try:
        js = client.jetstream()

        async def known() -> bool:
            nonlocal leader
            try:
                info = await js.stream_info(stream)
            except Exception:
                return False
            assert info.cluster is not None and len(info.cluster.replicas or []) == 2, info.cluster
            leader = str(info.cluster.leader or "")
            return bool(leader)

        await _until(known, 30, f"a leader of {stream}")
        return leader
    finally:
        await client.close()


async def test_an_export_survives_a_node_and_then_the_stream_leader_of_a_three_node_cluster(
    tmp_path: Path,
) -> None:
    """Three nats-servers on loopback, streams replicated on all three (HERALD_STREAM_REPLICAS=3).
    During an export one node is killed and restarted, then the leader of the stream the
    deliveries go through: no member is missed, and a member gets a second copy only when Herald
    counted it resent (Segment drops it by its messageId)."""
    nodes = NatsCluster(tmp_path / "nats")
    nodes.start_all()
    await _jetstream_ready(nodes.url)
    async with _deployed(tmp_path, nodes, {"HERALD_STREAM_REPLICAS": "3"}) as deployed:
        await deployed.services.wait_serving()
        # Segment takes one request a second: the export lasts long enough for both faults.
        segment_api = SegmentApi(write_keys={f"wk_{uuid.uuid4().hex}"}, max_requests_per_second=1)
        await segment_api.start()
        try:
            export = await _start_export(deployed, segment_api, CLUSTER_AUDIENCE)
            jobs = Subjects(SETTINGS["HERALD_NAMESPACE"]).stream("jobs")
            await _received(export, CLUSTER_AUDIENCE // 10)
            nodes.kill(2)
            await asyncio.sleep(3)
            nodes.start(2)
            leader = nodes.node_named(await _stream_leader(nodes.url, jobs))
            await _received(export, CLUSTER_AUDIENCE // 4)
            nodes.kill(leader)
            assert export.received() < CLUSTER_AUDIENCE  # the fault lands mid-export
            await asyncio.sleep(3)
            nodes.start(leader)
            stats = await _completed(deployed, export, within=300)
            _assert_everyone_received_once(export, stats)
        finally:
            await segment_api.stop()
