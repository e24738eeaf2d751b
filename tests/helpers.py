"""Building blocks for tests that drive Herald through its public gRPC APIs."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import asyncpg
import grpc
import nats
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb
from herald.scheduler.v1 import scheduler_service_pb2 as scheduler_pb
from herald.segmentation.v1 import segmentation_service_pb2 as segmentation_pb
from herald_sandbox.segment_api import SegmentApi
from tests.conftest import Platform, eventually
from tests.harness import Clients

M = TypeVar("M", bound=Message)


def value(v: Any) -> struct_pb2.Value:
    message = struct_pb2.Value()
    if isinstance(v, list):
        message.list_value.extend(v)
    elif isinstance(v, bool):
        message.bool_value = v
    elif isinstance(v, int | float):
        message.number_value = v
    else:
        message.string_value = v
    return message


def user(user_id: str, **properties: Any) -> segmentation_pb.User:
    u = segmentation_pb.User(user_id=user_id)
    u.properties.update(properties)
    return u


def condition(prop: str, op: str, v: Any = None) -> segmentation_pb.PropertyCondition:
    c = segmentation_pb.PropertyCondition(
        property=prop, operator=segmentation_pb.Operator.Value(f"OPERATOR_{op}")
    )
    if v is not None:
        c.value.CopyFrom(value(v))
    return c


def matching(
    *conditions: segmentation_pb.PropertyCondition, match: str = "ALL"
) -> segmentation_pb.SegmentFilter:
    """A filter of property conditions that must all (or, with match="ANY", some) hold."""
    wrapped = [segmentation_pb.Condition(property=c) for c in conditions]
    if match == "ANY":
        return segmentation_pb.SegmentFilter(any_of=wrapped)
    return segmentation_pb.SegmentFilter(all_of=wrapped)


def audience(segment: str) -> segmentation_pb.Audience:
    return segmentation_pb.Audience(segment=segment)


async def create_segment(
    platform: Platform | Clients, *conditions: segmentation_pb.PropertyCondition, match: str = "ALL"
) -> segmentation_pb.Segment:
    return await platform.segmentation.CreateSegment(
        segmentation_pb.CreateSegmentRequest(
            segment=segmentation_pb.Segment(
                display_name=f"segment {uuid.uuid4().hex[:6]}",
                filter=matching(*conditions, match=match),
            )
        )
    )


async def create_segment_destination(
    platform: Platform | Clients, url: str, write_key: str
) -> dispatch_pb.Destination:
    return await platform.dispatch.CreateDestination(
        dispatch_pb.CreateDestinationRequest(
            destination=dispatch_pb.Destination(
                display_name="Segment production source",
                segment=dispatch_pb.SegmentConfig(write_key=write_key, endpoint_url=url),
            )
        )
    )


async def create_segment_destination_for(
    platform: Platform | Clients, segment_api: SegmentApi
) -> dispatch_pb.Destination:
    """A Segment destination sending to the fake Segment API with one of its write keys."""
    return await create_segment_destination(platform, segment_api.url, next(iter(segment_api.write_keys)))


def segment_export_campaign(segment: str, destination: str, **overrides: Any) -> campaign_pb.Campaign:
    campaign = campaign_pb.Campaign(
        display_name="Export VIPs to Segment",
        audience=campaign_pb.Audience(segment=segment),
        destination=destination,
        schedule=campaign_pb.Schedule(send_now=campaign_pb.SendNow()),
        segment_export=campaign_pb.SegmentExportContent(
            event_name="Herald VIP Export",
            profile_attributes=["first_name", "plan"],
            custom_properties={
                "coupon": "VIP20",
                "greeting": 'Hi {{ profile.first_name | default: "there" }}, your code is {{ profile.code }}',
            },
        ),
    )
    for key, v in overrides.items():
        if v is None:
            campaign.ClearField(key)  # type: ignore[arg-type]
        else:
            getattr(campaign, key).CopyFrom(v) if hasattr(v, "CopyFrom") else setattr(campaign, key, v)
    return campaign


def _details(error: grpc.aio.AioRpcError, kind: type[M]) -> list[M]:
    """The details of one google.rpc type an error's status carries."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"no google.rpc.Status details on {error.code()}: {error.details()}"
    found = []
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            unpacked = kind()
            detail.Unpack(unpacked)
            found.append(unpacked)
    return found


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """The google.rpc.BadRequest field violations an error carries, by field."""
    return {
        v.field: v.description
        for bad_request in _details(error, error_details_pb2.BadRequest)
        for v in bad_request.field_violations
    }


def precondition_subjects(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """The google.rpc.PreconditionFailure violations an error carries: description by subject."""
    return {
        v.subject: v.description
        for failure in _details(error, error_details_pb2.PreconditionFailure)
        for v in failure.violations
    }


async def last_message(js: JetStreamContext, stream: str, subject: str) -> RawStreamMsg | None:
    """The newest message a stream holds on a subject; None while it holds none."""
    try:
        return await js.get_last_msg(stream, subject)
    except nats.js.errors.NotFoundError:
        return None


def busiest_second(times: list[float]) -> int:
    """The most of `times` (seconds) inside any rolling second [t, t + 1)."""
    ordered = sorted(times)
    busiest = start = 0
    for end, at in enumerate(ordered):
        while ordered[start] <= at - 1.0:
            start += 1
        busiest = max(busiest, end - start + 1)
    return busiest


async def completed_stats(
    clients: Platform | Clients, name: str, within: float = 30.0
) -> campaign_pb.CampaignStats:
    """Waits until the campaign `name` is COMPLETED, then answers its stats."""

    async def done() -> bool:
        got = await clients.campaigns.GetCampaign(campaign_pb.GetCampaignRequest(name=name))
        return got.state == campaign_pb.State.STATE_COMPLETED

    await eventually(done, within=within)
    return await clients.campaigns.GetCampaignStats(campaign_pb.GetCampaignStatsRequest(name=f"{name}/stats"))


async def segmentation_has(database_url: str, table: str, campaign: str, condition: str = "true") -> bool:
    """Whether segmentation's table holds a row for the campaign (where the condition holds)."""
    connection = await asyncpg.connect(database_url)
    try:
        found = await connection.fetchval(
            f"SELECT {condition} FROM segmentation.{table} WHERE campaign = $1", campaign
        )
    finally:
        await connection.close()
    return bool(found)


async def live_run(clients: Clients, campaign: str) -> bool:
    """Whether the scheduler holds the campaign's live run."""
    found = await clients.scheduler.ListRuns(scheduler_pb.ListRunsRequest(parent=campaign))
    return any(run.state == scheduler_pb.RUN_STATE_LIVE for run in found.runs)


async def until_live(clients: Clients, database_url: str, campaign: str, within: float = 10.0) -> None:
    """Waits until a published live campaign is armed: its run is live in the scheduler, and
    segmentation matches events against its trigger (each follows CampaignChanged on its own)."""

    async def armed() -> bool:
        if not await live_run(clients, campaign):
            return False
        return await segmentation_has(database_url, "live_triggers", campaign, "active")

    await eventually(armed, within=within)


@contextlib.asynccontextmanager
async def writes_held(database_url: str, table: str) -> AsyncIterator[None]:
    """Holds off every write to `table` (reads go on) until the block ends: the service that
    writes it falls behind, as a slow or restarting consumer would."""
    connection = await asyncpg.connect(database_url)
    try:
        async with connection.transaction():
            await connection.execute(f"LOCK TABLE {table} IN SHARE MODE")
            yield
    finally:
        await connection.close()


async def until_goal_matched(database_url: str, campaign: str, within: float = 10.0) -> None:
    """Waits until segmentation matches events against the campaign's goal (it follows
    CampaignChanged on its own)."""
    await eventually(lambda: segmentation_has(database_url, "goals", campaign), within=within)
