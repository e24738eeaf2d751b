"""Valid requests for every RPC that writes, each changed at random in one to three places (a value
replaced, cleared or added, a timestamp moved out of range, a property of any JSON kind): every
answer is a clear status, a refused request writes nothing of the account's in the service that
refused it, the services answer health checks SERVING throughout and memory stays bounded.
Seeded, so a failure replays."""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections import Counter
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import psutil
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from herald.accounts.v1 import account_service_pb2 as accounts_pb
from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald_common import api
from tests.conftest import Platform
from tests.harness import Clients, create_account
from tests.helpers import condition, create_segment, matching, segment_export_campaign, user
from tests.test_hostile_input import BROKEN, SERVED_BY, _answer
from tests.test_random_requests import _fill, _value

SEED = 20261207
MUTATIONS_PER_SEED = 24
# What the pass may add to this process (all four services and the test): its requests are small,
# so growth beyond this would be a leak or an unbounded structure, not a large request.
MEMORY_GROWTH_BOUND_MIB = 200
_TIMESTAMP_SECONDS = [0, -1, -62135596801, 253402300800, 2**40, 1_800_000_000]
_TEMPLATES = ["", "{{ x", "{% include 'a' %}", "{{ 'a' | append: 'b' }}", "y" * 5000]
_JSON_VALUES: list[Any] = ["", "x" * 200, "a\x00b", 0, -1.5, 1e308, True, None, [], ["a", 1], {"k": "v"}]


def _fingerprint_query(tables: list[tuple[str, str, str]]) -> str:
    """One statement that hashes every row the account owns, table by table."""
    parts = [
        f"SELECT '{schema}.{table}:' || md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) AS h "
        f'FROM "{schema}"."{table}" t WHERE t.account_id = $1::{kind}'
        for schema, table, kind in tables
    ]
    return f"SELECT string_agg(h, ',' ORDER BY h) FROM ({' UNION ALL '.join(parts)}) hashes"


async def _account_tables(connection: asyncpg.Connection) -> list[tuple[str, str, str]]:
    rows = await connection.fetch(
        """SELECT c.table_schema, c.table_name, c.data_type FROM information_schema.columns c
           JOIN information_schema.tables t USING (table_schema, table_name)
           WHERE c.column_name = 'account_id' AND t.table_type = 'BASE TABLE'
             AND c.table_schema NOT IN ('pg_catalog', 'information_schema')
             AND c.table_name <> 'hourly_use'"""
    )
    return [(r["table_schema"], r["table_name"], r["data_type"]) for r in rows]


def _mutate(message: Message, rng: random.Random, depth: int = 0) -> None:
    """Changes one place in `message`: descends into a field already set more often than not."""
    descriptor: Any = message.DESCRIPTOR  # the C and Python descriptor types differ to mypy
    field: FieldDescriptor = rng.choice(descriptor.fields)
    container: Any = getattr(message, field.name)
    nested = field.message_type
    if nested is not None and nested.GetOptions().map_entry:
        key = rng.choice(["", "k", "x" * 300, "a\x00b", "email"])
        value_field = nested.fields_by_name["value"]
        if value_field.message_type is None:
            is_text = value_field.type == FieldDescriptor.TYPE_STRING
            container[key] = rng.choice(_TEMPLATES) if is_text else _value(value_field, rng, depth)
        elif value_field.message_type.full_name == "google.protobuf.Value":
            _set_json(container[key], rng)
        return
    if nested is not None and nested.full_name == "google.protobuf.Struct":
        target = container.add() if field.is_repeated else container
        target.update({rng.choice(["", "k", "email", "x" * 300]): rng.choice(_JSON_VALUES)})
        return
    if nested is not None and nested.full_name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
        target = container.add() if field.is_repeated else container
        target.seconds = rng.choice(_TIMESTAMP_SECONDS)
        target.nanos = rng.choice([0, 999_999_999])
        return
    if nested is not None and nested.full_name.startswith("google.protobuf."):
        message.ClearField(field.name)
        return
    if nested is not None:
        if field.is_repeated:
            if container and rng.random() < 0.7:
                _mutate(rng.choice(container), rng, depth + 1)
            elif rng.random() < 0.5:
                _fill(container.add(), nested, rng, depth + 1)
            else:
                del container[:]
        elif message.HasField(field.name) and rng.random() < 0.8 and depth < 5:
            _mutate(container, rng, depth + 1)
        elif rng.random() < 0.5:
            message.ClearField(field.name)
        else:
            _fill(container, nested, rng, depth + 1)
        return
    if field.is_repeated:
        if rng.random() < 0.3:
            del container[:]
        else:
            container.append(_value(field, rng, depth))
    elif rng.random() < 0.2 and field.has_presence:
        message.ClearField(field.name)
    else:
        setattr(message, field.name, _value(field, rng, depth))


def _set_json(target: Any, rng: random.Random) -> None:
    choice = rng.choice(_JSON_VALUES)
    if choice is None:
        target.null_value = 0
    elif isinstance(choice, bool):
        target.bool_value = choice
    elif isinstance(choice, int | float):
        target.number_value = choice
    elif isinstance(choice, str):
        target.string_value = choice
    elif isinstance(choice, list):
        target.list_value.extend(choice)
    else:
        target.struct_value.update(choice)


async def _seeds(clients: Clients, tag: str) -> dict[str, Message]:
    """One valid request per writing RPC, by the RPC's full name, with what they refer to in place."""
    await clients.segmentation.UpsertUsers(
        segmentation_pb.UpsertUsersRequest(users=[user(f"{tag}-1", first_name="Ada", cohort=tag)])
    )
    segment = await create_segment(clients, condition("cohort", "EQUALS", tag))
    twilio = dispatch_pb.TwilioConfig(
        account_sid="AC" + "0" * 32, auth_token="t" * 32, endpoint_url="http://127.0.0.1:9"
    )
    setattr(twilio, "from", "+14155550000")
    sms_destination = dispatch_pb.Destination(display_name="texts", twilio=twilio)
    created = await clients.dispatch.CreateDestination(
        dispatch_pb.CreateDestinationRequest(destination=sms_destination)
    )
    campaign = campaign_pb.Campaign(
        display_name="texts",
        audience=campaign_pb.Audience(segment=segment.name),
        destination=created.name,
        schedule=campaign_pb.Schedule(
            recurring=campaign_pb.Recurring(
                weekly=campaign_pb.Weekly(weekdays=[campaign_pb.Weekday.WEEKDAY_MONDAY], every=1),
                time_of_day="09:30",
                start_date="2027-01-04",
                occurrences=3,
                timezone="Europe/Berlin",
            )
        ),
        targeting=campaign_pb.Targeting(control_group_percent=10, safety_limit=1000),
        delivery=campaign_pb.DeliveryPreferences(
            user_timezone=True,
            cutoff_time="20:00",
            quiet_hours=campaign_pb.QuietHours(
                start="22:00", end="08:00", action=campaign_pb.QuietHoursAction.QUIET_HOURS_ACTION_DELAY
            ),
            throttle=True,
        ),
        sms=campaign_pb.SmsContent(body="Hi {{ profile.first_name | default: 'there' }}"),
    )
    draft = await clients.campaigns.CreateCampaign(campaign_pb.CreateCampaignRequest(campaign=campaign))
    export = segment_export_campaign(segment.name, created.name)
    export.schedule.send_later.send_time.CopyFrom(api.timestamp(api.utcnow() + timedelta(days=30)))
    event = segmentation_pb.Event(user_id=f"{tag}-1", name="Added to Cart", client_event_id=f"{tag}-e")
    event.properties.update({"cart_id": "c1", "amount": 12.5})
    event.time.CopyFrom(api.timestamp(api.utcnow()))
    updated = campaign_pb.Campaign()
    updated.CopyFrom(campaign)
    updated.name = draft.name
    return {
        "herald.segmentation.v1.SegmentationService.UpsertUsers": segmentation_pb.UpsertUsersRequest(
            users=[user(f"{tag}-2", first_name="Grace", phone="+14155550101", tags=["a", "b"])]
        ),
        "herald.segmentation.v1.SegmentationService.IngestEvents": segmentation_pb.IngestEventsRequest(
            events=[event]
        ),
        "herald.segmentation.v1.SegmentationService.CreateSegment": segmentation_pb.CreateSegmentRequest(
            segment=segmentation_pb.Segment(
                display_name="buyers", filter=matching(condition("cohort", "EQUALS", tag))
            ),
            request_id=f"{tag}-segment",
        ),
        "herald.segmentation.v1.SegmentationService.EstimateReach": segmentation_pb.EstimateReachRequest(
            audience=segmentation_pb.Audience(filter=matching(condition("first_name", "EXISTS")))
        ),
        "herald.dispatch.v1.DispatchService.CreateDestination": dispatch_pb.CreateDestinationRequest(
            destination=sms_destination
        ),
        "herald.campaign.v1.CampaignService.CreateCampaign": campaign_pb.CreateCampaignRequest(
            campaign=export
        ),
        "herald.campaign.v1.CampaignService.UpdateCampaign": campaign_pb.UpdateCampaignRequest(
            campaign=updated
        ),
        "herald.campaign.v1.CampaignService.PreviewMessage": campaign_pb.PreviewMessageRequest(
            body="Hello {{ profile.first_name }}", user_id=f"{tag}-1"
        ),
        "herald.accounts.v1.AccountService.CreateApiKey": accounts_pb.CreateApiKeyRequest(
            api_key=accounts_pb.ApiKey(
                display_name="site",
                role=accounts_pb.Role.ROLE_PUBLISHABLE,
                allowed_origins=["https://shop.example.com"],
            )
        ),
        "herald.accounts.v1.AccountService.UpdateAccountSettings": accounts_pb.UpdateAccountSettingsRequest(
            settings=accounts_pb.AccountSettings(
                default_timezone="America/New_York",
                throttle_per_five_minutes=500,
                frequency_caps=[accounts_pb.FrequencyCap(channel=accounts_pb.CAP_CHANNEL_SMS, per_day=2)],
                alert_webhook_url="https://alerts.example.com/herald",
            )
        ),
    }


async def _settled(connection: asyncpg.Connection, fingerprint: str, account_id: str) -> None:
    """Waits until what an accepted request set going in the background (other services' copies of a
    campaign, for one) has landed, so that it is not taken for a refused request's write."""
    last, steady = None, 0
    for _ in range(100):
        current = await connection.fetchval(fingerprint, account_id)
        steady = steady + 1 if current == last else 0
        if steady == 3:
            return
        last = current
        await asyncio.sleep(0.1)
    raise AssertionError("the account's rows kept changing after an accepted request")


async def _watch_health(platform: Platform, failures: list[str], stop: asyncio.Event) -> None:
    channels = {name: grpc.aio.insecure_channel(platform.address(name)) for name in platform.hosts}
    try:
        while not stop.is_set():
            for name, channel in channels.items():
                health: Any = health_pb2_grpc.HealthStub(channel)  # the generated stub knows only sync calls
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                    if reply.status != health_pb2.HealthCheckResponse.SERVING:
                        failures.append(f"{name}: {reply.status}")
                except grpc.aio.AioRpcError as error:
                    failures.append(f"{name}: {error.code().name}")
            await asyncio.sleep(0.05)
    finally:
        for channel in channels.values():
            await channel.close()


async def test_mutated_valid_requests_answer_clearly_and_refusals_write_nothing(platform: Platform) -> None:
    account, key = await create_account(
        platform.address("campaign"), platform.settings.bootstrap_token, "mut"
    )
    clients = Clients.open(platform.addresses, key)
    tag = uuid.uuid4().hex[:8]
    seeds = await _seeds(clients, tag)
    connection = await asyncpg.connect(platform.settings.database_url)
    tables = await _account_tables(connection)
    fingerprint = _fingerprint_query(tables)
    # Each service's schema has the service's name.
    owned = {name: _fingerprint_query([t for t in tables if t[0] == name]) for name in platform.hosts}
    account_id = account.removeprefix("accounts/")
    await _settled(connection, fingerprint, account_id)  # the seeds' own copies in other services
    process = psutil.Process(os.getpid())
    baseline = peak = process.memory_info().rss
    health_failures: list[str] = []
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch_health(platform, health_failures, stop))
    channels = {name: clients.channels[i] for i, name in enumerate(platform.addresses)}
    rng = random.Random(SEED)
    broken, wrote = [], []
    answered: Counter[grpc.StatusCode] = Counter()
    try:
        for method_name, seed in seeds.items():
            method = descriptor_pool.Default().FindMethodByName(method_name)
            for round_ in range(MUTATIONS_PER_SEED):
                request = type(seed)()
                request.CopyFrom(seed)
                for _ in range(rng.choice([1, 1, 2, 3])):
                    _mutate(request, rng)
                service = SERVED_BY[method.containing_service.full_name]
                # What the answering service holds for the account: its own writes. Other services'
                # copies (of a campaign accepted earlier, say) land in their own time.
                own = owned[service]
                before = await connection.fetchval(own, account_id)
                channel = channels[service]
                code = await _answer(channel, method, request.SerializeToString())
                answered[code] += 1
                if code == grpc.StatusCode.OK:
                    await _settled(connection, fingerprint, account_id)
                case = (method.name, round_, code.name, str(request)[:400])
                if code in BROKEN:
                    broken.append(case)
                elif code != grpc.StatusCode.OK:
                    after = await connection.fetchval(own, account_id)
                    if after != before:
                        changed = set(after.split(",")) - set(before.split(","))
                        wrote.append((*case, sorted(h.split(":")[0] for h in changed)))
                peak = max(peak, process.memory_info().rss)
    finally:
        stop.set()
        await watcher
        await connection.close()
        await clients.close()
    grown_mib = (peak - baseline) / 2**20
    print("answers:", {code.name: count for code, count in answered.items()}, f"memory +{grown_mib:.0f} MiB")
    assert not broken, broken[:5]
    assert not wrote, wrote[:5]
    assert not health_failures, health_failures[:5]
    assert answered[grpc.StatusCode.OK] > 0 and answered[grpc.StatusCode.INVALID_ARGUMENT] > 0
    assert grown_mib < MEMORY_GROWTH_BOUND_MIB
